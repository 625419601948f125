"""Resolving a MODEL argument: the bundled model, a registry URI, an MLflow run, a model package,
a checkpoint, or an exported folder.

Every delivery command (``evaluate``, ``export``, ``label``) names its model the same way and gets
the same :class:`LoadedModel` back from :func:`load_model`:

- ``bundled`` (the default where it ships): the lead-identification model inside leadtune;
- ``models:/lead-id@champion`` or ``models:/lead-id/3``: a registered version (MLflow registry);
- ``runs:/<run id>/model`` or a bare 32-character run id: the model package of that run;
- a model package folder (``leadtune-model.json``), e.g. one downloaded from the registry;
- a leadtune checkpoint folder (holding ``checkpoint.pt``) or the ``.pt`` file itself;
- a folder written by ``leadtune export`` (it holds a model package too).

Whatever the source, leadtune reads tensors and plain data only: the weights with
``torch.load(weights_only=True)``, the task and config as JSON, and the task's spec rebuilds the
model. Nothing a user passes can run code when loaded. Versions registered by leadtune before
0.2 were pickled modules: they are refused with a one-line error that says how to re-register
them (their trial checkpoint is used instead where it is still on this machine).

What the model expects (lead order, sampling rate, preprocessing) comes from the package, the
checkpoint or the dataset manifest; where a fact is not recorded anywhere, the data layer's
default is used and :attr:`LoadedModel.notes` says so.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leadtune.search.tracking import check_tracking_uri, mlflow_client, use_tracking_uri
from leadtune.trainables.data.cache import default_preprocess, find_preprocess  # noqa: F401
from leadtune.trainables.data.preprocess import preprocess_settings
from leadtune.trainables.model_package import PACKAGE_FILE, is_package
from leadtune.trainables.tasks import DEFAULT_TASK
from leadtune.trainables.training import CHECKPOINT_FILE

CARD_FILE = "model_card.json"
BUNDLED = "bundled"
REGISTRY_DEFAULT = "models:/lead-id@champion"
DEFAULT_FS = 100
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_DEFAULT_TRACKING_DB = Path("runs/search/mlflow.db")


class ModelSourceError(ValueError):
    """A MODEL argument that cannot be resolved; the one-line message says how to fix it."""


@dataclass
class LoadedModel:
    """A model ready for inference, with what it expects as input."""

    model: Any  # torch module in eval mode: (B, K, T) mV -> outputs
    task: str
    config: Any  # the task's config object
    leads: tuple[str, ...]  # the lead order the model was trained on
    fs: int
    fingerprint: str  # of the training data ("unknown" if not recorded)
    card: dict[str, Any]  # everything known about the model (metrics, tags, data, files)
    source: str  # the MODEL argument as given
    kind: str = "checkpoint"  # bundled | registry | run | package | checkpoint | export
    checkpoint: Path | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)  # PreprocessConfig fields
    preprocess_origin: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        """Input length T the model was trained on: 10 s at its sampling rate."""
        return 10 * self.fs

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()


def bundled_model_dir() -> Path:
    from leadtune.bundled import model_dir

    return model_dir()


def default_model() -> str:
    """The bundled model where it ships, else the registry's lead-ID champion."""
    return BUNDLED if is_package(bundled_model_dir()) else REGISTRY_DEFAULT


def default_tracking_uri(given: str | None) -> str | None:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the default search's database if present."""
    if given:
        return given
    for name in ("MLFLOW_TRACKING_URI", "LEADTUNE_MLFLOW_TRACKING_URI"):
        if os.environ.get(name):
            return os.environ[name]
    if _DEFAULT_TRACKING_DB.is_file():
        return f"sqlite:///{_DEFAULT_TRACKING_DB.resolve()}"
    return None


def load_model(
    spec: str | Path | None,
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Resolve MODEL and load it on the CPU (see the module's docstring for the forms)."""
    text = str(spec or default_model())
    roots = [Path(cache_dir)] if cache_dir else []
    if text == BUNDLED:
        folder = bundled_model_dir()
        if not is_package(folder):
            raise ModelSourceError(
                f"no bundled model in this installation ({folder}); pass a model, e.g. "
                f"{REGISTRY_DEFAULT} with --tracking-uri"
            )
        return _from_package(folder, text, "bundled", roots)
    if text.startswith("models:/"):
        return _load_registered(text, tracking_uri, roots)
    if text.startswith("runs:/") or (_RUN_ID.match(text) and not Path(text).exists()):
        return _load_run(text, tracking_uri, roots)
    path = Path(text)
    if path.is_dir() and is_package(path):
        kind = "export" if (path / CARD_FILE).is_file() else "package"
        return _from_package(path, text, kind, roots)
    if path.is_file() or (path.is_dir() and (path / CHECKPOINT_FILE).is_file()):
        return _load_checkpoint(path, text, roots)
    if path.is_dir():
        raise ModelSourceError(
            f"{path}: not a leadtune checkpoint folder (no {CHECKPOINT_FILE}), model package (no "
            f"{PACKAGE_FILE}) or exported model; pass one of those"
        )
    raise ModelSourceError(
        f"unknown model {text!r}: not a file or folder, a run id or a models:/ URI; use e.g. "
        f"bundled, {REGISTRY_DEFAULT}, a checkpoint folder or an exported folder"
    )


# -- what a model expects: preprocessing ---------------------------------------------------------


def _numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {
        key: float(value)
        for key, value in values.items()
        if key.startswith(prefix)
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    }


# -- checkpoints and packages --------------------------------------------------------------------


def _load_checkpoint(path: Path, source: str, cache_roots: list[Path]) -> LoadedModel:
    from leadtune.trainables.tasks import load_trained_model

    model, config, state = load_trained_model(path)  # CheckpointError is a one-line ValueError
    data = state.get("data") or {}
    fs, fingerprint = int(data.get("fs", DEFAULT_FS)), str(data.get("fingerprint", "unknown"))
    preprocess, origin = find_preprocess(fingerprint, fs, cache_roots)
    folder = path if path.is_dir() else path.parent
    card = {
        "source": source,
        "kind": "checkpoint",
        "task": state.get("task", DEFAULT_TASK),
        "checkpoint": str(folder.resolve()),
        "epoch": state.get("epoch"),
        "validation_metrics": _numbers(state.get("metrics") or {}, prefix="val_"),
        "val_thresholds": (state.get("metrics") or {}).get("val_thresholds"),
        "test_metrics": {},
        "data": {"fingerprint": fingerprint, "fs": fs, "source": data.get("source", "")},
    }
    return LoadedModel(
        model=model,
        task=card["task"],
        config=config,
        leads=tuple(getattr(config, "leads", ())),
        fs=fs,
        fingerprint=fingerprint,
        card=card,
        source=source,
        kind="checkpoint",
        checkpoint=folder,
        preprocess=preprocess,
        preprocess_origin=origin,
    )


def _from_package(
    folder: Path, source: str, kind: str, cache_roots: list[Path], card: dict | None = None
) -> LoadedModel:
    from leadtune.trainables.model_package import load_package

    model, config, manifest = load_package(folder)
    data = manifest.get("data") or {}
    fs = int(data.get("fs", DEFAULT_FS))
    fingerprint = str(data.get("fingerprint", "unknown"))
    if manifest.get("preprocessing"):
        preprocess = dict(manifest["preprocessing"])
        origin = f"model package {folder / PACKAGE_FILE}"
    else:
        preprocess, origin = find_preprocess(fingerprint, fs, cache_roots)
    card = {
        "source": source,
        "kind": kind,
        "task": manifest["task"],
        "package": str(folder),
        "epoch": manifest.get("epoch"),
        "validation_metrics": dict(manifest.get("validation_metrics") or {}),
        "test_metrics": dict(manifest.get("test_metrics") or {}),
        "data": {"fingerprint": fingerprint, "fs": fs, "source": data.get("source", "")},
        "labelling": manifest.get("labelling") or {},
        "val_thresholds": manifest.get("val_thresholds"),
        **(card or {}),
    }
    checkpoint = (manifest.get("source") or {}).get("checkpoint")
    return LoadedModel(
        model=model,
        task=manifest["task"],
        config=config,
        leads=tuple(getattr(config, "leads", ())),
        fs=fs,
        fingerprint=fingerprint,
        card=card,
        source=source,
        kind=kind,
        checkpoint=Path(checkpoint) if checkpoint and Path(checkpoint).exists() else None,
        preprocess=preprocess_settings(preprocess),
        preprocess_origin=origin,
    )


# -- MLflow: registry versions and runs ----------------------------------------------------------


def _client(tracking_uri: str | None, what: str):
    uri = default_tracking_uri(tracking_uri)
    if not uri:
        missing = "" if is_package(bundled_model_dir()) else "no bundled model is installed, and "
        raise ModelSourceError(
            f"{missing}{what} needs an MLflow tracking URI; pass --model (a checkpoint or model "
            "folder) or --tracking-uri (e.g. sqlite:///runs/search/mlflow.db or http://host:5000)"
        )
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise ModelSourceError(
            f"MLflow database {uri[len('sqlite:///') :]} not found (from --tracking-uri {uri}); "
            "run `leadtune search` first or pass the database the search wrote"
        )
    check_tracking_uri(uri, "--tracking-uri")
    use_tracking_uri(uri)
    return mlflow_client(uri), uri


def _registry_version(client: Any, uri_text: str, tracking_uri: str):
    from mlflow.exceptions import MlflowException

    body = uri_text[len("models:/") :]
    name, at, alias = body.partition("@")
    version_number = None
    if not at:
        name, slash, version_number = body.partition("/")
        if not slash or not version_number.isdigit():
            raise ModelSourceError(
                f"bad model URI {uri_text!r}; use models:/NAME@ALIAS or models:/NAME/VERSION"
            )
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ModelSourceError(
            f"unknown model {name!r} in the registry at {tracking_uri}; run `leadtune search` or "
            "`leadtune promote` first, or pass the right --tracking-uri"
        ) from None
    try:
        if at:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version_number)
    except MlflowException:
        if at:
            hint = (
                "run `leadtune search` or `leadtune promote` first"
                if alias == "champion"
                else "set the alias or use models:/NAME/VERSION"
            )
            raise ModelSourceError(
                f"model {name!r} has no {alias!r} alias yet at {tracking_uri}; {hint}"
            ) from None
        raise ModelSourceError(
            f"model {name!r} has no version {version_number} at {tracking_uri}; list versions "
            "with the MLflow UI or use models:/NAME@champion"
        ) from None


def proxied_local_path(artifact_uri: str, tracking_uri: str) -> Path | None:
    """A proxied ``mlflow-artifacts:/`` location as a local path, where it can be one.

    A search without --tracking-uri ran its own MLflow server with artifacts under
    ``<storage>/mlartifacts`` next to ``mlflow.db``; reading that database directly, the files
    are right there, so no server has to be started just to read or add them.
    """
    if not artifact_uri.startswith("mlflow-artifacts:") or not tracking_uri.startswith(
        "sqlite:///"
    ):
        return None
    relative = artifact_uri[len("mlflow-artifacts:") :].lstrip("/")
    return Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts" / relative


def _download(artifact_uri: str, tracking_uri: str) -> Path:
    """A local folder holding the artifacts at ``artifact_uri``."""
    local = proxied_local_path(artifact_uri, tracking_uri)
    if local is not None:
        if local.exists():
            return local
        raise ModelSourceError(
            f"the model's files are served by an MLflow server ({artifact_uri}) and not found "
            f"under {local.parent}; pass --tracking-uri http://HOST:PORT of that server"
        )
    if artifact_uri.startswith("file://"):
        folder = Path(artifact_uri[len("file://") :])
        if not folder.is_dir():
            raise ModelSourceError(f"the model's files are gone from {folder}")
        return folder
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri))
    except Exception as exc:
        message = " ".join(str(exc).split())[:200]
        raise ModelSourceError(
            f"cannot fetch the model's files at {artifact_uri} ({message})"
        ) from None


def _from_mlflow(folder: Path, tags: dict[str, str], source: str, kind: str,
                 cache_roots: list[Path], card: dict[str, Any]) -> LoadedModel:  # fmt: skip
    """The package in ``folder`` (or inside the MLflow model there), or, for a version
    registered before packages, its checkpoint."""
    from leadtune.trainables.pyfunc import package_folder

    if is_package(folder):
        return _from_package(folder, source, kind, cache_roots, card)
    inner = package_folder(folder)
    if inner is not None and is_package(inner):
        return _from_package(inner, source, kind, cache_roots, card)
    checkpoint = tags.get("leadtune.checkpoint")
    if checkpoint and (Path(checkpoint) / CHECKPOINT_FILE).is_file():
        loaded = _load_checkpoint(Path(checkpoint), source, cache_roots)
        loaded.kind = kind
        loaded.card.update(card)
        loaded.notes.append(
            f"{source} was registered before leadtune 0.2 as a pickled module, which leadtune "
            f"does not unpickle; its trial checkpoint {checkpoint} was loaded instead"
        )
        return loaded
    raise ModelSourceError(
        f"{source} was registered before leadtune 0.2 as a pickled module, which leadtune does "
        "not load (unpickling can run code), and its trial checkpoint is not on this machine; "
        "re-register it with `leadtune promote --study STUDY --storage-path PATH` where the "
        "search's checkpoints are"
    )


def _load_registered(
    uri_text: str, tracking_uri: str | None, cache_roots: list[Path]
) -> LoadedModel:
    client, uri = _client(tracking_uri, f"model {uri_text}")
    version = _registry_version(client, uri_text, uri)
    tags = dict(version.tags)
    card = {
        "registered_model": version.name,
        "version": str(version.version),
        "run_id": version.run_id,
        "tracking_uri": uri,
        "tags": tags,
    }
    if tags.get("leadtune.val_metric"):
        card["selected_on"] = {
            tags["leadtune.val_metric"]: float(tags.get("leadtune.val_value", "nan"))
        }
    folder = _download(version.source, uri)
    return _from_mlflow(folder, tags, uri_text, "registry", cache_roots, card)


def _load_run(text: str, tracking_uri: str | None, cache_roots: list[Path]) -> LoadedModel:
    from mlflow.exceptions import MlflowException

    run_id = text[len("runs:/") :].split("/")[0] if text.startswith("runs:/") else text
    artifact = text[len("runs:/") + len(run_id) :].strip("/") if text.startswith("runs:/") else ""
    client, uri = _client(tracking_uri, f"run {run_id}")
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ModelSourceError(
            f"unknown model: no MLflow run {run_id} at {uri}; check the run id and --tracking-uri"
        ) from None
    tags = dict(run.data.tags)
    folder = _download(f"{run.info.artifact_uri}/{artifact or 'model'}", uri)
    card = {"run_id": run_id, "tracking_uri": uri, "tags": tags}
    return _from_mlflow(folder, tags, text, "run", cache_roots, card)

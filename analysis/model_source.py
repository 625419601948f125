"""Resolving a MODEL argument: registry URI, MLflow run id, checkpoint, or exported folder.

Every delivery command (`evaluate`, `export`, `label`) names its model the same way and gets the
same :class:`LoadedModel` back from :func:`load_model`:

- ``models:/lead-id@champion`` or ``models:/lead-id/3``: a registered version (MLflow registry);
- ``runs:/<run id>/model`` or a bare 32-character run id: the model logged in that run;
- a leadtune checkpoint folder (holding ``checkpoint.pt``) or the ``.pt`` file itself;
- a folder written by ``leadtune export`` (``model_card.json`` + TorchScript).

What the model expects (lead order, sampling rate, preprocessing) comes from the checkpoint, the
registry tags or the model card; where a fact is not recorded anywhere, the data layer's default
is used and :attr:`LoadedModel.notes` says so.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHECKPOINT_FILE = "checkpoint.pt"
CARD_FILE = "model_card.json"
TORCHSCRIPT_FILE = "model.torchscript.pt"
DEFAULT_MODEL = "models:/lead-id@champion"
DEFAULT_FS = 100
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_DEFAULT_TRACKING_DB = Path("runs/search/mlflow.db")


class ModelSourceError(ValueError):
    """A MODEL argument that cannot be resolved; the one-line message says how to fix it."""


@dataclass
class LoadedModel:
    """A lead-identification model ready for inference, with what it expects as input."""

    model: Any  # torch module in eval mode: (B, K, T) mV -> logits (B, K, M)
    config: Any  # LeadIdConfig, or the config dict of an exported model
    leads: tuple[str, ...]  # output classes, and the lead order the model was trained on
    fs: int
    fingerprint: str  # of the training data ("unknown" if not recorded)
    card: dict[str, Any]  # everything known about the model (metrics, tags, data, files)
    source: str  # the MODEL argument as given
    kind: str = "checkpoint"  # registry | run | checkpoint | export
    checkpoint: Path | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)  # PreprocessConfig fields
    preprocess_origin: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        """Input length T the model was trained on: 10 s at its sampling rate."""
        return 10 * self.fs

    def config_dict(self) -> dict[str, Any]:
        if isinstance(self.config, dict):
            return dict(self.config)
        return self.config.to_dict()


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


def check_tracking_uri(uri: str | None, what: str) -> str:
    """Fail fast (one line) on a missing database or a server that does not answer."""
    if not uri:
        raise ModelSourceError(
            f"{what} needs an MLflow tracking URI; pass --tracking-uri (e.g. "
            "sqlite:///runs/search/mlflow.db or http://host:5000)"
        )
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise ModelSourceError(
                f"MLflow database {db} not found (from --tracking-uri {uri}); run `leadtune "
                "search` first or pass the database the search wrote"
            )
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                ok = response.status == 200
        except OSError as exc:
            raise ModelSourceError(
                f"MLflow registry at {uri} unreachable ({type(exc).__name__}: {exc}); start the "
                "server or pass another --tracking-uri"
            ) from None
        if not ok:
            raise ModelSourceError(f"MLflow server at {uri} is not healthy; check the server")
    return uri


def load_model(
    spec: str | Path | None,
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Resolve MODEL (registry URI, run id, checkpoint or exported folder) and load it on CPU.

    ``cache_dir`` is a dataset cache root to search (besides the default one) for the manifest
    that records the training data's preprocessing.
    """
    text = str(spec or DEFAULT_MODEL)
    roots = [Path(cache_dir)] if cache_dir else []
    if text.startswith("models:/"):
        return _load_registered(text, tracking_uri, roots)
    if text.startswith("runs:/") or _RUN_ID.match(text) and not Path(text).exists():
        return _load_run(text, tracking_uri, roots)
    path = Path(text)
    if path.is_dir() and (path / CARD_FILE).is_file():
        return _load_export(path, text)
    if path.is_file() or (path.is_dir() and (path / CHECKPOINT_FILE).is_file()):
        return _load_checkpoint(path, text, roots)
    if path.is_dir():
        raise ModelSourceError(
            f"{path}: neither a leadtune checkpoint folder (no {CHECKPOINT_FILE}) nor an exported "
            f"model (no {CARD_FILE}); pass a trial's checkpoint folder or a `leadtune export` folder"
        )
    raise ModelSourceError(
        f"unknown model {text!r}: not a file or folder, a run id or a models:/ URI; use e.g. "
        f"{DEFAULT_MODEL}, models:/lead-id/3, a checkpoint folder or an exported folder"
    )


# -- what a model expects: preprocessing ---------------------------------------------------------


def default_preprocess(fs: int) -> dict[str, Any]:
    from trainables.data.preprocess import PreprocessConfig

    return PreprocessConfig(fs=fs).to_dict()


def find_preprocess(fingerprint: str, fs: int, cache_roots: list[Path] | None = None):
    """(preprocess settings, where they came from) for the training data with this fingerprint.

    The dataset cache manifest records the settings; it is looked up by fingerprint under the
    cache roots. Without one, the data layer's defaults at the model's rate are returned.
    """
    from trainables.data.cache import MANIFEST_FILE, default_cache_root

    roots = [Path(r) for r in (cache_roots or [])] + [default_cache_root()]
    for root in roots:
        for manifest_file in sorted((root / "datasets").glob(f"*/{MANIFEST_FILE}")):
            try:
                manifest = json.loads(manifest_file.read_text())
            except (OSError, ValueError):
                continue
            if manifest.get("fingerprint") == fingerprint:
                return dict(manifest["settings"]["preprocess"]), f"dataset manifest {manifest_file}"
    return (
        default_preprocess(fs),
        "defaults of the data layer (trainables/data/preprocess.py PreprocessConfig); no dataset "
        f"cache manifest with fingerprint {fingerprint[:12]} was found",
    )


# -- checkpoints ---------------------------------------------------------------------------------


def _from_checkpoint_state(state: dict[str, Any]) -> tuple[int, str, str]:
    data = state.get("data") or {}
    return (
        int(data.get("fs", DEFAULT_FS)),
        str(data.get("fingerprint", "unknown")),
        str(data.get("source", "")),
    )


def _load_checkpoint(path: Path, source: str, cache_roots: list[Path]) -> LoadedModel:
    from trainables.lead_id import load_model_from_checkpoint

    try:
        model, config, state = load_model_from_checkpoint(path)
    except (KeyError, RuntimeError, EOFError) as exc:
        raise ModelSourceError(
            f"{path}: not a readable leadtune checkpoint ({type(exc).__name__}: {exc}); pass the "
            "checkpoint folder of a trial"
        ) from None
    fs, fingerprint, data_source = _from_checkpoint_state(state)
    preprocess, origin = find_preprocess(fingerprint, fs, cache_roots)
    folder = path if path.is_dir() else path.parent
    card = {
        "source": source,
        "kind": "checkpoint",
        "checkpoint": str(folder.resolve()),
        "epoch": state.get("epoch"),
        "validation_metrics": _numbers(state.get("metrics") or {}, prefix="val_"),
        "test_metrics": {},
        "data": {"fingerprint": fingerprint, "fs": fs, "source": data_source},
    }
    return LoadedModel(
        model=model,
        config=config,
        leads=tuple(config.leads),
        fs=fs,
        fingerprint=fingerprint,
        card=card,
        source=source,
        kind="checkpoint",
        checkpoint=folder,
        preprocess=preprocess,
        preprocess_origin=origin,
    )


def _numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if (
            key.startswith(prefix)
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ):
            out[key] = float(value)
    return out


# -- exported folders ----------------------------------------------------------------------------


def _load_export(folder: Path, source: str) -> LoadedModel:
    import torch

    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{folder / CARD_FILE}: unreadable model card ({exc})") from None
    file = folder / card.get("files", {}).get("torchscript", TORCHSCRIPT_FILE)
    if not file.is_file():
        raise ModelSourceError(
            f"{file}: TorchScript model named in {CARD_FILE} not found; re-run `leadtune export`"
        )
    model = torch.jit.load(str(file), map_location="cpu")
    model.eval()
    pre = card.get("preprocessing", {})
    return LoadedModel(
        model=model,
        config=dict(card.get("config", {})),
        leads=tuple(card["leads"]),
        fs=int(card["sampling_rate_hz"]),
        fingerprint=str(card.get("data", {}).get("fingerprint", "unknown")),
        card=card,
        source=source,
        kind="export",
        preprocess={k: pre[k] for k in ("fs", "highpass_hz", "highpass_order", "zero_phase")},
        preprocess_origin=f"model card {folder / CARD_FILE} ({pre.get('origin', 'unknown')})",
    )


# -- MLflow: registry versions and runs ----------------------------------------------------------


def _client(tracking_uri: str | None, what: str):
    uri = check_tracking_uri(default_tracking_uri(tracking_uri), what)
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


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


def _local_artifact_path(artifact_uri: str, tracking_uri: str) -> str:
    local = proxied_local_path(artifact_uri, tracking_uri)
    if local is None:
        return artifact_uri
    if local.exists():
        return str(local)
    raise ModelSourceError(
        f"the model's files are served by an MLflow server ({artifact_uri}) and not found under "
        f"{local.parent}; pass --tracking-uri http://HOST:PORT of that server"
    )


def _model_artifact_uri(model_uri: str, tracking_uri: str) -> str:
    """Where the logged model's files are (download URI), resolved for local proxied stores."""
    try:
        from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

        location = ModelsArtifactRepository.get_underlying_uri(model_uri)
    except Exception:  # older MLflow: fall back to letting load_model resolve it
        return model_uri
    return _local_artifact_path(location, tracking_uri)


def _load_pytorch(uri: str, config: Any) -> Any:
    """The logged model's weights in a freshly built leadtune model (eval mode).

    MLflow 3 logs PyTorch models by default as ``torch.export`` programs traced on one input
    example, which then accept only that example's shape (batch 1, all leads) and refuse
    ``eval()``. The weights are the same either way, so they are moved into a model built from
    the recorded config, which takes any batch size and K <= M leads.
    """
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    from trainables.models import create_model

    try:
        logged = mlflow.pytorch.load_model(uri, map_location="cpu")
    except (MlflowException, OSError) as exc:
        message = " ".join(str(exc).split())[:300]
        raise ModelSourceError(f"cannot load the model at {uri} ({message})") from None
    model = create_model(config.model_config())
    try:
        model.load_state_dict(logged.state_dict())
    except RuntimeError as exc:
        message = " ".join(str(exc).split())[:200]
        raise ModelSourceError(
            f"the model at {uri} does not match its recorded leadtune config ({message})"
        ) from None
    model.eval()
    return model


def _config_from(values: dict[str, Any]):
    from trainables.lead_id import LeadIdConfig

    return LeadIdConfig.from_dict(values)


def _checkpoint_state(path: str | None) -> dict[str, Any] | None:
    """The checkpoint dict, if the folder a registry tag names is still on this machine."""
    if not path:
        return None
    file = Path(path) / CHECKPOINT_FILE
    if not file.is_file():
        return None
    import torch

    return torch.load(file, map_location="cpu", weights_only=False)


def _load_registered(
    uri_text: str, tracking_uri: str | None, cache_roots: list[Path]
) -> LoadedModel:
    client, uri = _client(tracking_uri, f"model {uri_text}")
    version = _registry_version(client, uri_text, uri)
    tags = dict(version.tags)
    model_uri = f"models:/{version.name}/{version.version}"
    card = {
        "source": uri_text,
        "kind": "registry",
        "registered_model": version.name,
        "version": str(version.version),
        "run_id": version.run_id,
        "tracking_uri": uri,
        "tags": tags,
        "test_metrics": {
            k[len("leadtune.") :]: float(v)
            for k, v in tags.items()
            if k.startswith("leadtune.test_")
        },
        "validation_metrics": {},
    }
    if tags.get("leadtune.val_metric"):
        card["validation_metrics"][tags["leadtune.val_metric"]] = float(
            tags.get("leadtune.val_value", "nan")
        )
    return _with_run_facts(
        _model_artifact_uri(model_uri, uri), card, tags.get("leadtune.config"), tags.get("leadtune.checkpoint"),
        tags.get("leadtune.data_fingerprint"), uri_text, "registry", cache_roots,
    )  # fmt: skip


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
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    version_tags = dict(versions[-1].tags) if versions else {}
    model_uri = f"runs:/{run_id}/{artifact or 'model'}"
    if versions and not artifact:
        # MLflow 3 logs models outside the run's artifact folder; the version knows where.
        model_uri = f"models:/{versions[-1].name}/{versions[-1].version}"
    card = {
        "source": text,
        "kind": "run",
        "run_id": run_id,
        "tracking_uri": uri,
        "tags": {**tags, **version_tags},
        "validation_metrics": _numbers(run.data.metrics, prefix="val_"),
        "test_metrics": _numbers(run.data.metrics, prefix="test_"),
    }
    config_json = version_tags.get("leadtune.config")
    if config_json is None and run.data.params:
        config_json = json.dumps(_params_as_config(run.data.params))
    return _with_run_facts(
        _model_artifact_uri(model_uri, uri), card, config_json,
        version_tags.get("leadtune.checkpoint") or tags.get("leadtune.checkpoint"),
        version_tags.get("leadtune.data_fingerprint"), text, "run", cache_roots,
    )  # fmt: skip


def _params_as_config(params: dict[str, str]) -> dict[str, Any]:
    """MLflow params (strings) back to LeadIdConfig values."""
    import ast
    import dataclasses

    from trainables.lead_id import LeadIdConfig

    known = {f.name for f in dataclasses.fields(LeadIdConfig)}
    out: dict[str, Any] = {}
    for key, raw in params.items():
        if key not in known:
            continue
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def _with_run_facts(
    model_uri: str,
    card: dict[str, Any],
    config_json: str | None,
    checkpoint: str | None,
    fingerprint: str | None,
    source: str,
    kind: str,
    cache_roots: list[Path],
) -> LoadedModel:
    notes = []
    state = _checkpoint_state(checkpoint)
    if state is not None:
        config = _config_from(state["config"])
        fs, state_fingerprint, data_source = _from_checkpoint_state(state)
        fingerprint = fingerprint or state_fingerprint
        card["validation_metrics"] = {
            **_numbers(state.get("metrics") or {}, prefix="val_"),
            **card["validation_metrics"],
        }
        card["epoch"] = state.get("epoch")
    elif config_json:
        config = _config_from(json.loads(config_json))
        fs, data_source = DEFAULT_FS, ""
        notes.append(
            f"checkpoint {checkpoint or '(not recorded)'} not on this machine: sampling rate "
            f"assumed {DEFAULT_FS} Hz (the data layer's default)"
        )
    else:
        raise ModelSourceError(
            f"model {source}: no leadtune.config tag and no reachable checkpoint; it was not "
            "logged by `leadtune search`/`promote` and cannot be used here"
        )
    fingerprint = fingerprint or "unknown"
    preprocess, origin = find_preprocess(fingerprint, fs, cache_roots)
    model = _load_pytorch(model_uri, config)
    card["checkpoint"] = checkpoint
    card["data"] = {"fingerprint": fingerprint, "fs": fs, "source": data_source}
    return LoadedModel(
        model=model,
        config=config,
        leads=tuple(config.leads),
        fs=fs,
        fingerprint=fingerprint,
        card=card,
        source=source,
        kind=kind,
        checkpoint=Path(checkpoint) if checkpoint and state is not None else None,
        preprocess=preprocess,
        preprocess_origin=origin,
        notes=notes,
    )

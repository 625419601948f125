"""leadtune models as MLflow models (the ``python_function`` flavour).

Every promoted version's ``model`` artefact is an MLflow model folder: ``MLmodel``, the
signature, an input example, the requirements, and leadtune's weights-only model package under
``data/package``. So ``mlflow.pyfunc.load_model("models:/lead-id@champion")`` predicts and
``mlflow models serve -m models:/lead-id@champion --env-manager local`` answers REST requests.

What loading runs: MLflow reads ``MLmodel`` (YAML), imports the loader module it names, which is
this module from the installed leadtune (``loader_module``, not code stored with the model), and
calls :func:`_load_pyfunc` on the data folder. That reads the package's manifest (JSON) and its
weights with ``torch.load(weights_only=True)``: no pickle, no code from the model's files. (An
``MLmodel`` written by someone else can name other loader modules or code paths; that is MLflow's
trust model for ``mlflow.pyfunc``. leadtune's own loaders, ``leadtune label/evaluate/export``,
never go through pyfunc: they read the package directly, see ``package_folder``.)

Input: raw signals in mV, ``(batch, K, samples)`` float32 (one record: ``(K, samples)``), at the
sampling rate given as the ``fs`` parameter (default: the model's own). The model's
preprocessing (resampling to its rate, the high-pass it was trained with, clipping if any) is
applied here, per record, as ``leadtune label`` does; unlike ``label``, a record longer than the
model's 10 s is fed whole, not cut into 10 s windows and averaged (send 10 s for label's
figures). Output: see the task's ``predict_output`` (the model's ``metadata``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

LOADER_MODULE = "leadtune.trainables.pyfunc"
PACKAGE_DATA = "package"  # the package's folder name under the MLflow model's data/


class LeadtunePyfuncModel:
    """What ``mlflow.pyfunc.load_model`` returns inside its PyFuncModel."""

    def __init__(self, package_dir: str | Path) -> None:
        from leadtune.trainables.data.cache import find_preprocess
        from leadtune.trainables.data.preprocess import PreprocessConfig
        from leadtune.trainables.model_package import load_package
        from leadtune.trainables.tasks import get_task

        self.model, self.config, manifest = load_package(package_dir)
        self.spec = get_task(manifest["task"])
        data = manifest.get("data") or {}
        self.fs = int(data.get("fs", 100))
        settings = (
            manifest.get("preprocessing")
            or find_preprocess(str(data.get("fingerprint", "unknown")), self.fs)[0]
        )
        self.preprocess = PreprocessConfig(**settings)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        signals = _signals(model_input)
        fs_in = float((params or {}).get("fs") or self.fs)
        if fs_in <= 0:
            raise ValueError(f"fs must be a positive sampling rate in Hz, got {fs_in:g}")
        from leadtune.trainables.data.preprocess import preprocess

        prepared = np.stack([preprocess(record, fs_in, self.preprocess) for record in signals])
        if self.spec.predict is None:
            import torch

            with torch.inference_mode():
                return self.model(torch.from_numpy(prepared)).float().numpy()
        return self.spec.predict(self.model, self.config, self.fs, prepared)


def _signals(model_input: Any) -> np.ndarray:
    """(batch, K, samples) float32 from an array, a nested list or ``{"signals": ...}``."""
    if isinstance(model_input, dict):
        if "signals" not in model_input or len(model_input) != 1:
            raise ValueError("pass the signals as an array, or as {'signals': array}")
        model_input = model_input["signals"]
    try:
        array = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"signals must be numbers in mV, (batch, K, samples): {exc}") from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(
            f"signals must be (batch, K, samples) or (K, samples) in mV; got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise ValueError("signals hold NaN or infinite samples; fill or drop them first")
    return array


def _load_pyfunc(data_path: str) -> LeadtunePyfuncModel:
    """MLflow's entry point for ``loader_module`` models."""
    return LeadtunePyfuncModel(data_path)


def save_pyfunc(path: Path, package_dir: Path, spec: Any, example: np.ndarray) -> Path:
    """Write the MLflow model folder at ``path`` around the package at ``package_dir``."""
    import warnings

    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from leadtune import __version__
    from leadtune.trainables.model_package import read_manifest

    manifest = read_manifest(package_dir)
    fs = int((manifest.get("data") or {}).get("fs", 100))
    leads = -1 if spec.variable_leads else int(np.asarray(example).shape[1])
    wrapped = LeadtunePyfuncModel(package_dir)
    output = wrapped.predict(np.asarray(example, dtype=np.float32))
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, leads, -1), "signals")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *output.shape[1:]))]),
        params=ParamSchema([ParamSpec("fs", "double", float(fs))]),
    )
    staged = Path(path).parent / PACKAGE_DATA
    if staged.resolve() != Path(package_dir).resolve():
        import shutil

        shutil.copytree(package_dir, staged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's notes on example conversion
        mlflow.pyfunc.save_model(
            path=str(path),
            loader_module=LOADER_MODULE,
            data_path=str(staged),
            signature=signature,
            input_example=np.asarray(example, dtype=np.float32),
            pip_requirements=[
                f"leadtune=={__version__}",
                f"torch=={torch.__version__.split('+')[0]}",
                f"mlflow=={mlflow.__version__}",
            ],
            metadata={
                "leadtune_task": spec.name,
                "input": f"raw signals in mV, (batch, K, samples) float32, at fs Hz (parameter "
                f"fs, default {fs}); the model's preprocessing is applied inside",
                "leads": list(getattr(wrapped.config, "leads", ())),
                "output": spec.predict_output,
                "preprocessing": wrapped.preprocess.to_dict(),
            },
        )
    return Path(path)


def package_folder(folder: Path) -> Path | None:
    """The leadtune package inside an MLflow model folder (read from ``MLmodel`` as YAML, kept
    inside the folder), or None."""
    import yaml

    mlmodel = Path(folder) / "MLmodel"
    if not mlmodel.is_file():
        return None
    try:
        conf = yaml.safe_load(mlmodel.read_text()) or {}
        data = conf["flavors"]["python_function"]["data"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    candidate = (Path(folder) / str(data)).resolve()
    if Path(folder).resolve() not in candidate.parents:
        return None  # a data path outside the model folder is not followed
    return candidate

"""A trained model as plain files: what registry versions, the bundled model and exports hold.

A package is a folder with

- ``leadtune-model.json``: the task, its config, the input it expects (leads, sampling rate,
  preprocessing), the metrics and where it came from;
- ``weights.pt``: the state dict, tensors only, read with ``torch.load(weights_only=True)``;
- optionally ``model.pt2``: a self-contained ``torch.export`` program (torch alone runs it).

No pickled class is stored: a package loads after leadtune's modules move or are renamed (the
task's spec rebuilds the model from the config), and loading it cannot run code.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

PACKAGE_FILE = "leadtune-model.json"
WEIGHTS_FILE = "weights.pt"
PROGRAM_FILE = "model.pt2"
PACKAGE_FORMAT = 1


class PackageError(ValueError):
    """A folder that is not a readable leadtune model package; the message says why."""


def is_package(folder: str | Path) -> bool:
    return (Path(folder) / PACKAGE_FILE).is_file()


def portable_paths(value: Any) -> Any:
    """``value`` with the machine's own paths made portable, for files that travel (packages,
    model cards): an absolute path under the working folder becomes relative to it, one under
    the home folder starts with ``~``; paths inside longer strings (a recorded command) too.
    Dicts and lists are walked; other values are returned as they are."""
    import os

    if isinstance(value, dict):
        return {k: portable_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable_paths(v) for v in value)
    if not isinstance(value, str) or "/" not in value:
        return value
    here, home = os.getcwd().rstrip("/"), os.path.expanduser("~").rstrip("/")
    if value == here:
        return "."
    value = value.replace(here + "/", "")
    if home and home != "/" and not here.startswith(home + "/") and here != home:
        value = value.replace(home + "/", "~/")
    return value


def write_package(
    folder: str | Path,
    task: str,
    config: dict[str, Any],
    state_dict: dict[str, Any],
    facts: dict[str, Any],
    program_of: Any = None,
    dynamic_leads: bool = True,
    half: bool = False,
) -> Path:
    """Write a package; ``program_of`` (model, example) also writes ``model.pt2``. ``half``
    stores floating-point weights as float16 (half the size; loading casts them back)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu() for k, v in state_dict.items()}
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    torch.save(weights, folder / WEIGHTS_FILE)
    manifest = {
        "format": PACKAGE_FORMAT,
        "task": task,
        "config": portable_paths(config),
        "weights_dtype": "float16" if half else "as trained",
        **portable_paths(facts),
    }
    if program_of is not None:
        model, example = program_of
        export_program(model, example, folder / PROGRAM_FILE, dynamic_leads)
        manifest["files"] = {"weights": WEIGHTS_FILE, "program": PROGRAM_FILE}
    else:
        manifest["files"] = {"weights": WEIGHTS_FILE}
    (folder / PACKAGE_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return folder


def read_manifest(folder: str | Path) -> dict[str, Any]:
    file = Path(folder) / PACKAGE_FILE
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise PackageError(f"{file}: unreadable model package ({exc})") from None
    if not isinstance(manifest, dict) or "task" not in manifest or "config" not in manifest:
        raise PackageError(f"{file}: not a leadtune model package (no task and config)")
    return manifest


def package_weights(folder: str | Path) -> dict[str, Any]:
    """A package's state dict on the CPU, read as tensors only (float16 stored weights are cast
    back to float32)."""
    import torch

    file = Path(folder) / WEIGHTS_FILE
    try:
        weights = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        from leadtune.trainables.training import load_refusal

        raise PackageError(
            f"{file}: not loaded, {load_refusal(exc)}; leadtune loads a package's weights as "
            "tensors only and never runs code from a model file"
        ) from None
    if not isinstance(weights, dict):
        raise PackageError(f"{file}: not a state dict of tensors")
    return {
        k: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float16 else v
        for k, v in weights.items()
    }


def load_package(folder: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, config object, manifest) of a package, on the CPU."""
    from leadtune.trainables.tasks import build_trained, get_task

    folder = Path(folder)
    manifest = read_manifest(folder)
    spec = get_task(manifest["task"])
    weights = package_weights(folder)
    try:
        model, config = build_trained(spec, manifest["config"], weights)
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise PackageError(
            f"{folder}: weights do not match the recorded config ({reason})"
        ) from None
    return model, config, manifest


def export_program(model: Any, example: Any, path: Path, dynamic_leads: bool = True) -> None:
    """``torch.export`` of a ``(B, K, T)`` model with a dynamic batch axis, and a dynamic lead
    axis (1..K) where the model takes any number of leads."""
    import torch

    x = torch.as_tensor(example)
    if x.shape[0] == 1:  # an axis of size 1 would be specialised to 1: export on two examples
        x = torch.cat([x, x])
    axes = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_leads:
        axes[1] = torch.export.Dim("leads", min=1, max=x.shape[1])
    name = next(iter(_argument_names(model)), "x")
    with warnings.catch_warnings():
        # nn.GRU re-assigns its _flat_weights list on every call; torch.export sees that as
        # attributes "assigned during export" and warns. They are the GRU's own parameters,
        # traced as such: every export is checked against the eager model's outputs.
        warnings.filterwarnings("ignore", message=r"(?s).*_flat_weights.*assigned during export")
        program = torch.export.export(model, (x,), dynamic_shapes={name: axes})
    torch.export.save(program, str(path))


def _argument_names(model: Any) -> list[str]:
    import inspect

    return [p for p in inspect.signature(model.forward).parameters if p != "self"]

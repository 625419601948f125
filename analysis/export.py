"""`leadtune export`: a model folder that runs with torch alone, with a model card.

Written to ``--out``:

- ``model.pt2`` (the primary artefact): a ``torch.export`` program with dynamic batch and lead
  axes, ``torch.export.load(path).module()``, no leadtune code needed;
- ``model.torchscript.pt`` (extra, for older runtimes; TorchScript is deprecated in torch):
  ``torch.jit.script``, else ``torch.jit.trace``;
- ``model.onnx`` (extra): where the ``onnx`` extra is installed (``pip install
  'leadtune[onnx]'``, which brings ``onnxscript`` for torch's dynamo exporter);
- ``leadtune-model.json`` and ``weights.pt``: the model package, so that leadtune itself loads
  the folder (``leadtune label --model DIR``) from tensors and plain data only;
- ``model_card.json`` and ``MODEL_CARD.md``: data fingerprint, config, metrics, lead order,
  sampling rate, preprocessing, input and output shapes, and the verification below;
- ``sample_input.npy`` / ``sample_output.npy``: the check input and the original model's logits.

Every written format is checked against the original model on the sample input (two shapes: a
full lead set and a smaller one, so the dynamic axes are exercised); the command fails if the
largest absolute difference of the logits exceeds the tolerance.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from leadtune.analysis.model_source import CARD_FILE, LoadedModel
from leadtune.trainables.data.preprocess import preprocess_settings
from leadtune.trainables.model_package import (
    PROGRAM_FILE,
    export_program,
    portable_paths,
    write_package,
)

EXPORTED_PROGRAM_FILE = PROGRAM_FILE
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
CARD_MARKDOWN = "MODEL_CARD.md"
DEFAULT_TOLERANCE = 1e-4


class ExportError(ValueError):
    """The export could not be written or does not reproduce the model; one line says why."""


def sample_inputs(
    n_leads: int, samples: int, seed: int = 0, variable_leads: bool = True
) -> list[np.ndarray]:
    """Check inputs in mV: (2, K, T) with every lead, and, for models that take any number of
    leads, (3, K', T) with K' = K // 2 leads."""
    rng = np.random.default_rng(seed)
    full = (0.2 * rng.standard_normal((2, n_leads, samples))).astype(np.float32)
    if not variable_leads:
        return [full]
    fewer = max(1, n_leads // 2)
    part = (0.2 * rng.standard_normal((3, fewer, samples))).astype(np.float32)
    return [full, part]


def _outputs(run: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [np.asarray(run(torch.from_numpy(x)).detach().numpy()) for x in inputs]


def check_outputs(run: Any, inputs: list[np.ndarray], expected: list[np.ndarray]) -> dict:
    """Per input shape, the max |logit difference| to the original, or why the shape failed.

    ``max_abs_diff`` is the worst over the shapes that ran; ``unsupported_shapes`` lists the
    others (e.g. an ONNX file whose exporter fixed the number of leads).
    """
    shapes, worst, unsupported = [], None, []
    for x, y in zip(inputs, expected):
        try:
            found = np.asarray(run(x))
        except Exception as exc:  # any runtime may reject a shape it was not exported for
            shapes.append({"shape": list(x.shape), "error": _reason(exc)})
            unsupported.append(list(x.shape))
            continue
        diff = float(np.max(np.abs(found - y))) if found.shape == y.shape else float("inf")
        shapes.append({"shape": list(x.shape), "max_abs_diff": diff})
        worst = diff if worst is None else max(worst, diff)
    return {"max_abs_diff": worst, "shapes": shapes, "unsupported_shapes": unsupported}


def _torch_runner(module: Any):
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).detach().numpy()

    return run


def export_torchscript(model: Any, example: np.ndarray, path: Path) -> str:
    """Script the model if torch can, else trace it; returns the method used."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice: it is an extra here
        try:
            scripted = torch.jit.script(model)
            method = "torch.jit.script"
        except Exception:  # scripting fails on Python constructs; tracing records one run
            scripted = torch.jit.trace(model, torch.from_numpy(example), check_trace=False)
            method = "torch.jit.trace"
        scripted.save(str(path))
    return method


def export_onnx(model: Any, example: np.ndarray, path: Path) -> str:
    """Write ONNX with dynamic batch and lead axes; returns the exporter used."""
    import torch

    x = torch.from_numpy(example)
    try:
        import onnxscript  # noqa: F401  # pyright: ignore[reportMissingImports]  (optional extra)

        batch = torch.export.Dim("batch", min=1, max=4096)
        leads = torch.export.Dim("leads", min=1, max=example.shape[1])
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=True,
            input_names=["signals"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: batch, 1: leads}},
        )
        return "torch.onnx.export (dynamo)"
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            input_names=["signals"],
            output_names=["logits"],
            dynamic_axes={"signals": {0: "batch", 1: "leads"}, "logits": {0: "batch", 1: "leads"}},
            opset_version=17,
        )
    return "torch.onnx.export (TorchScript-based; onnxscript not installed for dynamo)"


def onnx_runner(path: Path) -> tuple[Any, str]:
    """A function running the ONNX file: onnxruntime if installed, else onnx's reference evaluator."""
    try:
        import onnxruntime  # pyright: ignore[reportMissingImports]  (optional)

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return (lambda x: session.run(None, {"signals": x})[0]), "onnxruntime"
    except ImportError:
        pass
    import onnx  # pyright: ignore[reportMissingImports]  (the onnx extra)
    from onnx.reference import ReferenceEvaluator  # pyright: ignore[reportMissingImports]

    evaluator = ReferenceEvaluator(onnx.load(str(path)))
    return (lambda x: evaluator.run(None, {"signals": x})[0]), (
        "onnx.reference.ReferenceEvaluator (onnxruntime not installed)"
    )


def _versions() -> dict[str, str]:
    import torch

    from leadtune import __version__

    return {
        "leadtune": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def build_card(
    loaded: LoadedModel, inputs: list[np.ndarray], outputs: list[np.ndarray]
) -> dict[str, Any]:
    """Everything a user of the exported model needs to feed it correctly: the task's own
    description of its outputs and input scaling (its ``TaskSpec``), shapes as checked."""
    from leadtune.trainables.tasks import get_task

    spec = get_task(loaded.task)
    config = loaded.config_dict()
    card = loaded.card
    pre = dict(loaded.preprocess)
    ecg = _is_ecg_input(loaded, inputs[0])
    lead_axis = "K" if spec.variable_leads else len(loaded.leads)
    in_shape = ["B", lead_axis, "T"] if ecg else ["B", *inputs[0].shape[1:]]
    out_shape = ["B", *outputs[0].shape[1:]]
    if ecg and spec.variable_leads and outputs[0].ndim >= 2:
        out_shape[1] = "K"  # one output row per input lead
    return {
        "name": f"leadtune {spec.name}",
        "task": spec.description,
        "exported_from": loaded.source,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "origin": {
            k: card.get(k)
            for k in ("kind", "registered_model", "version", "run_id", "checkpoint", "epoch")
            if card.get(k) is not None
        },
        "data": {
            "fingerprint": loaded.fingerprint,
            "source": card.get("data", {}).get("source", ""),
        },
        "config": config,
        "validation_metrics": card.get("validation_metrics", {}),
        "test_metrics": card.get("test_metrics", {}),
        "leads": list(loaded.leads),
        "sampling_rate_hz": loaded.fs,
        "preprocessing": {
            **pre,
            "origin": loaded.preprocess_origin,
            "amplitude_normalisation": spec.input_scaling,
            "description": (
                "resample to "
                f"{pre.get('fs', loaded.fs)} Hz, then "
                + (
                    "no high-pass"
                    if pre.get("highpass_hz") is None
                    else f"Butterworth high-pass {pre['highpass_hz']} Hz, order "
                    f"{pre['highpass_order']}, "
                    + ("zero-phase (forward-backward)" if pre["zero_phase"] else "causal (sosfilt)")
                )
                + (f", clipped to +-{pre['clip_mv']} mV" if pre.get("clip_mv") else "")
            ),
        },
        "input": {
            "name": "signals",
            "shape": in_shape,
            "dtype": "float32",
            "units": "mV" if ecg else "as in training",
            "K": (
                f"1..{len(loaded.leads)} waveforms in any order (the model is "
                "permutation-equivariant)"
                if spec.variable_leads
                else f"exactly the {len(loaded.leads)} leads of 'leads', in that order"
            )
            if ecg
            else None,
            "T": f"{loaded.samples} samples (10 s at {loaded.fs} Hz, as in training)"
            if ecg
            else None,
        },
        "output": {"name": "logits", "shape": out_shape, "meaning": spec.export_output},
        "notes": list(loaded.notes),
        "versions": _versions(),
    }


def _is_ecg_input(loaded: LoadedModel, example: np.ndarray) -> bool:
    """Whether the model reads ECGs shaped (B, its leads, T), as both built-in tasks do."""
    return example.ndim == 3 and len(loaded.leads) > 0 and example.shape[1] == len(loaded.leads)


def export_model(
    loaded: LoadedModel, out_dir: Path, tolerance: float = DEFAULT_TOLERANCE, onnx: bool = True
) -> dict[str, Any]:
    """Write every format that works, verify them, write the card; returns the card.

    Raises ExportError (after writing the card) if a verified format differs by more than
    ``tolerance`` from the original, or if no TorchScript file could be written.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot write to --out {out_dir} ({exc.strerror or exc})") from None
    model = loaded.model.eval()
    from leadtune.trainables.tasks import get_task

    variable = get_task(loaded.task).variable_leads
    example = get_task(loaded.task).example_input(loaded.config, loaded.fs)
    if _is_ecg_input(loaded, example):
        inputs = sample_inputs(len(loaded.leads), loaded.samples, variable_leads=variable)
    else:  # a task whose input is not (B, leads, T): its own example, as a batch of two
        inputs = [np.ascontiguousarray(np.repeat(example, 2, axis=0), dtype=np.float32)]
    expected = _outputs(model, inputs)
    np.save(out_dir / "sample_input.npy", inputs[0])
    np.save(out_dir / "sample_output.npy", expected[0])

    card = build_card(loaded, inputs, expected)
    formats: dict[str, dict[str, Any]] = {}

    pt2_path = out_dir / EXPORTED_PROGRAM_FILE
    try:
        import torch

        export_program(model, inputs[0], pt2_path, dynamic_leads=variable)
        program = torch.export.load(str(pt2_path)).module()
        formats["torch_export"] = {
            "file": pt2_path.name,
            "method": "torch.export.export (dynamic batch"
            + (" and lead axes)" if variable else " axis)"),
            "load": f"torch.export.load('{pt2_path.name}').module()",
            **check_outputs(_torch_runner(program), inputs, expected),
        }
    except Exception as exc:
        pt2_path.unlink(missing_ok=True)
        formats["torch_export"] = {"file": None, "skipped": _reason(exc)}

    ts_path = out_dir / TORCHSCRIPT_FILE
    try:
        method = export_torchscript(model, inputs[0], ts_path)
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reloaded = torch.jit.load(str(ts_path))
        formats["torchscript"] = {
            "file": ts_path.name,
            "method": method,
            "load": f"torch.jit.load('{ts_path.name}')",
            **check_outputs(_torch_runner(reloaded), inputs, expected),
        }
    except Exception as exc:
        ts_path.unlink(missing_ok=True)
        formats["torchscript"] = {"file": None, "skipped": _reason(exc)}

    formats["onnx"] = (
        _try_onnx(model, inputs, expected, out_dir / ONNX_FILE)
        if onnx
        else {
            "file": None,
            "skipped": "not asked for (--no-onnx)",
        }
    )

    write_package(
        out_dir,
        loaded.task,
        loaded.config_dict(),
        model.state_dict(),
        {
            "data": {**card["data"], "fs": loaded.fs},
            "preprocessing": preprocess_settings(card["preprocessing"]),
            "validation_metrics": card["validation_metrics"],
            "val_thresholds": loaded.card.get("val_thresholds"),
            "test_metrics": card["test_metrics"],
            "source": card["origin"],
        },
    )  # fmt: skip
    card["files"] = {
        "torch_export": formats["torch_export"]["file"],
        "torchscript": formats["torchscript"]["file"],
        "onnx": formats["onnx"]["file"],
        "package": "leadtune-model.json",
        "weights": "weights.pt",
        "sample_input": "sample_input.npy",
        "sample_output": "sample_output.npy",
    }
    card["verification"] = {
        "tolerance": tolerance,
        "sample_input_shapes": [list(x.shape) for x in inputs],
        "sample_input": (
            "N(0, 0.2 mV) noise, seed 0"
            if card["input"]["units"] == "mV"
            else "the task's example input"
        )
        + " (the first shape is saved as sample_input.npy)",
        "formats": formats,
    }
    failed = [
        name
        for name, entry in formats.items()
        if entry.get("max_abs_diff") is not None and not entry["max_abs_diff"] <= tolerance
    ]
    primary = formats["torch_export"]
    # The .pt2 program is the primary artefact: it has to run on every check shape.
    primary_ok = primary["file"] is not None and not primary["unsupported_shapes"]
    card["verification"]["passed"] = not failed and primary_ok
    card = portable_paths(card)
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2, default=str) + "\n")
    (out_dir / CARD_MARKDOWN).write_text(format_card(card))
    if primary["file"] is None:
        raise ExportError(
            f"{loaded.source}: torch.export failed ({primary['skipped']}); "
            "see the model card in " + str(out_dir)
        )
    if primary["unsupported_shapes"]:
        raise ExportError(
            f"{out_dir / EXPORTED_PROGRAM_FILE}: the exported program fails on input shape(s) "
            f"{primary['unsupported_shapes']}; do not use it (see {CARD_FILE})"
        )
    if failed:
        worst = ", ".join(f"{n} {formats[n]['max_abs_diff']:.2e}" for n in failed)
        raise ExportError(
            f"{out_dir}: exported model differs from the original by more than {tolerance:g} "
            f"({worst}); do not use it (see {CARD_FILE})"
        )
    return card


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _try_onnx(
    model: Any, inputs: list[np.ndarray], expected: list[np.ndarray], path: Path
) -> dict[str, Any]:
    try:
        import onnx  # noqa: F401  # pyright: ignore[reportMissingImports]
    except ImportError:
        return {
            "file": None,
            "skipped": "the onnx package is not installed (pip install 'leadtune[onnx]')",
        }
    try:
        method = export_onnx(model, inputs[0], path)
    except Exception as exc:
        path.unlink(missing_ok=True)
        return {"file": None, "skipped": f"export failed: {_reason(exc)}"}
    entry: dict[str, Any] = {"file": path.name, "method": method}
    try:
        import onnx  # pyright: ignore[reportMissingImports]  (the onnx extra)

        onnx.checker.check_model(str(path))
        run, runner = onnx_runner(path)
        entry["runner"] = runner
        entry.update(check_outputs(run, inputs, expected))
    except Exception as exc:
        entry["max_abs_diff"] = None
        entry["not_verified"] = _reason(exc)
    return entry


def _fmt_metrics(values: dict[str, Any]) -> str:
    if not values:
        return "none recorded"
    return ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
    )


def _shape(shape: list[Any]) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ")"


def format_card(card: dict[str, Any]) -> str:
    """The model card as Markdown."""
    pre = card["preprocessing"]
    lines = [
        f"# Model card: {card['name']}",
        "",
        f"Exported from `{card['exported_from']}` on {card['exported_at']}.",
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        f"model = torch.export.load('{card['files']['torch_export']}').module()  # torch alone",
        f"logits = model(signals)  # signals: float32 tensor {_shape(card['input']['shape'])}",
        "```",
        "",
        f"- task: {card['task']}",
        f"- input `signals`: shape {_shape(card['input']['shape'])}, float32, "
        f"**{card['input']['units']}**"
        + (f"; K = {card['input']['K']}" if card["input"].get("K") else "")
        + (f"; T = {card['input']['T']}" if card["input"].get("T") else ""),
        f"- output `logits`: shape {_shape(card['output']['shape'])}; {card['output']['meaning']}",
        f"- leads: {', '.join(card['leads']) or 'none (not an ECG model)'}",
        f"- sampling rate: {card['sampling_rate_hz']} Hz",
        f"- preprocessing: {pre['description']}; amplitude normalisation: "
        f"{pre['amplitude_normalisation']}",
        f"  (settings from {pre['origin']})",
        "",
        "## Training",
        "",
        f"- data fingerprint: `{card['data']['fingerprint']}` ({card['data']['source'] or 'source not recorded'})",
        f"- origin: {json.dumps(card['origin'], default=str)}",
        f"- validation metrics: {_fmt_metrics(card['validation_metrics'])}",
        f"- test metrics: {_fmt_metrics(card['test_metrics'])}",
        f"- config: `{json.dumps(card['config'], default=str)}`",
        "",
        "## Files and verification",
        "",
        f"Each file was reloaded and run on sample inputs of shapes "
        f"{card['verification']['sample_input_shapes']}; tolerance "
        f"{card['verification']['tolerance']:g} on the logits. "
        f"Passed: **{card['verification']['passed']}**.",
        "",
        "| format | file | how written | max abs diff | note |",
        "|---|---|---|---|---|",
    ]
    for name, entry in card["verification"]["formats"].items():
        diff = entry.get("max_abs_diff")
        note = entry.get("skipped") or entry.get("not_verified") or entry.get("runner") or ""
        if entry.get("unsupported_shapes"):
            note += f"; fails on input shape(s) {entry['unsupported_shapes']}"
        lines.append(
            f"| {name} | {entry.get('file') or '–'} | {entry.get('method', '–')} | "
            f"{'–' if diff is None else f'{diff:.2e}'} | {note} |"
        )
    if card["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in card["notes"]]
    versions = card["versions"]
    lines += [
        "",
        f"leadtune {versions['leadtune']}, torch {versions['torch']}, Python {versions['python']}",
    ]
    return "\n".join(lines) + "\n"

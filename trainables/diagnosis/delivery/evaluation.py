"""`leadtune evaluate` for diagnosis models: macro and per-class AUROC and F1 with ECG-level
bootstrap intervals, the Brier score, on one split (the test fold, once, for a chosen model).

F1 uses the per-class thresholds the model's validation split chose (recorded in its checkpoint
or package); without them, 0.5, and the output says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from leadtune.trainables.data.ptbxl import SUPERCLASSES


def evaluate_diagnosis(loaded: Any, dataset: Any, split: str = "test", n_boot: int = 1000,
                       seed: int = 0) -> dict[str, Any]:  # fmt: skip
    import torch

    from leadtune.trainables.diagnosis import metrics
    from leadtune.trainables.diagnosis.train import labelled_rows, predict_probabilities

    cfg = loaded.config
    rows = labelled_rows(dataset, split)
    if len(rows) == 0:
        raise ValueError(f"the {split!r} split of {dataset.path} holds no labelled records")
    columns = [list(dataset.leads).index(lead) for lead in cfg.leads]
    signals = np.ascontiguousarray(dataset.signals[rows][:, columns])
    probs = predict_probabilities(loaded.model, signals, cfg, loaded.fs, torch.device("cpu"))
    labels = np.asarray(dataset.superclasses)[rows].astype(np.float32)
    thresholds = loaded.card.get("val_thresholds")
    notes = [] if thresholds else ["no validation thresholds recorded: F1 at 0.5"]
    thresholds = thresholds or [0.5] * len(SUPERCLASSES)
    rng = np.random.default_rng(seed)
    samples = [rng.integers(0, len(rows), len(rows)) for _ in range(n_boot)]

    def interval(statistic) -> list[float]:
        values = [statistic(probs[r], labels[r]) for r in samples]
        values = np.asarray(values, dtype=float)
        return [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]

    auroc = metrics.class_auroc(probs, labels)
    f1 = metrics.f1_at(probs, labels, thresholds)
    classes = []
    for c, name in enumerate(SUPERCLASSES):
        classes.append({
            "class": name,
            "positives": int(labels[:, c].sum()),
            "auroc": float(auroc[c]),
            "auroc_ci": interval(lambda p, y, c=c: metrics.class_auroc(p[:, [c]], y[:, [c]])[0]),
            "f1": float(f1[c]),
            "f1_ci": interval(lambda p, y, c=c: metrics.f1_at(p[:, [c]], y[:, [c]],
                                                               [thresholds[c]])[0]),
            "threshold": float(thresholds[c]),
        })  # fmt: skip
    return {
        "model": loaded.source,
        "split": split,
        "records": int(len(rows)),
        "leads": list(cfg.leads),
        "macro_auroc": float(np.nanmean(auroc)),
        "macro_auroc_ci": interval(metrics.macro_auroc),
        "macro_f1": float(np.nanmean(f1)),
        "macro_f1_ci": interval(lambda p, y: float(np.nanmean(metrics.f1_at(p, y, thresholds)))),
        "brier": metrics.brier(probs, labels),
        "brier_ci": interval(metrics.brier),
        "classes": classes,
        "n_boot": n_boot,
        "notes": notes,
    }


def _ci(values: list[float]) -> str:
    return f"[{values[0]:.3f}-{values[1]:.3f}]"


def format_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# {result['model']} on the {result['split']} split ({result['records']} labelled ECGs, "
        f"leads {', '.join(result['leads'])})",
        "",
        f"macro AUROC {result['macro_auroc']:.3f} {_ci(result['macro_auroc_ci'])}, macro F1 "
        f"{result['macro_f1']:.3f} {_ci(result['macro_f1_ci'])}, Brier {result['brier']:.4f} "
        f"{_ci(result['brier_ci'])} (95 % ECG-level bootstrap, {result['n_boot']} resamples)",
        "",
        "| class | positives | AUROC [95 % CI] | F1 [95 % CI] | threshold |",
        "|---|---|---|---|---|",
    ]
    for row in result["classes"]:
        lines.append(
            f"| {row['class']} | {row['positives']} | {row['auroc']:.3f} {_ci(row['auroc_ci'])} | "
            f"{row['f1']:.3f} {_ci(row['f1_ci'])} | {row['threshold']:.3f} |"
        )
    lines += [f"\nNote: {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path) -> dict[str, Path]:
    from leadtune.analysis.suites import write_result

    return write_result(out, "evaluation", result, format_markdown(result))

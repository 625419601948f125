"""Diagnosis's part in ``leadtune explain``: the logit of each superclass over the model's input
leads and time (Grad-CAM too, on the last convolution), and over a split each lead's share of
each class' attribution (see :mod:`leadtune.analysis.explain`, which holds what both tasks
share)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leadtune.analysis.explain import (
    RecordRun,
    Settings,
    SplitRequest,
    _pyplot,
    attribute,
    completeness,
    lead_importance,
    plot_traces,
    save_arrays,
    save_figure,
)


def last_convolution(model: Any) -> Any:
    """The last Conv1d of a diagnosis network (grad_cam's layer), or None."""
    from torch import nn

    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    return convolutions[-1] if convolutions else None


def explain_diagnosis(
    model: Any, signal: np.ndarray, settings: Settings, classes: int = 5
) -> dict[str, np.ndarray]:
    """One (C, T) signal: the logits (5,), and the attributions of every class' logit:
    (5, C, T), or (5, T) for grad_cam."""
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor(signal[None], dtype=torch.float32))[0].numpy()
    layer = None
    if settings.method == "grad_cam":
        layer = last_convolution(model)
        if layer is None:
            raise ValueError("grad_cam needs a model with a Conv1d layer; this one has none")
    inputs = np.broadcast_to(signal, (classes, *signal.shape))
    found = attribute(model, inputs, list(range(classes)), settings, layer)
    return {"logits": logits, "attributions": found}


def plot_lead_importance(importance: np.ndarray, classes: Sequence[str], leads: Sequence[str],
                         title: str, path: Path, credit: str | None = None) -> Path:  # fmt: skip
    """A bar chart per class: each lead's share of the class' total |attribution|."""
    plt = _pyplot()
    n = len(classes)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.2), sharey=True, squeeze=False)
    for c, ax in enumerate(axes[0]):
        ax.bar(range(len(leads)), 100 * importance[c], color="#b2182b")
        ax.axhline(100 / len(leads), color="0.5", linewidth=0.7, linestyle="--")
        ax.set_xticks(range(len(leads)))
        ax.set_xticklabels(leads, rotation=90, fontsize=7)
        ax.set_title(classes[c], fontsize=9)
    axes[0, 0].set_ylabel("share of |attribution| (%)", fontsize=8)
    fig.suptitle(title + " (dashed: equal shares)", fontsize=10)
    return save_figure(fig, path, credit, layout=(0, 0.03, 1, 0.93))


def with_labels(dataset: Any, rows: np.ndarray) -> np.ndarray:
    """The rows whose record has at least one superclass label."""
    return rows[dataset.superclasses[rows].any(axis=1)]


def explain_record(run: RecordRun) -> list[Path]:
    """Each class' logit over the leads (Grad-CAM: over time, shared by all leads), each lead's
    share per class; summary: the probabilities (as evaluation computes them)."""
    from leadtune.trainables.tasks import get_task

    loaded, signal, names, out, settings = run.loaded, run.signal, run.names, run.out, run.settings
    fs, summary, credit = loaded.fs, run.summary, run.credit
    found = explain_diagnosis(loaded.model, signal, settings)
    attributions = found["attributions"]
    classes = list(loaded.config.classes)
    probabilities = np.asarray(
        get_task(loaded.task).predict(loaded.model, loaded.config, fs, signal[None])
    )[0]
    files = []
    if settings.method == "grad_cam":
        for c, name in enumerate(classes):
            colour = np.broadcast_to(attributions[c], signal.shape)
            files.append(
                plot_traces(
                    signal, colour, names, fs,
                    f"{run.record}: Grad-CAM of {name} (p = {probabilities[c]:.2f}) on "
                    "the last convolution, shared by all leads", out / f"class_{name}.png",
                    colour_label="Grad-CAM", credit=credit, signed=False,
                )
            )  # fmt: skip
    else:
        importance = lead_importance(attributions)
        for c, name in enumerate(classes):
            files.append(
                plot_traces(
                    signal, attributions[c], names, fs,
                    f"{run.record}: {run.label} of {name} (p = {probabilities[c]:.2f}) "
                    f"({loaded.source})", out / f"class_{name}.png", credit=credit,
                )
            )  # fmt: skip
        files.append(
            plot_lead_importance(
                importance, classes, names,
                f"{run.record}: each lead's share of {run.label} |attribution| per class",
                out / "lead_importance.png", credit=credit,
            )
        )  # fmt: skip
        summary["lead_importance"] = {
            name: dict(zip(names, np.round(importance[c], 4).tolist()))
            for c, name in enumerate(classes)
        }
    save_arrays(
        out / "attributions.npz", settings, fs, run.base,
        "attributions: (class, lead, time); grad_cam: (class, time)",
        attributions=attributions.astype(np.float32), signal=signal, logits=found["logits"],
        probabilities=probabilities, classes=np.array(classes), leads=np.array(names),
    )  # fmt: skip
    if settings.method == "integrated_gradients":
        at_base = explain_diagnosis(loaded.model, run.base[0], Settings("saliency"))["logits"]
        summary["completeness"] = completeness(attributions, found["logits"] - at_base)
    summary["probabilities"] = dict(zip(classes, np.round(probabilities, 4).tolist()))
    return [*files, out / "attributions.npz"]


def explain_split(run: SplitRequest) -> list[Path]:
    """Each lead's mean share of each class' attribution over the split's ECGs with the class."""
    loaded, settings, out, credit = run.loaded, run.settings, run.out, run.credit
    leads, rows, split = list(loaded.leads), run.rows, run.split
    classes = list(loaded.config.classes)
    labels = run.dataset.superclasses[rows]
    importance = []
    for i, signal in enumerate(run.signals):
        found = explain_diagnosis(loaded.model, signal, settings)
        importance.append(lead_importance(found["attributions"]))
        run.progress(i + 1)
    importance = np.stack(importance)  # (N, 5, C)
    by_class = np.stack([
        importance[labels[:, c], c].mean(axis=0) if labels[:, c].any()
        else np.full(len(leads), np.nan) for c in range(len(classes))
    ])  # fmt: skip
    files = [
        plot_lead_importance(
            by_class, classes, leads,
            f"Lead importance per class: mean share of |{settings.method}| over the {split} "
            "ECGs labelled with the class", out / "lead_importance.png", credit,
        )
    ]  # fmt: skip
    run.summary["lead_importance"] = {
        name: {
            "records": int(labels[:, c].sum()),
            **dict(zip(leads, np.round(by_class[c], 4).tolist())),
        }
        for c, name in enumerate(classes)
    }
    save_arrays(
        out / "lead_importance.npz", settings, loaded.fs, run.base,
        "importance: (record, class, lead)",
        importance=importance.astype(np.float32), by_class=by_class.astype(np.float32),
        labels=labels, classes=np.array(classes), leads=np.array(leads),
        records=np.array(run.names),
    )  # fmt: skip
    files.append(out / "lead_importance.npz")
    return files

"""`leadtune explain`: what in the signal made a model say "V2", or "MI".

This module holds what every task's explanation shares (Captum, settings, baselines, heartbeats,
trace figures, reading the input); each task's explainer (its delivery package's ``explain``
module, registered with :mod:`leadtune.analysis.delivery`) says what is attributed and drawn.

Attributions come from Captum (PyTorch's attribution library), for both tasks:

- **gradient_shap** (default): GradientShap, expected gradients x (input - baseline) over
  ``n_samples`` random points between a baseline and the input (the lead-ID paper's method);
- **integrated_gradients**: Integrated Gradients, ``steps`` points on the straight path from the
  baseline (Gauss-Legendre); its attributions sum to output(x) - output(baseline) (completeness);
- **saliency**: the plain gradient of the output, without the input multiplier and signed
  ("local attributions": where the output is most sensitive to a small change);
- **grad_cam** (diagnosis CNNs only): LayerGradCam on the last convolution, upsampled to the
  input's time axis (one map over time, shared by all leads: the layer has mixed them).

What is attributed:

- **lead identification**: for each input channel k, the logit of the lead the model predicts
  for it (argmax), over every input channel and time sample: ``(K targets, K inputs, T)``.
  Any K <= 12 channels, any order (the model is a set model).
- **diagnosis**: the logit of each of the 5 superclasses over the model's input leads and time:
  ``(5, C, T)``; the lead importance of a class is the share of its total |attribution| on each
  lead. The model is fully convolutional with global pooling: the logit of the whole 10 s
  record is attributed (evaluation takes the maximum over sliding 2.5 s windows; the
  probabilities shown are those of the evaluation).

Baselines: ``zero`` (a flat line at 0 mV, the isoelectric level after the high-pass filter) or
``noise`` (8 draws of Gaussian noise at 0.05 mV, seeded). Seeds: GradientShap draws its
baselines and path points from torch's generator, seeded with ``seed`` before each record, so a
record's attributions do not depend on what ran before it.

Over a split of PTB-XL (lead identification), the paper's analyses: heartbeat-aligned **global
attribution maps** (R peaks by :func:`detect_r_peaks`, beats cut from ``BEAT_BEFORE_S`` before to
``BEAT_AFTER_S`` after each R peak and averaged over beats and records), the same for the
**local** attributions (saliency), the share of |attribution| near the R peaks against the share
of the time those windows cover (chance), each target's own trace against its neighbours'
(``NEIGHBOURS`` of :mod:`leadtune.trainables.lead_id.delivery.explain`), and the **PCA of each
set-attention block's** lead representations
(forward hooks on the context's blocks) coloured by the true lead.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

CAPTUM_MISSING = (
    "leadtune explain needs Captum (PyTorch's attribution library), which is not installed: "
    "pip install captum"
)
METHODS = ("gradient_shap", "integrated_gradients", "saliency", "grad_cam")
BASELINES = ("zero", "noise")
NOISE_MV = 0.05  # the noise baseline's standard deviation
NOISE_DRAWS = 8
# Rows of one Captum call (GradientShap expands each row n_samples times): bounds memory.
MAX_ROWS = 96
# Heartbeat windows of the global maps, and the regions whose attribution shares are measured,
# in ms relative to the R peak (inclusive).
BEAT_BEFORE_S, BEAT_AFTER_S = 0.3, 0.5
REGIONS_MS = {"qrs": (-50, 50), "p_pr": (-250, -60), "st_t": (60, 400)}
PTBXL_CREDIT = (
    "ECG: PTB-XL (Wagner et al., Sci Data 2020; PhysioNet), CC BY 4.0. Attributions: leadtune "
    "explain (Captum)."
)


def require_captum() -> Any:
    """``captum.attr``, or a one-line error naming the install command."""
    try:
        import captum.attr
    except ImportError:
        raise ValueError(CAPTUM_MISSING) from None
    return captum.attr


@dataclass
class Settings:
    """How attributions are computed; recorded with every output."""

    method: str = "gradient_shap"
    n_samples: int = 16  # GradientShap: random points per input
    steps: int = 64  # Integrated Gradients: points on the path
    baseline: str = "zero"  # zero | noise
    seed: int = 0

    def check(self, task: str | None) -> Settings:
        """One-line errors for impossible settings; ``task`` None: those of every task."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {self.baseline!r}; known: {', '.join(BASELINES)}")
        if task is not None:
            offered = explainer_of(task).methods
            if self.method not in offered:
                raise ValueError(
                    f"{self.method} is not offered for {task} models; use {', '.join(offered)}"
                )
        if self.n_samples < 1 or self.steps < 2:
            raise ValueError("n_samples must be at least 1 and steps at least 2")
        return self

    def baselines(self, channels: int, samples: int) -> np.ndarray:
        """(n, C, T) float32 baselines: one flat line, or NOISE_DRAWS seeded noise draws."""
        if self.baseline == "zero":
            return np.zeros((1, channels, samples), dtype=np.float32)
        rng = np.random.default_rng(self.seed)
        return (NOISE_MV * rng.standard_normal((NOISE_DRAWS, channels, samples))).astype(np.float32)

    def recorded(self) -> dict[str, Any]:
        used = asdict(self)
        if self.method != "gradient_shap":
            used["n_samples"] = None
        if self.method != "integrated_gradients":
            used["steps"] = None
        if self.method in ("saliency", "grad_cam"):
            used["baseline"] = None
        return used


# -- attributions --------------------------------------------------------------------------------


def attribute(
    forward: Callable[[Any], Any],
    inputs: np.ndarray,
    targets: Sequence[int],
    settings: Settings,
    layer: Any = None,
) -> np.ndarray:
    """Attributions of ``forward(x)[i, targets[i]]`` for each row i of ``inputs`` (B, C, T).

    Returns (B, C, T), or (B, T) for grad_cam. Rows are sent in chunks (GradientShap expands each
    row ``n_samples`` times). ``forward`` maps (B, C, T) to (B, outputs)."""
    import torch

    attr = require_captum()
    x = torch.as_tensor(np.ascontiguousarray(inputs, dtype=np.float32))
    base = torch.as_tensor(settings.baselines(x.shape[1], x.shape[2]))
    per_row = settings.n_samples if settings.method == "gradient_shap" else 1
    chunk = max(1, MAX_ROWS // per_row)
    parts = []
    with seeded(settings.seed):
        for start in range(0, len(x), chunk):
            found = _attribute_rows(attr, forward, x, base, start, chunk, targets, settings, layer)
            parts.append(found)
    return np.concatenate(parts)


@contextlib.contextmanager
def seeded(seed: int):
    """Captum's GradientShap draws its baselines from torch's generator and its path points
    from NumPy's global one: both seeded here, and both restored afterwards."""
    import torch

    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


def _attribute_rows(attr, forward, x, base, start, chunk, targets, settings, layer) -> np.ndarray:
    """One chunk of rows of :func:`attribute`."""
    rows = x[start : start + chunk]
    target = [int(t) for t in targets[start : start + chunk]]
    if settings.method == "gradient_shap":
        found = attr.GradientShap(forward).attribute(
            rows, baselines=base, n_samples=settings.n_samples, target=target
        )
    elif settings.method == "integrated_gradients":
        found = attr.IntegratedGradients(forward).attribute(
            rows, baselines=base[:1].expand_as(rows), n_steps=settings.steps,
            target=target, internal_batch_size=MAX_ROWS,
        )  # fmt: skip
    elif settings.method == "saliency":
        rows = rows.clone().requires_grad_()  # (Captum warns when it has to set this itself)
        found = attr.Saliency(forward).attribute(rows, target=target, abs=False)
    else:
        cam = attr.LayerGradCam(forward, layer).attribute(
            rows, target=target, relu_attributions=True
        )
        found = attr.LayerAttribution.interpolate(cam, (x.shape[2],), "linear")[:, 0]
    return found.detach().float().numpy()


def completeness(attributions: np.ndarray, differences: np.ndarray) -> dict[str, Any]:
    """Integrated Gradients' check: per target, the sum of its attributions against
    output(x) - output(baseline); the largest gap relative to the difference."""
    sums = attributions.reshape(len(attributions), -1).sum(axis=1)
    gaps = np.abs(sums - differences) / np.maximum(np.abs(differences), 1e-6)
    return {
        "sums": np.round(sums, 4).tolist(),
        "differences": np.round(differences, 4).tolist(),
        "largest_relative_gap": float(gaps.max()),
    }


def lead_importance(attributions: np.ndarray) -> np.ndarray:
    """(..., C, T) -> (..., C): each lead's share of the total |attribution|."""
    mass = np.abs(attributions).sum(axis=-1)
    total = mass.sum(axis=-1, keepdims=True)
    return np.divide(mass, total, out=np.zeros_like(mass), where=total > 0)


# -- heartbeats ----------------------------------------------------------------------------------


def detect_r_peaks(
    signal: np.ndarray,
    fs: float,
    band_hz: tuple[float, float] = (5.0, 15.0),
    integration_s: float = 0.15,
    refractory_s: float = 0.25,
    threshold: float = 0.3,
) -> np.ndarray:
    """R-peak sample indices of a (K, T) or (T,) ECG, with SciPy.

    Pan-Tompkins in outline, over all leads at once: a 5-15 Hz Butterworth band-pass
    (zero-phase), the squared first difference summed over leads, a moving-window integration of
    150 ms; peaks of that envelope above ``threshold`` times its 99th percentile, at least
    ``refractory_s`` apart (``scipy.signal.find_peaks``). Each is then moved to the apex of the
    spatial magnitude (sum over leads of |x - median|) within 60 ms, which is the R (or S) wave
    of the leads with the largest QRS."""
    from scipy.signal import butter, find_peaks, sosfiltfilt

    x = np.atleast_2d(np.asarray(signal, dtype=np.float64))
    samples = x.shape[1]
    low, high = band_hz
    high = min(high, 0.45 * fs)
    if samples < 3 * int(fs) // 2 or low >= high:
        return np.zeros(0, dtype=np.int64)
    sos = butter(2, (low, high), btype="bandpass", fs=fs, output="sos")
    filtered = sosfiltfilt(sos, x, axis=1)
    energy = (np.diff(filtered, axis=1, prepend=filtered[:, :1]) ** 2).sum(axis=0)
    width = max(1, round(integration_s * fs))
    envelope = np.convolve(energy, np.ones(width) / width, mode="same")
    level = np.percentile(envelope, 99)
    if level <= 0:
        return np.zeros(0, dtype=np.int64)
    distance = max(1, round(refractory_s * fs))
    found, _ = find_peaks(envelope, height=threshold * level, distance=distance)
    magnitude = np.abs(x - np.median(x, axis=1, keepdims=True)).sum(axis=0)
    half = max(1, round(0.06 * fs))
    refined: list[int] = []
    for peak in found:
        lo, hi = max(0, peak - half), min(samples, peak + half + 1)
        at = lo + int(np.argmax(magnitude[lo:hi]))
        if refined and at - refined[-1] < distance:  # two envelope peaks on one QRS
            if magnitude[at] > magnitude[refined[-1]]:
                refined[-1] = at
            continue
        refined.append(at)
    return np.asarray(refined, dtype=np.int64)


def beat_windows(
    array: np.ndarray, peaks: np.ndarray, before: int, after: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n, ..., before + after + 1) windows of ``array`` (..., T) around each peak whose window
    lies inside the record, and those peaks."""
    samples = array.shape[-1]
    kept = np.asarray([p for p in peaks if p - before >= 0 and p + after < samples], dtype=int)
    if not len(kept):
        return np.zeros((0, *array.shape[:-1], before + after + 1), array.dtype), kept
    index = kept[:, None] + np.arange(-before, after + 1)[None, :]  # (n, W)
    windows = np.take(array, index, axis=-1)  # (..., n, W)
    return np.moveaxis(windows, -2, 0), kept


def region_mask(peaks: np.ndarray, samples: int, lo: int, hi: int) -> np.ndarray:
    """(T,) True within [r + lo, r + hi] samples of any peak r."""
    mask = np.zeros(samples, dtype=bool)
    for peak in peaks:
        mask[max(0, peak + lo) : max(0, min(samples, peak + hi + 1))] = True
    return mask


def region_shares(attributions: np.ndarray, peaks: np.ndarray, fs: float) -> dict[str, Any]:
    """Share of |attribution| (summed over all but the last axis) in each region around the R
    peaks, and the share of time samples the region covers (chance)."""
    mass = np.abs(attributions).reshape(-1, attributions.shape[-1]).sum(axis=0)
    total = float(mass.sum())
    shares = {}
    for name, (lo_ms, hi_ms) in REGIONS_MS.items():
        mask = region_mask(peaks, len(mass), round(lo_ms * fs / 1000), round(hi_ms * fs / 1000))
        shares[name] = {
            "share": float(mass[mask].sum() / total) if total > 0 else float("nan"),
            "chance": float(mask.mean()),
        }
    return shares


# -- figures -------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, credit: str | None, layout: tuple | None = None,
                credit_y: float = 0.005) -> Path:  # fmt: skip
    """An explanation figure's last steps: the data's credit line (where the data asks for one),
    the layout (``tight_layout``'s rect, when given), the file at 110 dpi; the figure is closed."""
    if credit:
        fig.text(0.01, credit_y, credit, fontsize=6, color="0.4")
    if layout is not None:
        fig.tight_layout(rect=layout)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_traces(
    signal: np.ndarray,
    colour: np.ndarray,
    leads: Sequence[str],
    fs: float,
    title: str,
    path: Path,
    colour_label: str = "attribution",
    credit: str | None = None,
    signed: bool = True,
) -> Path:
    """The K traces (mV against seconds), each drawn in the colour of its attribution: red
    pushes the output up, blue down (unsigned: darker = more)."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize

    plt = _pyplot()
    channels, samples = signal.shape
    t = np.arange(samples) / fs
    # The colour scale ends at the 99.5th percentile of |attribution| (a few extreme samples
    # would otherwise leave every other one pale); beyond it the colour saturates.
    scale = float(np.percentile(np.abs(colour), 99.5)) or float(np.max(np.abs(colour))) or 1.0
    norm = Normalize(-scale, scale) if signed else Normalize(0, scale)
    cmap = plt.get_cmap("coolwarm" if signed else "Reds")
    height = 0.62 * channels + 1.2
    fig, axes = plt.subplots(channels, 1, figsize=(11, height), sharex=True, squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.86, top=1 - 0.45 / height, bottom=0.6 / height,
                        hspace=0.15)  # fmt: skip
    for k, ax in enumerate(axes[:, 0]):
        points = np.stack([t, signal[k]], axis=1)
        segments = np.stack([points[:-1], points[1:]], axis=1)
        values = 0.5 * (colour[k, :-1] + colour[k, 1:])
        ax.plot(t, signal[k], color="0.75", linewidth=0.6, zorder=1)
        lines = LineCollection(segments, cmap=cmap, norm=norm, linewidths=1.8, zorder=2)
        lines.set_array(values)
        ax.add_collection(lines)
        low, high = float(signal[k].min()), float(signal[k].max())
        pad = 0.1 * (high - low) + 0.05
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlim(0, t[-1])
        ax.set_ylabel(leads[k], rotation=0, ha="right", va="center", fontsize=9)
        ax.set_yticks([])
        ax.grid(axis="x", color="0.9", linewidth=0.6)
        ax.set_xticks(np.arange(0, t[-1] + 1e-9, 1.0))
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(title, fontsize=10)
    bar_axes = fig.add_axes((0.875, 0.3, 0.012, 0.4))
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=bar_axes)
    if signed:
        colour_label += "\n(red raises the output,\nblue lowers it)"
    bar.set_label(colour_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return save_figure(fig, path, credit)


def plot_global_maps(
    maps: np.ndarray, mean_beat: np.ndarray, leads: Sequence[str], fs: float, before: int,
    title: str, path: Path, credit: str | None = None,
) -> Path:  # fmt: skip
    """One panel per target lead: mean |attribution| over input leads (rows) and time around the
    R peak (columns), each panel scaled to its own maximum; the target lead's mean beat drawn
    over its own row."""
    plt = _pyplot()
    k, _, width = maps.shape
    ms = (np.arange(width) - before) * 1000 / fs
    cols = 4
    rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.9 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= k:
            ax.axis("off")
            continue
        panel = maps[i] / (maps[i].max() or 1.0)
        ax.imshow(panel, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest",
                  extent=(ms[0], ms[-1], k - 0.5, -0.5))  # fmt: skip
        beat = mean_beat[i]
        spread = float(np.ptp(beat)) or 1.0
        ax.plot(ms, i - 1.6 * (beat - beat.mean()) / spread, color="cyan", linewidth=0.9)
        ax.set_ylim(k - 0.5, -0.5)  # the beat's trace must not widen the panel
        ax.axvline(0, color="white", linewidth=0.5, linestyle=":")
        ax.set_yticks(range(k))
        ax.set_yticklabels(leads, fontsize=6)
        ax.set_title(f"target {leads[i]}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        if i // cols == rows - 1:
            ax.set_xlabel("ms from R peak", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, credit, layout=(0, 0.015, 1, 0.97), credit_y=0.003)


# -- loading input -------------------------------------------------------------------------------


def read_input_record(path: str | Path, loaded: Any, exclude: Sequence[str | int] = ()):
    """(signal (K, T) float32 at the model's rate, leads or channel names, record, notes): a
    WFDB record read and preprocessed like the model's training data, its first 10 s. A model
    that takes any set of leads (its task's ``variable_leads``): every channel; a model of fixed
    leads: those, found by their header names, in its order."""
    from leadtune.trainables.data.preprocess import PreprocessConfig
    from leadtune.trainables.data.records import read_record
    from leadtune.trainables.tasks import get_task

    preprocess = PreprocessConfig(**loaded.preprocess)
    fixed = not get_task(loaded.task).variable_leads
    record = read_record(path, preprocess, require_leads=fixed, exclude=exclude)
    signal = record.signal.astype(np.float32)
    notes = []
    if signal.shape[1] > loaded.samples:
        notes.append(
            f"record is {signal.shape[1] / loaded.fs:.1f} s long: its first 10 s explained"
        )
        signal = signal[:, : loaded.samples]
    if fixed:
        missing = [lead for lead in loaded.leads if lead not in record.leads]
        if missing:
            raise ValueError(
                f"{path}: the {loaded.task} model needs lead(s) {', '.join(missing)}, which the "
                "header does not name"
            )
        signal = signal[[record.leads.index(lead) for lead in loaded.leads]]
        names = list(loaded.leads)
    else:
        names = [
            lead or name or f"ch{i}"
            for i, (lead, name) in enumerate(zip(record.leads, record.channel_names))
        ]
    return np.ascontiguousarray(signal), names, record, notes


def is_ptbxl(path: str | Path) -> bool:
    return "ptbxl" in str(Path(path).resolve()).lower().replace("-", "")


# -- what a task's explainer gets ------------------------------------------------------------------


@dataclass
class RecordRun:
    """One record to explain: a task's explainer writes its figures and arrays to ``out``, adds
    its figures to ``summary`` and returns the files it wrote (``attributions.npz`` last)."""

    loaded: Any
    signal: np.ndarray  # (C, T) float32 mV, the model's input
    names: list[str]  # the channels' names
    record: str  # the record's name, for titles
    settings: Settings
    out: Path
    credit: str | None  # the data's credit line for figures (PTB-XL) or None
    label: str  # the method's name for titles
    base: np.ndarray  # the baselines used
    summary: dict[str, Any]


@dataclass
class SplitRequest:
    """A split to explain (see :class:`RecordRun`): the records the explainer kept, as the
    model's input, and a progress callback to call after each."""

    loaded: Any
    dataset: Any
    rows: np.ndarray
    signals: np.ndarray  # (N, C, T)
    names: list[str]
    split: str
    settings: Settings
    out: Path
    credit: str | None
    base: np.ndarray
    summary: dict[str, Any]
    progress: Callable[[int], None]


def save_arrays(path: Path, settings: Settings, fs: int, base: np.ndarray, axes: str,
                **arrays: Any) -> Path:  # fmt: skip
    """An explanation's arrays (``.npz``) with how they were computed: the settings, the
    baselines, the sampling rate and what the axes are."""
    np.savez_compressed(
        path, **arrays, baselines=base, method=settings.method, n_samples=settings.n_samples,
        steps=settings.steps, baseline=settings.baseline, seed=settings.seed, fs=fs, axes=axes,
    )  # fmt: skip
    return path


def explainer_of(task: str) -> Any:
    """The task's :class:`leadtune.analysis.delivery.Explainer`; an error when it has none."""
    from leadtune.analysis.delivery import DELIVERIES, NOT_REGISTERED, delivery_of

    explainer = delivery_of(task).explainer
    if explainer is None:
        if task not in DELIVERIES:
            raise ValueError(f"leadtune explain: {NOT_REGISTERED.format(task=task)}")
        raise ValueError(f"leadtune explain has no attributions for {task} models")
    return explainer


# -- the command's work --------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def explain_record(loaded: Any, record_path: str, settings: Settings, out: Path,
                   exclude: Sequence[str | int] = ()) -> dict[str, Any]:  # fmt: skip
    """Attributions of one record: figures, ``attributions.npz`` and ``summary.json`` in
    ``out``. Returns the summary."""
    signal, names, record, notes = read_input_record(record_path, loaded, exclude)
    out.mkdir(parents=True, exist_ok=True)
    credit = PTBXL_CREDIT if is_ptbxl(record_path) else None
    fs = loaded.fs
    used = settings.recorded()
    label = {
        "gradient_shap": "GradientShap",
        "integrated_gradients": "Integrated Gradients",
        "saliency": "gradient (saliency)",
        "grad_cam": "Grad-CAM",
    }[settings.method]
    summary: dict[str, Any] = {
        "record": str(record.path),
        "model": loaded.source,
        "task": loaded.task,
        "settings": used,
        "fs": fs,
        "channels": names,
        "notes": notes,
        "files": [],
    }
    base = settings.baselines(*signal.shape)
    run = RecordRun(loaded, signal, names, record.name, settings, out, credit, label, base, summary)
    files = explainer_of(loaded.task).record(run)
    summary["files"] = [str(f) for f in [*files, out / "attributions.npz"]]
    _write_json(out / "summary.json", summary)
    summary["files"].append(str(out / "summary.json"))
    return summary


def _progress(total: int, desc: str) -> Callable[[int], None]:
    """A tqdm bar on a terminal, else a line every 10 records (and at the end)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="rec", file=sys.stderr)

        def update(done: int) -> None:
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

        return update
    started = time.perf_counter()

    def report(done: int) -> None:
        if done % 10 == 0 or done == total:
            print(f"[leadtune] {desc}: {done}/{total} records "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip

    return report


def split_signals(loaded: Any, dataset: Any, split: str, limit: int | None):
    """(signals (N, C, T) in the model's input leads, names, row indices): the split's records
    (those its task's explainer keeps, e.g. the labelled ones), the first ``limit`` of them."""
    rows = dataset.indices(split)
    keep = explainer_of(loaded.task).keep_rows
    if keep is not None:
        rows = keep(dataset, rows)
    if limit:
        rows = rows[:limit]
    if not len(rows):
        raise ValueError(f"the {split} split holds no records to explain")
    order = [dataset.leads.index(lead) for lead in loaded.leads]
    signals = np.ascontiguousarray(dataset.signals[rows][:, order, : loaded.samples], np.float32)
    names = [f"ecg_id {int(e)}" for e in dataset.ecg_ids[rows]]
    return signals, names, rows


def explain_split(loaded: Any, dataset: Any, split: str, limit: int | None, settings: Settings,
                  out: Path, source: str) -> dict[str, Any]:  # fmt: skip
    """A split's explanation (see the module's docstring): figures, arrays and summary.json."""
    signals, names, rows = split_signals(loaded, dataset, split, limit)
    out.mkdir(parents=True, exist_ok=True)
    credit = PTBXL_CREDIT  # a split is always of a PTB-XL folder
    fs = loaded.fs
    leads = list(loaded.leads)
    summary: dict[str, Any] = {
        "model": loaded.source,
        "task": loaded.task,
        "source": str(source),
        "split": split,
        "records": len(rows),
        "settings": settings.recorded(),
        "fs": fs,
    }
    progress = _progress(len(rows), f"explaining {split}")
    base = settings.baselines(len(leads), signals.shape[2])
    run = SplitRequest(loaded, dataset, rows, signals, names, split, settings, out, credit, base,
                       summary, progress)  # fmt: skip
    files = explainer_of(loaded.task).split(run)
    summary["files"] = [str(f) for f in files] + [str(out / "summary.json")]
    _write_json(out / "summary.json", summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few readable lines of what was explained and measured."""
    lines = []
    m = summary.get("measured")
    if summary.get("split"):
        lines.append(
            f"explained {summary['records']} {summary['split']} ECGs of {summary['source']} "
            f"with {summary['model']} ({summary['task']}, {summary['settings']['method']})"
        )
    else:
        lines.append(f"explained {summary['record']} with {summary['model']} ({summary['task']})")
        if summary.get("predicted"):
            lines.append("  predicted: " + " ".join(summary["predicted"]))
        if summary.get("completeness"):
            lines.append(
                "  Integrated Gradients completeness: largest gap "
                f"{100 * summary['completeness']['largest_relative_gap']:.1f} % of "
                "output(x) - output(baseline) (more --steps narrows it)"
            )
        if summary.get("probabilities"):
            lines.append(
                "  probabilities: "
                + ", ".join(f"{k} {v:.2f}" for k, v in summary["probabilities"].items())
            )
    if m:
        lines.append(
            f"  {m['beats']} beats, median heart rate {m['median_heart_rate_bpm']:.0f} bpm, "
            f"lead accuracy (argmax) {m['lead_accuracy_argmax']:.3f}"
        )
        for key, name in (("attribution", summary["settings"]["method"]), ("local", "gradient")):
            regions = m["r_peak_regions"][key]
            parts = [
                f"{region} {100 * r['mean_share']:.1f} % (chance {100 * r['mean_chance']:.1f} %)"
                for region, r in regions.items()
            ]
            lines.append(f"  |{name}| near R: " + ", ".join(parts))
            t = m["traces"][key]
            lines.append(
                f"  |{name}| by trace: own {100 * t['own_trace_share']:.1f} %, per neighbour "
                f"{100 * t['per_neighbour_share']:.1f} %, per other lead "
                f"{100 * t['per_other_share']:.1f} %; own trace first in "
                f"{100 * t['own_trace_first']:.0f} % of targets"
            )
        for s, stage in enumerate(m.get("pca", [])):
            if "precordial_nearest_is_adjacent" in stage:
                where = "encoder output" if s == 0 else f"after block {s}"
                lines.append(
                    f"  PCA {where}: V1..V6 nearest neighbour adjacent for "
                    f"{stage['precordial_nearest_is_adjacent']}/6, order |rho| "
                    f"{stage['precordial_order_spearman']:.2f}"
                )
    if summary.get("lead_importance") and summary.get("split"):
        for name, row in summary["lead_importance"].items():
            ranked = sorted(((v, k) for k, v in row.items() if k != "records"), reverse=True)
            top = ", ".join(f"{k} {100 * v:.0f} %" for v, k in ranked[:3])
            lines.append(f"  {name} ({row['records']} ECGs): top leads {top}")
    lines.append(f"  written: {', '.join(Path(f).name for f in summary['files'])} in "
                 f"{Path(summary['files'][-1]).parent}")  # fmt: skip
    return "\n".join(lines)

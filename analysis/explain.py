"""`leadtune explain`: what in the signal made a model say "V2", or "MI".

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
(:data:`NEIGHBOURS`), and the **PCA of each set-attention block's** lead representations
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
# Neighbours of each lead: adjacent precordial leads, and the limb leads 30 degrees apart on the
# hexaxial circle taken modulo 180 degrees (a lead and its inverse carry the same waveform):
# I 0, aVR 30 (as -aVR), II 60, aVF 90, III 120, aVL 150 (-30) -> back to I.
NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "I": ("aVR", "aVL"),
    "aVR": ("I", "II"),
    "II": ("aVR", "aVF"),
    "aVF": ("II", "III"),
    "III": ("aVF", "aVL"),
    "aVL": ("III", "I"),
    "V1": ("V2",),
    "V2": ("V1", "V3"),
    "V3": ("V2", "V4"),
    "V4": ("V3", "V5"),
    "V5": ("V4", "V6"),
    "V6": ("V5",),
}


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
        if self.method == "grad_cam" and task is not None and task != "diagnosis":
            raise ValueError(
                "grad_cam needs a convolutional diagnosis model; for lead identification use "
                "gradient_shap, integrated_gradients or saliency"
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


class LeadIdOutputs:
    """A lead-ID model as Captum's forward: (B, K, T) -> (B, K * M) logits, so that the target
    (channel k, lead m) is the index k * M + m."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, x: Any) -> Any:
        return self.model(x).flatten(1)


def lead_id_logits(model: Any, signal: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(signal[None], dtype=torch.float32))[0].numpy()


def explain_lead_id(model: Any, signal: np.ndarray, settings: Settings) -> dict[str, np.ndarray]:
    """One (K, T) signal: the logits (K, M), the predicted lead index per channel (K,), and the
    attributions (K targets, K inputs, T) of each channel's predicted-lead logit."""
    logits = lead_id_logits(model, signal)
    predicted = logits.argmax(axis=1)
    channels, classes = logits.shape
    targets = [k * classes + int(predicted[k]) for k in range(channels)]
    inputs = np.broadcast_to(signal, (channels, *signal.shape))
    found = attribute(LeadIdOutputs(model), inputs, targets, settings)
    return {"logits": logits, "predicted": predicted, "attributions": found}


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


# -- lead identification over a split ------------------------------------------------------------


def trace_groups(leads: Sequence[str]) -> np.ndarray:
    """(K, K) codes for target lead i and input lead j: 0 own trace, 1 neighbour, 2 other."""
    codes = np.full((len(leads), len(leads)), 2, dtype=np.int64)
    for i, lead in enumerate(leads):
        for j, other in enumerate(leads):
            if i == j:
                codes[i, j] = 0
            elif other in NEIGHBOURS.get(lead, ()):
                codes[i, j] = 1
    return codes


def trace_shares(shares: np.ndarray, leads: Sequence[str]) -> dict[str, Any]:
    """From (N, K targets, K inputs) shares of |attribution| per input trace: the mean share of
    the target's own trace, of one neighbour's, of one other lead's (per lead, so the group
    sizes do not matter), and how often the own trace ranks first and the first other trace is
    a neighbour (against chance)."""
    codes = trace_groups(leads)
    mean = shares.mean(axis=0)
    per = {
        name: float(np.mean([mean[i, j] for i, j in zip(*np.nonzero(codes == code))]))
        for code, name in enumerate(("own", "neighbour", "other"))
    }
    own_first = float(np.mean(shares.argmax(axis=2) == np.arange(len(leads))[None, :]))
    masked = np.where(codes[None] == 0, -np.inf, shares)
    runner_up = masked.argmax(axis=2)  # (N, K)
    neighbour_second = float(np.mean(codes[np.arange(len(leads))[None, :], runner_up] == 1))
    chance = float(np.mean([(codes[i] == 1).sum() / (len(leads) - 1) for i in range(len(leads))]))
    return {
        "own_trace_share": per["own"],
        "per_neighbour_share": per["neighbour"],
        "per_other_share": per["other"],
        "own_trace_first": own_first,
        "first_other_trace_is_neighbour": neighbour_second,
        "first_other_trace_is_neighbour_chance": chance,
        "by_target": {lead: [float(v) for v in mean[i]] for i, lead in enumerate(leads)},
    }


def context_representations(model: Any, signals: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """Per-lead representations (N, K, D) entering the context (the encoder's output) and after
    each of its attention blocks, by forward hooks; [] for a model without attention blocks."""
    import torch

    blocks = list(getattr(model.context, "blocks", []))
    if not blocks:
        return []
    caught: list[list[np.ndarray]] = [[] for _ in range(len(blocks) + 1)]

    def keep(index: int):
        def hook(module, args, output):
            caught[index].append(output.detach().float().numpy())

        return hook

    def keep_input(module, args):
        caught[0].append(args[0].detach().float().numpy())

    handles = [model.context.register_forward_pre_hook(keep_input)]
    handles += [block.register_forward_hook(keep(i + 1)) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for start in range(0, len(signals), batch):
                model(torch.as_tensor(np.ascontiguousarray(signals[start : start + batch])))
    finally:
        for handle in handles:
            handle.remove()
    return [np.concatenate(parts) for parts in caught]


def pca_summary(
    representations: list[np.ndarray], leads: Sequence[str]
) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """2-D PCA of each stage's (N, K, D) points; per stage the variance explained and whether
    the precordial centroids lie in order: for how many of V1..V6 the nearest other precordial
    centroid is an adjacent one, and the Spearman correlation of the lead's number with its
    position along the centroids' principal direction."""
    from scipy.stats import spearmanr
    from sklearn.decomposition import PCA

    precordial = [i for i, lead in enumerate(leads) if lead.startswith("V")]
    projected, stages = [], []
    for reps in representations:
        n, k, d = reps.shape
        pca = PCA(n_components=2, random_state=0)
        points = pca.fit_transform(reps.reshape(n * k, d)).reshape(n, k, 2)
        projected.append(points.astype(np.float32))
        centroids = points.mean(axis=0)
        stage: dict[str, Any] = {
            "explained_variance": [float(v) for v in pca.explained_variance_ratio_],
        }
        if len(precordial) >= 3:
            c = centroids[precordial]
            dist = np.linalg.norm(c[:, None] - c[None], axis=2) + np.diag(np.full(len(c), np.inf))
            nearest = dist.argmin(axis=1)
            stage["precordial_nearest_is_adjacent"] = int(
                np.sum(np.abs(nearest - np.arange(len(c))) == 1)
            )
            centred = c - c.mean(axis=0)
            direction = np.linalg.svd(centred, full_matrices=False)[2][0]
            rho = spearmanr(np.arange(len(c)), centred @ direction).statistic
            stage["precordial_order_spearman"] = float(abs(rho))
        stages.append(stage)
    return projected, stages


@dataclass
class SplitRun:
    """What a split's lead-ID explanation accumulates."""

    leads: tuple[str, ...]
    before: int
    after: int

    def __post_init__(self) -> None:
        k, w = len(self.leads), self.before + self.after + 1
        self.global_sum = np.zeros((k, k, w))
        self.local_sum = np.zeros((k, k, w))
        self.beat_sum = np.zeros((k, w))
        self.beats = 0
        self.records: list[str] = []
        self.heart_rates: list[float] = []
        self.shares: dict[str, list[dict]] = {"attribution": [], "local": []}
        self.trace: dict[str, list[np.ndarray]] = {"attribution": [], "local": []}
        self.correct: list[float] = []

    def add(self, name: str, signal: np.ndarray, found: np.ndarray, local: np.ndarray,
            peaks: np.ndarray, fs: float, predicted: np.ndarray) -> None:  # fmt: skip
        self.records.append(name)
        self.correct.append(float(np.mean(predicted == np.arange(len(predicted)))))
        if len(peaks) > 1:
            self.heart_rates.append(60.0 * fs / float(np.median(np.diff(peaks))))
        for key, values in (("attribution", found), ("local", local)):
            self.shares[key].append(region_shares(values, peaks, fs))
            self.trace[key].append(lead_importance(values))
        windows, _ = beat_windows(np.abs(found), peaks, self.before, self.after)
        local_windows, _ = beat_windows(np.abs(local), peaks, self.before, self.after)
        beats, _ = beat_windows(signal, peaks, self.before, self.after)
        self.global_sum += windows.sum(axis=0)
        self.local_sum += local_windows.sum(axis=0)
        self.beat_sum += beats.sum(axis=0)
        self.beats += len(windows)

    def measured(self) -> dict[str, Any]:
        def region_summary(rows: list[dict]) -> dict[str, Any]:
            out = {}
            for region in REGIONS_MS:
                share = np.array([r[region]["share"] for r in rows])
                chance = np.array([r[region]["chance"] for r in rows])
                out[region] = {
                    "window_ms": list(REGIONS_MS[region]),
                    "mean_share": float(np.nanmean(share)),
                    "mean_chance": float(np.mean(chance)),
                    "ratio": float(np.nanmean(share) / np.mean(chance)),
                    "records_above_chance": float(np.mean(share > chance)),
                }
            return out

        return {
            "records": len(self.records),
            "beats": self.beats,
            "median_heart_rate_bpm": float(np.median(self.heart_rates))
            if self.heart_rates
            else None,
            "lead_accuracy_argmax": float(np.mean(self.correct)),
            "r_peak_regions": {k: region_summary(v) for k, v in self.shares.items()},
            "traces": {k: trace_shares(np.stack(v), self.leads) for k, v in self.trace.items()},
        }


def explain_lead_id_split(
    model: Any,
    signals: np.ndarray,
    names: Sequence[str],
    leads: Sequence[str],
    fs: int,
    settings: Settings,
    progress: Callable[[int], None] | None = None,
) -> tuple[SplitRun, dict[str, Any], list[np.ndarray]]:
    """Global and local maps, region and trace shares over (N, 12, T) signals whose channels
    are in ``leads`` order (the true leads), and the PCA of the context's blocks."""
    local_settings = Settings(method="saliency", seed=settings.seed)
    run = SplitRun(tuple(leads), round(BEAT_BEFORE_S * fs), round(BEAT_AFTER_S * fs))
    for i, (name, signal) in enumerate(zip(names, signals)):
        signal = np.ascontiguousarray(signal, dtype=np.float32)
        found = explain_lead_id(model, signal, settings)
        local = (
            found["attributions"]
            if settings.method == "saliency"
            else explain_lead_id(model, signal, local_settings)["attributions"]
        )
        peaks = detect_r_peaks(signal, fs)
        run.add(str(name), signal, found["attributions"], local, peaks, fs, found["predicted"])
        if progress:
            progress(i + 1)
    measured = run.measured()
    representations = context_representations(model, np.asarray(signals, dtype=np.float32))
    projected, stages = pca_summary(representations, leads) if representations else ([], [])
    measured["pca"] = stages
    return run, measured, projected


# -- which leads moved a labelling verdict (leadtune label --explain) ------------------------------


class VerdictMargin:
    """The verdict's margin as a function of the signal: the summed log-probability of the
    hypothesis' labels (on the signal with the hypothesis' inversions undone) minus that of the
    header's labels, over the channels the header names. (B, K, T) -> (B, 1)."""

    def __init__(self, model: Any, rows: list[int], header: list[int], labels: list[int],
                 signs: np.ndarray) -> None:  # fmt: skip
        import torch

        self.model = model
        self.rows = torch.as_tensor(rows, dtype=torch.long)
        self.header = torch.as_tensor(header, dtype=torch.long)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.signs = torch.as_tensor(signs, dtype=torch.float32)[None, :, None]

    def __call__(self, x: Any) -> Any:
        as_named = self.model(x).log_softmax(-1)[:, self.rows, self.header].sum(-1)
        undone = self.model(x * self.signs).log_softmax(-1)[:, self.rows, self.labels].sum(-1)
        return (undone - as_named)[:, None]


def verdict_evidence(loaded: Any, signal: np.ndarray, header_leads: list[str | None],
                     result: Any, steps: int = 16) -> dict[str, Any]:  # fmt: skip
    """For a record whose header was judged: which channels' signals carry the verdict's margin,
    two ways. ``nats_lost_without_channel``: the margin minus the margin of the record with that
    channel left out (the model takes any set of leads), i.e. its own labels' evidence plus what
    it tells the others. ``nats_by_channel``: Integrated Gradients of the margin from a flat
    line, summed over each channel's samples (they add up to margin(x) - margin(flat line));
    in a set model every lead is context for the others, so this spreads wider. The hypothesis
    is the verdict's named reversal, else the best labelling of all (its exchanged channels).
    The first 10 s are explained (the verdict averages longer records' 10 s windows)."""
    import torch

    from leadtune.trainables.lead_id.reversals import REVERSALS

    verdict = result.verdict
    leads = list(loaded.leads)
    reversal = next((r for r in REVERSALS if r.key == verdict.reversal), None)
    if reversal is not None:
        labels, signs = reversal.undo(header_leads)
    else:
        labels, signs = result.assignment, np.ones(len(header_leads))
    rows = [i for i, lead in enumerate(header_leads) if lead in leads and labels[i] in leads]
    x = np.ascontiguousarray(signal[:, : loaded.samples], dtype=np.float32)
    margin = VerdictMargin(loaded.model, rows, [leads.index(header_leads[i]) for i in rows],
                           [leads.index(labels[i]) for i in rows], signs)  # fmt: skip
    settings = Settings(method="integrated_gradients", steps=steps)
    found = attribute(margin, x[None], [0], settings)[0]  # (K, T)
    with torch.no_grad():
        at_x = float(margin(torch.as_tensor(x[None]))[0, 0])
        at_flat = float(margin(torch.zeros(1, *x.shape))[0, 0])
    per_channel = found.sum(axis=1)
    names = [c.header_name or str(c.index) for c in result.channels]
    header = {i: leads.index(header_leads[i]) for i in rows}
    label = {i: leads.index(labels[i]) for i in rows}
    removed = []
    for c in range(len(names)):  # the margin with channel c left out of the record
        keep = [i for i in range(len(names)) if i != c]
        kept_rows = [i for i in rows if i != c]
        if not kept_rows:
            removed.append(at_x)
            continue
        without = VerdictMargin(loaded.model, [keep.index(i) for i in kept_rows],
                                [header[i] for i in kept_rows], [label[i] for i in kept_rows],
                                np.asarray(signs)[keep])  # fmt: skip
        with torch.no_grad():
            removed.append(at_x - float(without(torch.as_tensor(x[keep][None]))[0, 0]))
    return {
        "hypothesis": verdict.reversal or "best labelling",
        "margin_nats": round(at_x, 3),
        # what leaving each channel out of the record takes away from the margin
        "nats_lost_without_channel": {n: round(float(v), 3) for n, v in zip(names, removed)},
        "method": f"integrated_gradients ({steps} steps, flat-line baseline)",
        "margin_at_flat_line_nats": round(at_flat, 3),
        "nats_by_channel": {n: round(float(v), 3) for n, v in zip(names, per_channel)},
    }


def format_evidence(record: str, evidence: dict[str, Any], top: int = 3) -> str:
    def shown(key: str) -> str:
        ranked = sorted(evidence[key].items(), key=lambda kv: -abs(kv[1]))
        return ", ".join(f"{name} {value:+.1f}" for name, value in ranked[:top])

    return (
        f"  why: {evidence['hypothesis']} beats the header's labels by "
        f"{evidence['margin_nats']:.1f} nats (first 10 s); leaving a channel out takes away "
        f"most for {shown('nats_lost_without_channel')} nats; Integrated Gradients puts most "
        f"of the margin on {shown('nats_by_channel')} nats (all leads give context)"
    )


# -- figures -------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    if credit:
        fig.text(0.01, 0.005, credit, fontsize=6, color="0.4")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    if credit:
        fig.text(0.01, 0.003, credit, fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.015, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


LEAD_COLOURS = (
    "#1f77b4", "#aec7e8", "#17becf", "#9edae5", "#2ca02c", "#98df8a",
    "#fee08b", "#fdae61", "#f46d43", "#d73027", "#a50026", "#67001f",
)  # fmt: skip


def plot_pca(projected: list[np.ndarray], leads: Sequence[str], path: Path,
             credit: str | None = None) -> Path:  # fmt: skip
    """One panel per stage (encoder output, then after each attention block): each lead
    representation's first two principal components, coloured by its true lead, with the
    centroids labelled."""
    plt = _pyplot()
    stages = len(projected)
    fig, axes = plt.subplots(1, stages, figsize=(3.3 * stages, 3.6), squeeze=False)
    for s, ax in enumerate(axes[0]):
        points = projected[s]
        for i, lead in enumerate(leads):
            colour = LEAD_COLOURS[i % len(LEAD_COLOURS)]
            ax.scatter(points[:, i, 0], points[:, i, 1], s=4, color=colour, alpha=0.5,
                       label=lead, linewidths=0)  # fmt: skip
            cx, cy = points[:, i].mean(axis=0)
            ax.text(cx, cy, lead, fontsize=7, ha="center", va="center", weight="bold")
        ax.set_title("encoder output" if s == 0 else f"after block {s}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, -1].legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle("PCA of the per-lead representations, coloured by true lead", fontsize=10)
    if credit:
        fig.text(0.01, 0.005, credit, fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    if credit:
        fig.text(0.01, 0.005, credit, fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- loading input -------------------------------------------------------------------------------


def read_input_record(path: str | Path, loaded: Any, exclude: Sequence[str | int] = ()):
    """(signal (K, T) float32 at the model's rate, leads or channel names, record, notes): a
    WFDB record read and preprocessed like the model's training data. Lead ID: any K channels,
    the first 10 s. Diagnosis: the model's leads, found by their header names, in its order."""
    from leadtune.trainables.data.preprocess import PreprocessConfig
    from leadtune.trainables.data.records import read_record

    preprocess = PreprocessConfig(**loaded.preprocess)
    diagnosis = loaded.task == "diagnosis"
    record = read_record(path, preprocess, require_leads=diagnosis, exclude=exclude)
    signal = record.signal.astype(np.float32)
    notes = []
    if signal.shape[1] > loaded.samples:
        notes.append(
            f"record is {signal.shape[1] / loaded.fs:.1f} s long: its first 10 s explained"
        )
        signal = signal[:, : loaded.samples]
    if diagnosis:
        missing = [lead for lead in loaded.leads if lead not in record.leads]
        if missing:
            raise ValueError(
                f"{path}: the diagnosis model needs lead(s) {', '.join(missing)}, which the "
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
    if loaded.task == "lead_id":
        found = explain_lead_id(loaded.model, signal, settings)
        attributions, predicted = found["attributions"], found["predicted"]
        leads = list(loaded.leads)
        predicted_leads = [leads[int(p)] for p in predicted]
        own = attributions[np.arange(len(names)), np.arange(len(names))]
        files = [
            plot_traces(
                signal, own, [f"{n}\n-> {p}" for n, p in zip(names, predicted_leads)], fs,
                f"{record.name}: {label} of each channel's predicted-lead logit over its own "
                f"trace ({loaded.source})", out / "overview.png", credit=credit,
            )
        ]  # fmt: skip
        for k, lead in enumerate(predicted_leads):
            files.append(
                plot_traces(
                    signal, attributions[k], names, fs,
                    f"{record.name}: {label} of channel {names[k]}'s logit for {lead}, over "
                    "every input trace", out / f"target_{k:02d}_{names[k]}_as_{lead}.png",
                    credit=credit,
                )
            )  # fmt: skip
        np.savez_compressed(
            out / "attributions.npz", attributions=attributions.astype(np.float32),
            signal=signal, logits=found["logits"], predicted=predicted,
            channels=np.array(names), leads=np.array(leads), baselines=base,
            method=settings.method, n_samples=settings.n_samples, steps=settings.steps,
            baseline=settings.baseline, seed=settings.seed, fs=fs,
            axes="attributions: (target channel, input channel, time)",
        )  # fmt: skip
        if settings.method == "integrated_gradients":
            at_base = lead_id_logits(loaded.model, base[0])
            summary["completeness"] = completeness(
                attributions, found["logits"][np.arange(len(names)), predicted]
                - at_base[np.arange(len(names)), predicted],
            )  # fmt: skip
        summary["predicted"] = predicted_leads
        summary["trace_shares"] = {
            names[k]: [round(float(v), 4) for v in lead_importance(attributions[k])]
            for k in range(len(names))
        }
        peaks = detect_r_peaks(signal, fs)
        if len(peaks) > 1:
            summary["r_peaks"] = peaks.tolist()
            summary["r_peak_regions"] = region_shares(attributions, peaks, fs)
    else:
        from leadtune.trainables.tasks import get_task

        found = explain_diagnosis(loaded.model, signal, settings)
        attributions = found["attributions"]
        classes = list(loaded.config.classes)
        probabilities = np.asarray(
            get_task("diagnosis").predict(loaded.model, loaded.config, fs, signal[None])
        )[0]
        files = []
        if settings.method == "grad_cam":
            for c, name in enumerate(classes):
                colour = np.broadcast_to(attributions[c], signal.shape)
                files.append(
                    plot_traces(
                        signal, colour, names, fs,
                        f"{record.name}: Grad-CAM of {name} (p = {probabilities[c]:.2f}) on "
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
                        f"{record.name}: {label} of {name} (p = {probabilities[c]:.2f}) "
                        f"({loaded.source})", out / f"class_{name}.png", credit=credit,
                    )
                )  # fmt: skip
            files.append(
                plot_lead_importance(
                    importance, classes, names,
                    f"{record.name}: each lead's share of {label} |attribution| per class",
                    out / "lead_importance.png", credit=credit,
                )
            )  # fmt: skip
            summary["lead_importance"] = {
                name: dict(zip(names, np.round(importance[c], 4).tolist()))
                for c, name in enumerate(classes)
            }
        np.savez_compressed(
            out / "attributions.npz", attributions=attributions.astype(np.float32),
            signal=signal, logits=found["logits"], probabilities=probabilities,
            classes=np.array(classes), leads=np.array(names), baselines=base,
            method=settings.method, n_samples=settings.n_samples, steps=settings.steps,
            baseline=settings.baseline, seed=settings.seed, fs=fs,
            axes="attributions: (class, lead, time); grad_cam: (class, time)",
        )  # fmt: skip
        if settings.method == "integrated_gradients":
            at_base = explain_diagnosis(loaded.model, base[0], Settings("saliency"))["logits"]
            summary["completeness"] = completeness(attributions, found["logits"] - at_base)
        summary["probabilities"] = dict(zip(classes, np.round(probabilities, 4).tolist()))
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
    (diagnosis: those with a superclass label), the first ``limit`` of them."""
    rows = dataset.indices(split)
    if loaded.task == "diagnosis":
        rows = rows[dataset.superclasses[rows].any(axis=1)]
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
    if loaded.task == "lead_id":
        run, measured, projected = explain_lead_id_split(
            loaded.model, signals, names, leads, fs, settings, progress
        )
        beats = max(run.beats, 1)
        global_maps, local_maps = run.global_sum / beats, run.local_sum / beats
        mean_beat = run.beat_sum / beats
        summary["measured"] = measured
        files = [
            plot_global_maps(
                global_maps, mean_beat, leads, fs, run.before,
                f"Global attribution maps: mean |{settings.method}| around the R peak, "
                f"{run.beats} beats of {len(rows)} {split} ECGs ({loaded.source})",
                out / "global_maps.png", credit,
            ),
            plot_global_maps(
                local_maps, mean_beat, leads, fs, run.before,
                f"Local attributions: mean |gradient| around the R peak, {run.beats} beats of "
                f"{len(rows)} {split} ECGs ({loaded.source})", out / "local_maps.png", credit,
            ),
        ]  # fmt: skip
        if projected:
            files.append(plot_pca(projected, leads, out / "pca_blocks.png", credit))
        np.savez_compressed(
            out / "global_maps.npz", global_maps=global_maps.astype(np.float32),
            local_maps=local_maps.astype(np.float32), mean_beat=mean_beat.astype(np.float32),
            beats=run.beats, before=run.before, after=run.after, leads=np.array(leads),
            records=np.array(run.records), baselines=base,
            trace_shares=np.stack(run.trace["attribution"]).astype(np.float32),
            local_trace_shares=np.stack(run.trace["local"]).astype(np.float32),
            pca=np.stack(projected) if projected else np.zeros(0),
            method=settings.method, n_samples=settings.n_samples, steps=settings.steps,
            baseline=settings.baseline, seed=settings.seed, fs=fs,
            axes="maps: (target lead, input lead, ms from R); trace_shares: (record, target, "
            "input); pca: (stage, record, lead, 2)",
        )  # fmt: skip
        files.append(out / "global_maps.npz")
    else:
        classes = list(loaded.config.classes)
        labels = dataset.superclasses[rows]
        importance = []
        for i, signal in enumerate(signals):
            found = explain_diagnosis(loaded.model, signal, settings)
            importance.append(lead_importance(found["attributions"]))
            progress(i + 1)
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
        summary["lead_importance"] = {
            name: {
                "records": int(labels[:, c].sum()),
                **dict(zip(leads, np.round(by_class[c], 4).tolist())),
            }
            for c, name in enumerate(classes)
        }
        np.savez_compressed(
            out / "lead_importance.npz", importance=importance.astype(np.float32),
            by_class=by_class.astype(np.float32), labels=labels, classes=np.array(classes),
            leads=np.array(leads), records=np.array(names), baselines=base,
            method=settings.method, n_samples=settings.n_samples, steps=settings.steps,
            baseline=settings.baseline, seed=settings.seed, fs=fs,
            axes="importance: (record, class, lead)",
        )  # fmt: skip
        files.append(out / "lead_importance.npz")
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

"""Lead identification's part in ``leadtune explain`` (and ``leadtune label --explain``): for each
input channel, the logit of the lead the model predicts for it over every channel and sample;
over a split, the paper's heartbeat-aligned global and local maps, each target's own trace
against its neighbours', and the PCA of the set-attention blocks (see
:mod:`leadtune.analysis.explain`, which holds what both tasks share)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leadtune.analysis.explain import (
    BEAT_AFTER_S,
    BEAT_BEFORE_S,
    REGIONS_MS,
    RecordRun,
    Settings,
    SplitRequest,
    _pyplot,
    attribute,
    beat_windows,
    completeness,
    detect_r_peaks,
    lead_importance,
    plot_global_maps,
    plot_traces,
    region_shares,
    save_arrays,
    save_figure,
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
    return save_figure(fig, path, credit, layout=(0, 0.03, 1, 0.95))


def explain_record(run: RecordRun) -> list[Path]:
    """Each channel's predicted-lead logit over its own trace (overview) and over every trace
    (one figure per channel); summary: predictions, trace shares, R-peak regions."""
    loaded, signal, names, out, settings = run.loaded, run.signal, run.names, run.out, run.settings
    fs, summary = loaded.fs, run.summary
    found = explain_lead_id(loaded.model, signal, settings)
    attributions, predicted = found["attributions"], found["predicted"]
    leads = list(loaded.leads)
    predicted_leads = [leads[int(p)] for p in predicted]
    own = attributions[np.arange(len(names)), np.arange(len(names))]
    files = [
        plot_traces(
            signal, own, [f"{n}\n-> {p}" for n, p in zip(names, predicted_leads)], fs,
            f"{run.record}: {run.label} of each channel's predicted-lead logit over its own "
            f"trace ({loaded.source})", out / "overview.png", credit=run.credit,
        )
    ]  # fmt: skip
    for k, lead in enumerate(predicted_leads):
        files.append(
            plot_traces(
                signal, attributions[k], names, fs,
                f"{run.record}: {run.label} of channel {names[k]}'s logit for {lead}, over "
                "every input trace", out / f"target_{k:02d}_{names[k]}_as_{lead}.png",
                credit=run.credit,
            )
        )  # fmt: skip
    save_arrays(
        out / "attributions.npz", settings, fs, run.base,
        "attributions: (target channel, input channel, time)",
        attributions=attributions.astype(np.float32), signal=signal, logits=found["logits"],
        predicted=predicted, channels=np.array(names), leads=np.array(leads),
    )  # fmt: skip
    if settings.method == "integrated_gradients":
        at_base = lead_id_logits(loaded.model, run.base[0])
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
    return [*files, out / "attributions.npz"]


def explain_split(run: SplitRequest) -> list[Path]:
    """The paper's analyses over a split: global and local maps, trace and region shares, PCA."""
    loaded, settings, out, credit = run.loaded, run.settings, run.out, run.credit
    fs, leads, rows, split = loaded.fs, list(loaded.leads), run.rows, run.split
    split_run, measured, projected = explain_lead_id_split(
        loaded.model, run.signals, run.names, leads, fs, settings, run.progress
    )
    beats = max(split_run.beats, 1)
    global_maps, local_maps = split_run.global_sum / beats, split_run.local_sum / beats
    mean_beat = split_run.beat_sum / beats
    run.summary["measured"] = measured
    files = [
        plot_global_maps(
            global_maps, mean_beat, leads, fs, split_run.before,
            f"Global attribution maps: mean |{settings.method}| around the R peak, "
            f"{split_run.beats} beats of {len(rows)} {split} ECGs ({loaded.source})",
            out / "global_maps.png", credit,
        ),
        plot_global_maps(
            local_maps, mean_beat, leads, fs, split_run.before,
            f"Local attributions: mean |gradient| around the R peak, {split_run.beats} beats of "
            f"{len(rows)} {split} ECGs ({loaded.source})", out / "local_maps.png", credit,
        ),
    ]  # fmt: skip
    if projected:
        files.append(plot_pca(projected, leads, out / "pca_blocks.png", credit))
    save_arrays(
        out / "global_maps.npz", settings, fs, run.base,
        "maps: (target lead, input lead, ms from R); trace_shares: (record, target, input); "
        "pca: (stage, record, lead, 2)",
        global_maps=global_maps.astype(np.float32), local_maps=local_maps.astype(np.float32),
        mean_beat=mean_beat.astype(np.float32), beats=split_run.beats,
        before=split_run.before, after=split_run.after, leads=np.array(leads),
        records=np.array(split_run.records),
        trace_shares=np.stack(split_run.trace["attribution"]).astype(np.float32),
        local_trace_shares=np.stack(split_run.trace["local"]).astype(np.float32),
        pca=np.stack(projected) if projected else np.zeros(0),
    )  # fmt: skip
    files.append(out / "global_maps.npz")
    return files

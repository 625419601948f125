"""Diagnosis: the training function a Tune trial, ``leadtune train --task diagnosis`` and the
tests run.

Read top to bottom: :func:`train_diagnosis` builds a :class:`DiagnosisTraining` (the model with
the training split's standardisation inside it, AdamW, the one-cycle or cosine schedule, random
streams, resumed state) and runs its epochs. An epoch trains on random crops (``window_s``),
with label smoothing and mixup where configured, every step checked by the non-finite guard;
validation runs the sliding windows, aggregates them, and reports BCE, macro AUROC, macro F1 at
thresholds chosen on validation, and the Brier score; the checkpoint keeps those thresholds for
the single test evaluation. The plumbing is :mod:`leadtune.trainables.training`'s.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from leadtune.trainables.data.ptbxl import SUPERCLASSES
from leadtune.trainables.diagnosis import metrics
from leadtune.trainables.diagnosis.config import DiagnosisConfig, resolve_leads
from leadtune.trainables.diagnosis.data import DiagnosisData, labelled_rows
from leadtune.trainables.diagnosis.models import create_model
from leadtune.trainables.runtime import apply_gpu_memory_fraction
from leadtune.trainables.tasks import load_trained_model
from leadtune.trainables.training import (
    EpochRun,
    RandomStreams,
    Reporter,
    StepGuard,
    TuneReporter,
    check_finite_outputs,
    iterate_batches,
    resolve_device,
)

TASK = "diagnosis"


def windows(signals: np.ndarray | torch.Tensor, length: int, stride: int):
    """(N, W, C, length) sliding windows of (N, C, T) signals (the last one ends at T)."""
    total = signals.shape[-1]
    if length >= total:
        return signals[:, None]
    starts = list(range(0, total - length + 1, stride))
    if starts[-1] != total - length:
        starts.append(total - length)
    parts = [signals[..., s : s + length] for s in starts]
    return np.stack(parts, axis=1) if isinstance(signals, np.ndarray) else torch.stack(parts, 1)


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, signals: np.ndarray, cfg: DiagnosisConfig,
                          fs: int, device: torch.device, batch_size: int = 256) -> np.ndarray:  # fmt: skip
    """(N, 5) probabilities: each record's sliding windows (or the whole record), aggregated
    by the maximum (the benchmark's rule) or the mean of the window probabilities."""
    model.eval()
    length = signals.shape[-1] if cfg.window_s is None else round(cfg.window_s * fs)
    stride = max(1, round(cfg.eval_stride_s * fs))
    out = []
    for start in range(0, len(signals), max(1, batch_size)):
        chunk = windows(np.ascontiguousarray(signals[start : start + batch_size]), length, stride)
        n, w = chunk.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(chunk.reshape(n * w, *chunk.shape[2:])))
        probs = torch.sigmoid(model(x.to(device)).float()).view(n, w, -1)
        out.append((probs.amax(1) if cfg.aggregate == "max" else probs.mean(1)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(SUPERCLASSES)), np.float32)


def fit_standardisation(model: torch.nn.Module, train: np.ndarray, how: str) -> None:
    """The training split's mean and standard deviation, into the model's Standardise buffers."""
    if how == "none":
        return
    axes = (0, 2) if how == "per_lead" else (0, 1, 2)
    mean = train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = train.std(axis=axes, keepdims=True, dtype=np.float64)
    shape = model.standardise.mean.shape
    with torch.no_grad():
        model.standardise.mean.copy_(torch.from_numpy(np.broadcast_to(mean, shape).copy()))
        model.standardise.std.copy_(torch.from_numpy(np.broadcast_to(std, shape).copy()))


class DiagnosisTraining(EpochRun):
    """One run's state; :func:`train_diagnosis` drives it epoch by epoch."""

    task = TASK

    def __init__(self, cfg: DiagnosisConfig, data: DiagnosisData, reporter: Reporter) -> None:
        self.cfg, self.data, self.reporter = cfg, data, reporter
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        if self.device.type == "cuda":
            apply_gpu_memory_fraction(self.device)
        self.streams = RandomStreams.seeded(cfg.seed, self.device)
        columns = [data.leads.index(lead) for lead in resolve_leads(cfg.leads)]
        self.train = np.ascontiguousarray(data.train[: cfg.max_train_records][:, columns])
        self.train_labels = data.train_labels[: cfg.max_train_records]
        self.val = np.ascontiguousarray(data.val[: cfg.max_val_records][:, columns])
        self.val_labels = data.val_labels[: cfg.max_val_records]
        if len(self.train) == 0 or len(self.val) == 0:
            raise ValueError("the training and validation splits must both hold labelled records")
        self.window = None if cfg.window_s is None else round(cfg.window_s * data.fs)
        if self.window is not None and self.window > self.train.shape[-1]:
            raise ValueError(
                f"window_s {cfg.window_s} s is longer than the records "
                f"({self.train.shape[-1] / data.fs:g} s)"
            )
        self.model = create_model(cfg).to(self.device)
        fit_standardisation(self.model, self.train, cfg.standardise)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay
        )
        self.steps_per_epoch = math.ceil(len(self.train) / cfg.batch_size)
        total = cfg.epochs * self.steps_per_epoch
        if cfg.schedule == "onecycle":
            # fastai's defaults, as the benchmark trained: 30 % warm-up from lr/25, cosine decay
            # to lr/2.5e5, beta1 cycling 0.95 -> 0.85 -> 0.95
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=cfg.lr, total_steps=total, pct_start=0.3,
                div_factor=25.0, final_div_factor=1e4, base_momentum=0.85, max_momentum=0.95,
            )  # fmt: skip
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=total, eta_min=cfg.lr * 1e-4
            )
        self.guard = StepGuard(skip=cfg.skip_nonfinite_steps)
        self.start_epoch, self.best_auroc, self.stale_epochs = 0, -math.inf, 0

    def resume(self, folder: Path) -> None:
        state = self.restore(folder)
        self.best_auroc = state["best_val_macro_auroc"]

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Random crops (or whole records), smoothed targets, mixup."""
        cfg, generator = self.cfg, self.streams.augment
        x = torch.from_numpy(self.train[rows])
        y = torch.from_numpy(self.train_labels[rows])
        if self.window is not None and self.window < x.shape[-1]:
            starts = torch.randint(0, x.shape[-1] - self.window + 1, (len(rows),),
                                   generator=generator)  # fmt: skip
            steps = starts[:, None] + torch.arange(self.window)[None, :]
            x = torch.gather(x, 2, steps[:, None, :].expand(-1, x.shape[1], -1))
        if cfg.label_smoothing:
            y = y * (1 - cfg.label_smoothing) + cfg.label_smoothing / 2
        if cfg.mixup_alpha > 0:
            alpha = torch.tensor(float(cfg.mixup_alpha))
            lam = float(torch.distributions.Beta(alpha, alpha).sample())  # global, seeded stream
            order = torch.randperm(len(rows), generator=generator)
            x = lam * x + (1 - lam) * x[order]
            y = lam * y + (1 - lam) * y[order]
        return x.to(self.device), y.to(self.device)

    def train_epoch(self, epoch: int, progress: bool) -> dict[str, float]:
        started = time.perf_counter()
        self.model.train()
        total, count = 0.0, 0
        self.guard.skipped = 0
        batches: Any = iterate_batches(len(self.train), self.cfg.batch_size, self.streams.batches)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=self.steps_per_epoch, leave=False,
                           desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                           disable=not sys.stderr.isatty())  # fmt: skip
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        for step, rows in enumerate(batches, start=1):
            if len(rows) < 2:  # BatchNorm needs two examples: a last batch of one is left out
                self.scheduler.step()
                continue
            x, y = self.batch(rows)
            kept = self.guard.snapshot(self.model) if self.guard.skip else None
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = self.model(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ids = self.data.train_ids[rows] if self.data.train_ids is not None else rows
            if self.guard.step_is_finite(loss, parameters, epoch + 1, step, ids):
                self.optimizer.step()
                total += float(loss.detach()) * len(rows)
                count += len(rows)
            elif kept is not None:
                self.guard.restore(self.model, kept)
            self.scheduler.step()
        return {
            "train_loss": total / max(count, 1),
            "train_ecg_per_second": count / (time.perf_counter() - started),
            "started": started,
        }

    def validate(self, epoch: int, trained: dict[str, float]) -> dict[str, Any]:
        timed = time.perf_counter()
        probs = predict_probabilities(self.model, self.val, self.cfg, self.data.fs, self.device)
        infer_ms = 1000.0 * (time.perf_counter() - timed) / max(len(probs), 1)
        ids = self.data.val_ids if self.data.val_ids is not None else np.arange(len(probs))
        check_finite_outputs(probs, ids[: len(probs)], f"epoch {epoch + 1}")
        labels = self.val_labels
        thresholds = metrics.choose_thresholds(probs, labels)
        clipped = np.clip(probs, 1e-7, 1 - 1e-7)
        bce = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
        found = {
            "epoch": epoch + 1,
            "train_loss": trained["train_loss"],
            "val_loss": float(bce),
            **metrics.summarise(probs, labels, thresholds, SUPERCLASSES, "val"),
            "val_thresholds": [float(t) for t in thresholds],
            # the schedule's value now (the parameter lr is where it started)
            "current_lr": self.scheduler.get_last_lr()[0],
            "epoch_seconds": time.perf_counter() - trained["started"],
            "train_ecg_per_second": trained["train_ecg_per_second"],
            "infer_ms_per_ecg": infer_ms,  # validation inference on the trial's device
        }
        improved = found["val_macro_auroc"] > self.best_auroc
        if improved:
            self.best_auroc = found["val_macro_auroc"]
        found["early_stopped"] = self.patience_ran_out(improved)
        return found

    def bookkeeping(self) -> dict[str, Any]:
        return {"best_val_macro_auroc": self.best_auroc}

    def reported(self, metrics_now: dict[str, Any]) -> dict[str, Any] | None:
        # the thresholds (a list) stay in the checkpoint for the single test evaluation
        return {k: v for k, v in metrics_now.items() if k != "val_thresholds"}


def train_diagnosis(
    config: dict[str, Any],
    data: DiagnosisData | None = None,
    reporter: Reporter | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one diagnosis model; report metrics and a checkpoint every epoch (resuming from
    ``reporter.latest_checkpoint()`` where there is one). Returns the last epoch's metrics."""
    cfg = DiagnosisConfig.from_dict(config)
    if data is None:
        raise ValueError("train_diagnosis needs data=DiagnosisData(...)")
    run = DiagnosisTraining(cfg, data, reporter if reporter is not None else TuneReporter())
    return run.run(progress)


def evaluate_model(model: torch.nn.Module, cfg: DiagnosisConfig, thresholds: Any, fs: int,
                   dataset: Any, split: str = "test", n_boot: int = 1000) -> dict[str, Any]:  # fmt: skip
    """The split's figures (labelled records), F1 at ``thresholds`` (validation's choice)."""
    rows = labelled_rows(dataset, split)
    if len(rows) == 0:
        raise ValueError(f"the {split!r} split of {dataset.path} holds no labelled records")
    columns = [list(dataset.leads).index(lead) for lead in resolve_leads(cfg.leads)]
    signals = np.ascontiguousarray(dataset.signals[rows][:, columns])
    probs = predict_probabilities(model, signals, cfg, fs, torch.device("cpu"))
    check_finite_outputs(probs, dataset.ecg_ids[rows], f"the {split} split")
    labels = np.asarray(dataset.superclasses)[rows].astype(np.float32)
    thresholds = thresholds or [0.5] * labels.shape[1]
    return metrics.summarise(probs, labels, thresholds, SUPERCLASSES, split, n_boot=n_boot)


def evaluate_checkpoint(checkpoint: str | Path, dataset: Any, split: str = "test",
                        n_boot: int = 1000) -> dict[str, Any]:  # fmt: skip
    """The split's figures for a checkpoint, F1 at the thresholds its validation chose."""
    model, cfg, state = load_trained_model(checkpoint)
    fs = int((state.get("data") or {}).get("fs", dataset.fs))
    thresholds = (state.get("metrics") or {}).get("val_thresholds")
    return evaluate_model(model, cfg, thresholds, fs, dataset, split, n_boot)


def paired_test(checkpoint_a: str | Path, checkpoint_b: str | Path, dataset: Any,
                split: str = "test", n_boot: int = 2000) -> dict[str, Any]:  # fmt: skip
    """Two checkpoints on the same labelled ECGs of a split: macro AUROC of each, their
    difference with a paired ECG-level bootstrap interval and p-value."""
    rows = labelled_rows(dataset, split)
    labels = np.asarray(dataset.superclasses)[rows].astype(np.float32)
    probs = []
    for checkpoint in (checkpoint_a, checkpoint_b):
        model, cfg, state = load_trained_model(checkpoint)
        fs = int((state.get("data") or {}).get("fs", dataset.fs))
        columns = [list(dataset.leads).index(lead) for lead in resolve_leads(cfg.leads)]
        signals = np.ascontiguousarray(dataset.signals[rows][:, columns])
        probs.append(predict_probabilities(model, signals, cfg, fs, torch.device("cpu")))
    found = metrics.paired_bootstrap_macro_auroc(probs[0], probs[1], labels, n_boot)
    return {"test": f"paired bootstrap of the macro AUROC difference ({n_boot} ECG-level "
            "resamples)", "metric": f"{split}_macro_auroc", "records": int(len(rows)),
            **found}  # fmt: skip

"""Lead identification: the training function that a Ray Tune trial runs, and that runs unchanged
as a plain Python function (``leadtune train``, the benchmark, tests).

Read top to bottom: :func:`train_lead_id` sets up a :class:`LeadIdTraining` (model, optimiser,
schedule, random streams, resumed state) and runs its epochs; each epoch trains on shuffled,
augmented batches (:func:`augment_batch`), every step checked by the non-finite guard, then
validates and writes a checkpoint through the reporter. The plumbing (reporters, checkpoints,
device, random streams, batches, the guard) is task-neutral: :mod:`leadtune.trainables.training`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from leadtune.trainables.lead_id import metrics
from leadtune.trainables.lead_id.config import LeadIdConfig
from leadtune.trainables.lead_id.data import LeadIdData
from leadtune.trainables.lead_id.models import ModelConfig, create_model
from leadtune.trainables.lead_id.robustness import (
    finetune_score,
    hungarian_lead_accuracy,
    validation_conditions,
)
from leadtune.trainables.runtime import apply_gpu_memory_fraction
from leadtune.trainables.tasks import load_trained_model
from leadtune.trainables.training import (
    EpochRun,
    RandomStreams,
    Reporter,
    StepGuard,
    TuneReporter,
    check_finite_outputs,
    device_batches,
    iterate_batches,
    load_checkpoint,
    resolve_device,
)

TASK = "lead_id"


def freeze(model: torch.nn.Module, train_parts: str) -> list[torch.nn.Module]:
    """Stop the parts that ``train_parts`` keeps from learning; returns the frozen modules
    (the training loop keeps them in eval mode, so their BatchNorm statistics stay too)."""
    frozen = {"all": [], "context_head": ["encoder"], "head": ["encoder", "context"]}[train_parts]
    modules = [getattr(model, name) for name in frozen if hasattr(model, name)]
    for module in modules:
        module.requires_grad_(False)
    return modules


def pull_toward(
    parameters: list[torch.nn.Parameter], anchors: list[torch.Tensor], strength: float
) -> None:
    """L2-SP: add ``strength * (w - anchor)`` to each gradient, the gradient of
    ``strength / 2 * ||w - anchor||^2`` (the reported training loss stays the lead loss)."""
    for parameter, anchor in zip(parameters, anchors, strict=True):
        if parameter.grad is not None:
            parameter.grad.add_(parameter.detach() - anchor, alpha=strength)


def lead_columns(config: LeadIdConfig, data_leads: tuple[str, ...]) -> np.ndarray:
    """Indices of the configured leads in the dataset's channel order."""
    return np.array([data_leads.index(lead) for lead in config.leads])


# -- augmentation --------------------------------------------------------------------------------


def augment_batch(
    x: torch.Tensor, config: LeadIdConfig, generator: torch.Generator, fs: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A training batch as the model sees it: leads in random order, the reference's Gaussian
    jitter, and the optional augmentations of ``config`` (gain, time shift, low-pass, lead
    subsets), each drawn per ECG.

    Returns the (B, K, T) signals, the (B, K) label of each position, and a (B, K) mask of the
    leads shown (None: all). Augmentations that are off draw no random numbers, so the
    reference's random streams are those of a run without them.
    """
    batch, n_leads, samples = x.shape
    device = x.device
    labels = torch.arange(n_leads, device=device).expand(batch, n_leads)
    if config.shuffle_leads:
        order = torch.rand(batch, n_leads, generator=generator, device=device).argsort(dim=1)
        x = torch.gather(x, 1, order[:, :, None].expand_as(x))
        labels = order
    if config.jitter_prob > 0 and config.jitter_sigma_max > 0:
        noisy = torch.rand(batch, generator=generator, device=device) < config.jitter_prob
        sigma = torch.empty(batch, device=device).uniform_(
            config.jitter_sigma_min, config.jitter_sigma_max, generator=generator
        )
        sigma = torch.where(noisy, sigma, torch.zeros_like(sigma))
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        x = x + noise * sigma[:, None, None]
    if config.gain_max > 0:
        log_gain = math.log1p(config.gain_max)
        gain = torch.empty(batch, device=device).uniform_(-log_gain, log_gain, generator=generator)
        x = x * gain.exp().to(x.dtype)[:, None, None]
    if config.roll_max > 0:
        shift = torch.randint(
            -config.roll_max, config.roll_max + 1, (batch,), generator=generator, device=device
        )
        steps = (torch.arange(samples, device=device)[None, :] - shift[:, None]) % samples
        x = torch.gather(x, 2, steps[:, None, :].expand_as(x))
    if config.lowpass_prob > 0:
        x = _random_lowpass(x, config.lowpass_prob, fs, generator)
    mask = None
    if config.subset_prob > 0:
        mask = _random_subsets(batch, n_leads, config, generator, device)
    return x, labels, mask


def _random_lowpass(
    x: torch.Tensor, probability: float, fs: int, generator: torch.Generator
) -> torch.Tensor:
    """Zero-phase 4th-order Butterworth-shaped low-pass (cut-off 15-45 Hz, below Nyquist) of a
    random share of the ECGs, applied in the frequency domain: other devices' front-end filters."""
    batch, _, samples = x.shape
    chosen = torch.rand(batch, generator=generator, device=x.device) < probability
    cutoff = torch.empty(batch, device=x.device).uniform_(15.0, 45.0, generator=generator)
    cutoff = cutoff.clamp(max=0.45 * fs)
    frequencies = torch.fft.rfftfreq(samples, d=1.0 / fs).to(x.device)
    response = 1.0 / torch.sqrt(1.0 + (frequencies[None, :] / cutoff[:, None]) ** 8)
    response = torch.where(chosen[:, None], response, torch.ones_like(response))
    filtered = torch.fft.irfft(torch.fft.rfft(x.float(), dim=-1) * response[:, None, :], n=samples)
    return filtered.to(x.dtype)


def _random_subsets(
    batch: int, n_leads: int, config: LeadIdConfig, generator: torch.Generator, device
) -> torch.Tensor:
    """(B, K) mask: for a share ``subset_prob`` of the ECGs a random subset of between
    ``subset_min_leads`` and K leads is shown, the rest of the positions are hidden."""
    chosen = torch.rand(batch, generator=generator, device=device) < config.subset_prob
    shown = torch.randint(
        config.subset_min_leads, n_leads + 1, (batch,), generator=generator, device=device
    )
    shown = torch.where(chosen, shown, torch.full_like(shown, n_leads))
    rank = torch.rand(batch, n_leads, generator=generator, device=device).argsort(dim=1)
    return rank < shown[:, None]


def lead_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over (weighted, shown) leads of the per-lead cross-entropy."""
    per_lead = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    weights = weight[labels.flatten()]
    if mask is not None:
        weights = weights * mask.flatten()
    return (per_lead * weights).sum() / weights.sum()


# -- prediction and validation -------------------------------------------------------------------


@torch.no_grad()
def predict_log_probs(
    model: torch.nn.Module,
    signals: np.ndarray | torch.Tensor,
    device: torch.device,
    batch_size: int = 64,
    amp: bool = False,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Log-probabilities (N, K, M) for signals (N, K, T) in the given lead order.

    ``signals`` may be a tensor already on ``device`` (the data-on-device path): batches are then
    slices of it, and the results come back to the host in one copy at the end. ``mask`` (N, K)
    marks the leads present (None: all).
    """
    model.eval()
    chunks = []
    for start in range(0, len(signals), batch_size):
        if isinstance(signals, torch.Tensor):
            x = signals[start : start + batch_size]
        else:
            batch = np.ascontiguousarray(signals[start : start + batch_size])
            x = torch.from_numpy(batch).to(device, non_blocking=True)
        present = None
        if mask is not None:
            present = torch.from_numpy(np.asarray(mask[start : start + batch_size], dtype=bool))
            present = present.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x, present)
        chunks.append(torch.log_softmax(logits.float(), dim=-1))
    if not chunks:
        return np.zeros((0, signals.shape[1], 0), np.float32)
    return torch.cat(chunks).cpu().numpy()


def validation_metrics(log_probs: np.ndarray, loss_weight: np.ndarray) -> dict[str, float]:
    """Validation loss and lead/set accuracy with argmax and with Hungarian matching."""
    n, k, _ = log_probs.shape
    true = np.broadcast_to(np.arange(k), (n, k))
    nll = -np.take_along_axis(log_probs, true[..., None], axis=-1)[..., 0]
    w = loss_weight[true]
    argmax = metrics.argmax_assign(log_probs)
    hungarian = metrics.hungarian_assign(log_probs)
    return {
        "val_loss": float((nll * w).sum() / w.sum()),
        "val_lead_accuracy": metrics.lead_accuracy(argmax, true),
        "val_set_accuracy": metrics.set_accuracy(argmax, true),
        "val_lead_accuracy_hungarian": metrics.lead_accuracy(hungarian, true),
        "val_set_accuracy_hungarian": metrics.set_accuracy(hungarian, true),
    }


# -- the training run ----------------------------------------------------------------------------


class LeadIdTraining(EpochRun):
    """One training run's state: data views, model, optimiser, schedule, random streams, the
    step guard and early stopping. :func:`train_lead_id` drives it epoch by epoch."""

    task = TASK

    def __init__(
        self,
        cfg: LeadIdConfig,
        data: LeadIdData,
        reporter: Reporter,
        data_on_device: bool | None,
        build_model: Callable[[ModelConfig], torch.nn.Module] | None,
    ) -> None:
        self.cfg, self.data, self.reporter = cfg, data, reporter
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = device = resolve_device(cfg.device)
        self.amp = cfg.amp and device.type == "cuda"
        self.on_device = device.type == "cuda" if data_on_device is None else data_on_device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # batch shapes repeat: let cuDNN pick kernels
            apply_gpu_memory_fraction(device)
        self.streams = RandomStreams.seeded(cfg.seed, device)

        self.columns = lead_columns(cfg, data.leads)
        self.train = data.train[: cfg.max_train_records]
        self.val = np.ascontiguousarray(data.val[: cfg.max_val_records][:, self.columns])
        if len(self.train) == 0 or len(self.val) == 0:
            raise ValueError("the training and validation splits must both hold records")
        self.loss_weight_np = np.array(
            [1.0 if cfg.loss_leads is None or lead in cfg.loss_leads else 0.0 for lead in cfg.leads]
        )
        self.loss_weight = torch.tensor(self.loss_weight_np, dtype=torch.float32, device=device)
        self.val_signals: np.ndarray | torch.Tensor = self.val
        if self.on_device:
            # The whole split lives on the device once; each batch is an index_select there.
            self.train_signals = torch.from_numpy(
                np.ascontiguousarray(self.train[:, self.columns])
            ).to(device)
            self.val_signals = torch.from_numpy(self.val).to(device)

        self.model = (build_model or create_model)(cfg.model_config()).to(device)
        self.frozen = freeze(self.model, cfg.train_parts)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            fused=True if device.type == "cuda" else None,  # one kernel for all parameters
        )
        self.steps_per_epoch = math.ceil(len(self.train) / cfg.batch_size)
        if cfg.lr_schedule == "constant":
            self.scheduler: Any = torch.optim.lr_scheduler.ConstantLR(
                self.optimizer, factor=1.0, total_iters=0
            )
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=cfg.epochs * self.steps_per_epoch, eta_min=cfg.lr_min
            )
        self.guard = StepGuard(skip=cfg.skip_nonfinite_steps)
        self.anchors: list[torch.Tensor] = []  # the init weights of the learning tensors
        self.start_epoch, self.best_val_loss, self.stale_epochs = 0, math.inf, 0
        self.start_val_loss: float | None = None  # the init weights' 12-lead validation loss
        self.conditions = (
            validation_conditions(self.val, seed=cfg.seed) if cfg.robust_validation else []
        )
        if cfg.init_from:
            self.warm_start(Path(cfg.init_from))

    def warm_start(self, folder: Path) -> None:
        """Start from another run's weights (fine-tuning) or a model package's (e.g. imported
        published weights); optimiser and schedule start fresh."""
        from leadtune.trainables.model_package import is_package, package_weights

        if is_package(folder):
            weights = package_weights(folder)
        else:
            weights = load_checkpoint(folder, map_location=self.device)["model"]
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[1:2] or [str(error)]
            raise ValueError(
                f"init_from {folder}: its weights do not fit this model ({first[0].strip()}); "
                "give the same model settings the checkpoint was trained with"
            ) from None
        if self.cfg.anchor_l2 > 0:
            self.anchors = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]

    def measure_start(self) -> None:
        """The init weights' 12-lead validation loss: what a fine-tune must not make worse."""
        if self.cfg.init_from and self.cfg.robust_validation and self.start_val_loss is None:
            log_probs = self.predict(self.val_signals)
            self.start_val_loss = validation_metrics(log_probs, self.loss_weight_np)["val_loss"]

    def resume(self, folder: Path) -> None:
        """Continue exactly where an interrupted run stopped: model, optimiser, schedule,
        random streams, epoch and early-stopping state."""
        state = self.restore(folder)
        self.best_val_loss = state["best_val_loss"]
        self.start_val_loss = state.get("start_val_loss")

    def batches(self) -> Any:
        n, size, rng = len(self.train), self.cfg.batch_size, self.streams.batches
        if self.on_device:
            return device_batches(n, size, rng, self.device)
        return iterate_batches(n, size, rng)

    def train_epoch(self, epoch: int, progress: bool) -> dict[str, float]:
        """One pass over the training split; returns the mean training loss and throughput."""
        cfg, model = self.cfg, self.model
        started = time.perf_counter()
        model.train()
        for module in self.frozen:  # frozen parts keep their BatchNorm statistics
            module.eval()
        # Summed on the device in float64 (the same sums as Python floats): no sync per step.
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        total_n = 0
        self.guard.skipped = 0
        batches = self.batches()
        if progress:
            from tqdm import tqdm

            batches = tqdm(
                batches,
                total=self.steps_per_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                leave=False,
                disable=not sys.stderr.isatty(),
            )
        parameters = [p for p in model.parameters() if p.requires_grad]
        for step, idx in enumerate(batches, start=1):
            if self.on_device:
                x = self.train_signals.index_select(0, idx)
            else:
                x = torch.from_numpy(self.train[idx][:, self.columns]).to(
                    self.device, non_blocking=True
                )
            x, labels, mask = augment_batch(x, cfg, self.streams.augment, self.data.fs)
            # A skipped step must leave the model as it was: the forward pass also moves the
            # BatchNorm running statistics, so those are kept aside first (a few kB).
            kept = self.guard.snapshot(model) if self.guard.skip else None
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = model(x, mask)
            loss = lead_loss(logits, labels, self.loss_weight, mask)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.anchors:
                pull_toward(parameters, self.anchors, self.cfg.anchor_l2)
            rows = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx
            if self.guard.step_is_finite(
                loss, parameters, epoch + 1, step, self.data.ids("train", rows)
            ):
                self.optimizer.step()
                total_loss += loss.detach().double() * len(idx)
                total_n += len(idx)
            elif kept is not None:
                self.guard.restore(model, kept)
            self.scheduler.step()  # the schedule stays on time when a step is skipped
        seconds = time.perf_counter() - started
        return {
            "train_loss": float(total_loss) / max(total_n, 1),
            "train_ecg_per_second": total_n / seconds,
            "skipped_steps": self.guard.skipped,
            "started": started,
        }

    def predict(self, signals: np.ndarray | torch.Tensor) -> np.ndarray:
        batch = max(self.cfg.batch_size, 64)
        return predict_log_probs(self.model, signals, self.device, batch, self.amp)

    def robust_metrics(self, val_loss: float) -> dict[str, float]:
        """Accuracy with fewer leads and under noise, their mean, and the fine-tuning score."""
        found = {
            condition.key: hungarian_lead_accuracy(
                self.predict(condition.signals), condition.labels
            )
            for condition in self.conditions
        }
        found["val_robust_accuracy"] = float(np.mean(list(found.values())))
        if self.start_val_loss is not None:
            found["start_val_loss"] = self.start_val_loss
            found["val_finetune_score"] = finetune_score(
                found["val_robust_accuracy"], val_loss, self.start_val_loss,
                self.cfg.finetune_loss_tolerance,
            )  # fmt: skip
        return found

    def validate(self, epoch: int, trained: dict[str, float]) -> dict[str, Any]:
        timed = time.perf_counter()
        log_probs = self.predict(self.val_signals)
        infer_ms = 1000.0 * (time.perf_counter() - timed) / max(len(self.val), 1)
        check_finite_outputs(
            log_probs, self.data.ids("val", np.arange(len(self.val))), f"epoch {epoch + 1}"
        )
        started = trained.pop("started")
        metrics_now = {
            "epoch": epoch + 1,
            "train_loss": trained["train_loss"],
            **validation_metrics(log_probs, self.loss_weight_np),
            # the schedule's value now (the parameter lr is where it started)
            "current_lr": self.scheduler.get_last_lr()[0],
            "epoch_seconds": time.perf_counter() - started,
            "train_ecg_per_second": trained["train_ecg_per_second"],
            "infer_ms_per_ecg": infer_ms,  # validation inference on the trial's device
        }
        if self.conditions:
            metrics_now.update(self.robust_metrics(metrics_now["val_loss"]))
        if self.cfg.skip_nonfinite_steps:
            metrics_now["skipped_steps"] = trained["skipped_steps"]
        improved = metrics_now["val_loss"] < self.best_val_loss
        if improved:
            self.best_val_loss = metrics_now["val_loss"]
        metrics_now["best_val_loss"] = self.best_val_loss
        metrics_now["early_stopped"] = self.patience_ran_out(improved)
        return metrics_now

    def bookkeeping(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "start_val_loss": self.start_val_loss}


def train_lead_id(
    config: dict[str, Any],
    data: LeadIdData | None = None,
    reporter: Reporter | None = None,
    progress: bool = False,
    data_on_device: bool | None = None,
    build_model: Callable[[ModelConfig], torch.nn.Module] | None = None,
) -> dict[str, Any]:
    """Train one lead-identification model; report metrics and a checkpoint every epoch.

    ``config`` is a flat dict of :class:`LeadIdConfig` fields. Returns the last epoch's metrics.
    Resumes from ``reporter.latest_checkpoint()`` when there is one, continuing exactly where
    the interrupted run stopped. ``progress`` shows a per-batch progress bar (for interactive
    runs, not for Tune trials). A non-finite loss or gradient stops the run with a one-line
    :class:`~leadtune.trainables.training.NonFiniteError` (or, with ``skip_nonfinite_steps``,
    skips and counts the step).

    ``data_on_device`` keeps both splits on the training device as tensors and cuts every batch
    there with an index tensor, so a GPU never waits for host copies (None: on CUDA only; on
    CPU it gives the same batches and results through the other code path). ``build_model``
    replaces :func:`create_model` (``leadtune bench --accuracy`` passes the plain rendering).
    """
    cfg = LeadIdConfig.from_dict(config)
    if data is None:
        raise ValueError("train_lead_id needs data=LeadIdData(...); see LeadIdData.from_prepared")
    run = LeadIdTraining(
        cfg, data, reporter if reporter is not None else TuneReporter(), data_on_device, build_model
    )
    return run.run(progress)


def evaluate_checkpoint(
    checkpoint: str | Path, dataset: Any, split: str = "test"
) -> dict[str, Any]:
    """Lead and set accuracy (argmax and Hungarian) of a checkpoint on one split of a dataset."""
    model, config, _ = load_trained_model(checkpoint)
    columns = lead_columns(config, tuple(dataset.leads))
    rows = dataset.indices(split)
    signals = np.ascontiguousarray(dataset.signals[rows][:, columns])
    if len(signals) == 0:
        raise ValueError(f"the {split!r} split of {dataset.path} holds no records")
    log_probs = predict_log_probs(model, signals, torch.device("cpu"))
    check_finite_outputs(log_probs, dataset.ecg_ids[rows], f"the {split} split")
    weight = np.ones(len(config.leads))
    found = validation_metrics(log_probs, weight)
    prefix = f"{split}_"
    return {prefix + key[len("val_") :]: value for key, value in found.items()} | {
        f"{split}_records": int(len(signals))
    }


def paired_test(checkpoint_a: str | Path, checkpoint_b: str | Path, dataset: Any,
                split: str = "test") -> dict[str, Any]:  # fmt: skip
    """Two checkpoints on the same ECGs of a split: lead accuracy (Hungarian) of each and
    McNemar's exact test on lead-level correctness."""
    rows = dataset.indices(split)
    correct = []
    for checkpoint in (checkpoint_a, checkpoint_b):
        model, config, _ = load_trained_model(checkpoint)
        columns = lead_columns(config, tuple(dataset.leads))
        signals = np.ascontiguousarray(dataset.signals[rows][:, columns])
        log_probs = predict_log_probs(model, signals, torch.device("cpu"))
        true = np.broadcast_to(np.arange(len(config.leads)), log_probs.shape[:2])
        correct.append(metrics.correct_leads(metrics.hungarian_assign(log_probs), true))
    result = metrics.mcnemar_exact(correct[0], correct[1])
    a, b = float(correct[0].mean()), float(correct[1].mean())
    return {"test": "exact McNemar on lead-level correctness",
            "metric": f"{split}_lead_accuracy_hungarian", "records": int(len(rows)), "a": a,
            "b": b, "difference": a - b, "only_a_right": result.b, "only_b_right": result.c,
            "p_value": result.p_value}  # fmt: skip

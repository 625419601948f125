"""Training plumbing every task uses: reporters, checkpoints, device, random streams, batches,
and the guard that stops a run at its first non-finite step.

A task's training function talks to Ray only through a :class:`Reporter`: in a Tune trial
:class:`TuneReporter` calls ``tune.report(metrics, checkpoint=...)`` and ``tune.get_checkpoint()``;
outside Tune :class:`LocalReporter` writes the same checkpoints to a folder. So one function runs
unchanged in a trial, in ``leadtune train``, in the benchmark and in a test.

Checkpoints hold tensors and plain data only (dicts, lists, numbers, strings) and are read with
``torch.load(weights_only=True)``: a crafted checkpoint cannot run code when leadtune loads it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
# Bumped when what a checkpoint holds changes; 2 = the task is recorded, plain data only.
CHECKPOINT_FORMAT = 2


class Reporter(Protocol):
    """Where a trial sends its per-epoch metrics and checkpoints."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None: ...

    def latest_checkpoint(self) -> Path | None: ...


class TuneReporter:
    """Reports to Ray Tune (the default inside a Tune trial)."""

    def __init__(self) -> None:
        from ray import tune

        self._tune = tune
        self._held: Any = None  # keeps a restored checkpoint's local copy alive

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        checkpoint = self._tune.Checkpoint.from_directory(str(checkpoint_dir))
        self._tune.report(metrics, checkpoint=checkpoint)

    def latest_checkpoint(self) -> Path | None:
        checkpoint = self._tune.get_checkpoint()
        if checkpoint is None:
            return None
        self._held = checkpoint.as_directory()
        return Path(self._held.__enter__())


@dataclass
class LocalReporter:
    """Keeps each epoch's checkpoint in ``out_dir/epoch_NNN`` and the metrics in memory.

    ``resume_from`` continues a run from a checkpoint folder written earlier.
    """

    out_dir: Path
    resume_from: Path | None = None
    on_report: Callable[[dict[str, Any]], None] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        target = Path(self.out_dir) / f"epoch_{metrics['epoch']:03d}"
        target.mkdir(parents=True, exist_ok=True)
        os.replace(checkpoint_dir / CHECKPOINT_FILE, target / CHECKPOINT_FILE)
        (target / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        metrics = {**metrics, "checkpoint_dir": str(target)}
        self.history.append(metrics)
        if self.on_report:
            self.on_report(metrics)

    def latest_checkpoint(self) -> Path | None:
        return Path(self.resume_from) if self.resume_from else None


# -- checkpoints -----------------------------------------------------------------------------------


class EpochRun:
    """The epoch loop every task's training shares. A task's run class (``LeadIdTraining``,
    ``DiagnosisTraining``) sets ``cfg`` (with ``epochs``), ``reporter``, ``device``, ``model``,
    ``optimizer``, ``scheduler``, ``streams``, ``start_epoch`` and ``stale_epochs``, names its
    ``task``, and gives ``train_epoch(epoch, progress)``, ``validate(epoch, trained)`` (its
    metrics, with ``early_stopped``), ``bookkeeping()`` (its best-so-far fields, kept in each
    checkpoint) and ``resume(folder)`` (which calls :meth:`restore` and then reads them)."""

    task: str
    cfg: Any
    reporter: Reporter
    device: torch.device
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    streams: RandomStreams
    start_epoch: int
    stale_epochs: int

    def run(self, progress: bool = False) -> dict[str, Any]:
        """Resume from the reporter's latest checkpoint where there is one, then train,
        validate and checkpoint epoch by epoch until the schedule ends or early stopping; returns
        the last epoch's metrics."""
        resume_dir = self.reporter.latest_checkpoint()
        if resume_dir is not None:
            self.resume(resume_dir)
        self.measure_start()
        last: dict[str, Any] = {}
        for epoch in range(self.start_epoch, self.cfg.epochs):
            last = self.validate(epoch, self.train_epoch(epoch, progress))
            self.checkpoint(last)
            if last["early_stopped"]:
                break
        return last

    def measure_start(self) -> None:
        """Anything to measure before the first epoch (none by default)."""

    def patience_ran_out(self, improved: bool) -> bool:
        """Count an epoch for early stopping: ``improved`` on the task's early-stopping metric
        resets the count; True when ``early_stopping_patience`` epochs passed without one."""
        self.stale_epochs = 0 if improved else self.stale_epochs + 1
        patience = self.cfg.early_stopping_patience
        return patience is not None and self.stale_epochs >= patience

    def restore(self, folder: Path) -> dict[str, Any]:
        """Continue exactly where an interrupted run stopped: model, optimiser, schedule, random
        streams, epoch and early-stopping count; returns the checkpoint for the task's fields."""
        state = load_checkpoint(folder, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.streams.restore(state["rng"])
        self.start_epoch = state["epoch"]
        self.stale_epochs = state["stale_epochs"]
        return state

    def resume(self, folder: Path) -> None:
        self.restore(folder)

    def train_epoch(self, epoch: int, progress: bool) -> dict[str, Any]:
        raise NotImplementedError

    def validate(self, epoch: int, trained: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def bookkeeping(self) -> dict[str, Any]:
        """The task's own fields for the checkpoint (its best value so far, ...)."""
        return {}

    def reported(self, metrics_now: dict[str, Any]) -> dict[str, Any] | None:
        """What the reporter (Tune) is told, where it differs from the checkpoint's metrics."""
        return None

    def checkpoint(self, metrics_now: dict[str, Any]) -> None:
        """Write this epoch's checkpoint (tensors and plain data) and report it."""
        report_epoch(
            self.reporter, self.task, self, metrics_now, reported=self.reported(metrics_now),
            stale_epochs=self.stale_epochs, **self.bookkeeping(),
        )  # fmt: skip


class CheckpointError(ValueError):
    """A file that is not a leadtune checkpoint, or one leadtune refuses to load."""


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors and plain data) as ``folder/checkpoint.pt``."""
    file = Path(folder) / CHECKPOINT_FILE
    torch.save({"format": CHECKPOINT_FORMAT, **state}, file)
    return file


def report_epoch(reporter: Any, task: str, parts: Any, metrics: dict[str, Any],
                 reported: dict[str, Any] | None = None, **extra: Any) -> None:  # fmt: skip
    """Write an epoch's checkpoint (tensors and plain data) to a temporary folder and hand it,
    with the epoch's metrics, to the reporter, which keeps it where it belongs.

    ``parts`` is the training state: ``model``, ``optimizer``, ``scheduler``, ``streams``
    (:class:`RandomStreams`), ``cfg`` (the config) and ``data`` (with ``fingerprint``, ``fs``,
    ``source``); ``extra`` adds the task's own bookkeeping (its best value so far, ...).
    """
    import tempfile

    # the model's size, an objective or budget a search may name (search.objectives)
    size = {"params": float(sum(p.numel() for p in parts.model.parameters()))}
    metrics = {**metrics, **size}
    reported = None if reported is None else {**reported, **size}
    state = {
        "task": task,
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "rng": parts.streams.state(),
        "epoch": metrics["epoch"],
        "config": parts.cfg.to_dict(),
        "metrics": metrics,
        "data": {
            "fingerprint": parts.data.fingerprint,
            "fs": parts.data.fs,
            "source": parts.data.source,
        },  # fmt: skip
        **extra,
    }
    with tempfile.TemporaryDirectory(prefix="leadtune-ckpt-") as tmp:
        save_checkpoint(Path(tmp), state)
        reporter.report(dict(metrics if reported is None else reported), Path(tmp))


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file of a checkpoint folder (or the file itself)."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no leadtune checkpoint at {file}; pass a checkpoint folder")
    return file


def load_refusal(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words. Torch's own message
    advises loading it with ``weights_only=False``, which would run whatever code the file
    holds: that advice is never passed on."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if "weights_only" in reason or "Unsupported global" in reason or "Weights only" in reason:
        return (
            "it holds pickled Python objects (code that would run when loaded) besides tensors "
            "and plain data"
        )
    return reason[:200]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, read with ``weights_only=True``: tensors and plain data only.

    Anything else (a pickled class, a function, a ``__reduce__`` that would run a command) is
    refused with a one-line :class:`CheckpointError` before any of it executes.
    """
    file = checkpoint_file(path)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:
        if isinstance(exc, OSError):
            raise CheckpointError(f"{file}: unreadable ({exc})") from None
        reason = load_refusal(exc)
        if file.stat().st_size == 0:
            reason = "the file is empty"
        raise CheckpointError(
            f"{file}: not loaded, {reason[:200]}; leadtune only loads checkpoints of tensors "
            "and plain data, which it writes itself (a file from elsewhere could run code)"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{file}: not a leadtune checkpoint (no model weights and config)")
    return state


# -- device and random streams ---------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA where available, else CPU), ``cpu`` or ``cuda``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class RandomStreams:
    """Every random stream of a run, seeded from its config: batch order (numpy), model
    initialisation and dropout (torch's global generator), augmentation (a torch generator on
    the training device)."""

    batches: np.random.Generator
    augment: torch.Generator

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> RandomStreams:
        torch.manual_seed(seed)
        augment = torch.Generator(device=device)
        augment.manual_seed(seed + 1)
        return cls(np.random.default_rng(seed), augment)

    def state(self) -> dict[str, Any]:
        state = {
            "numpy": self.batches.bit_generator.state,
            "torch": torch.get_rng_state(),
            "augment": self.augment.get_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.batches.bit_generator.state = state["numpy"]
        torch.set_rng_state(state["torch"])
        self.augment.set_state(state["augment"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


# -- batches ---------------------------------------------------------------------------------------


def iterate_batches(
    n: int, batch_size: int, rng: np.random.Generator | None
) -> Iterator[np.ndarray]:
    """Row indices of each batch (shuffled by ``rng``, in order without it), sorted within a
    batch so that a memory-mapped array is read front to back."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield np.sort(order[start : start + batch_size])


def device_batches(
    n: int, batch_size: int, rng: np.random.Generator, device: torch.device
) -> list[torch.Tensor]:
    """The batches of :func:`iterate_batches` (same RNG draws, same order) as index tensors on
    ``device``: one host-to-device copy per epoch instead of one per batch."""
    batches = list(iterate_batches(n, batch_size, rng))
    if not batches:
        return []
    indices = torch.from_numpy(np.concatenate(batches)).to(device, non_blocking=True)
    return list(indices.split([len(batch) for batch in batches]))


# -- the non-finite guard --------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """A training step (or an evaluation) produced a non-finite loss, gradient or output.

    Its message is one line naming the epoch, the step and the ECG ids involved; the last good
    checkpoint is left as it was.
    """


def describe_ids(ids: Sequence[int], shown: int = 12) -> str:
    ids = [int(i) for i in ids]
    text = ", ".join(str(i) for i in ids[:shown])
    return text + (f", ... ({len(ids)} in all)" if len(ids) > shown else "")


@dataclass
class StepGuard:
    """Checks every training step's loss and gradients before the optimiser applies them.

    A non-finite value raises :class:`NonFiniteError` naming the epoch, the step and the batch's
    ECG ids; with ``skip`` the step is left out instead (no update) and counted in ``skipped``.
    One device synchronisation per step.
    """

    skip: bool = False
    skipped: int = 0

    @staticmethod
    def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Copies of the model's floating-point buffers (BatchNorm running statistics), which a
        training-mode forward pass changes before the step can be judged."""
        return {
            name: buffer.detach().clone()
            for name, buffer in model.named_buffers()
            if buffer.is_floating_point()
        }

    @staticmethod
    def restore(model: torch.nn.Module, kept: dict[str, torch.Tensor]) -> None:
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in kept.items():
                buffers[name].copy_(value)

    def step_is_finite(
        self,
        loss: torch.Tensor,
        parameters: Sequence[torch.nn.Parameter],
        epoch: int,
        step: int,
        ecg_ids: Sequence[int],
    ) -> bool:
        grads = [p.grad for p in parameters if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []
        finite = bool(torch.isfinite(torch.stack([loss.detach().float(), *norms])).all())
        if finite:
            return True
        what = "loss" if not math.isfinite(float(loss.detach())) else "gradient"
        if self.skip:
            self.skipped += 1
            return False
        raise NonFiniteError(
            f"non-finite {what} at epoch {epoch}, step {step} (batch of ECG ids "
            f"{describe_ids(ecg_ids)}); training stopped, the last checkpoint is the last good "
            "one. Check those records (see `leadtune data prepare`: amplitude outliers), lower "
            "the learning rate, or pass --skip-nonfinite-steps true to skip such steps"
        )


def check_finite_outputs(outputs: np.ndarray, ecg_ids: Sequence[int], what: str) -> None:
    """Raise :class:`NonFiniteError` if a model's outputs hold NaN or infinity, naming the ECGs:
    a broken model is reported as such, not as a problem of the metrics computed from it."""
    bad = ~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
    if bad.any():
        ids = np.asarray(ecg_ids)[bad] if len(ecg_ids) == len(outputs) else np.flatnonzero(bad)
        raise NonFiniteError(
            f"{what}: the model's outputs are not finite for {int(bad.sum())} of "
            f"{len(outputs)} ECGs (ids {describe_ids(ids)}); the model is broken (diverged "
            "training or damaged weights), not the metrics"
        )

"""Lead identification: the training function that Ray Tune runs as a trial, and that runs
unchanged as a plain Python function (tests, ``leadtune train``).

The only contact with Ray is through a :class:`Reporter`: in a Tune trial the default one calls
``tune.report(metrics, checkpoint=...)`` and ``tune.get_checkpoint()``; outside Tune a
:class:`LocalReporter` writes the same checkpoints to a folder.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from analysis import metrics
from trainables.data.leads import LEADS
from trainables.lead_id_config import LEAD_SETS, LIMB, PRECORDIAL, LeadIdConfig  # noqa: F401
from trainables.models import ModelConfig, create_model
from trainables.runtime import apply_gpu_memory_fraction

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class LeadIdData:
    """The arrays a lead-ID trial needs: training and validation signals, (N, 12, T) float32 mV.

    The test fold is deliberately absent: it is used once, on the chosen model, by promotion.
    """

    train: np.ndarray
    val: np.ndarray
    fs: int
    fingerprint: str
    leads: tuple[str, ...] = LEADS
    source: str = ""

    @classmethod
    def from_prepared(cls, dataset: Any) -> LeadIdData:
        """Load the train and val splits of a :class:`PreparedDataset` into memory once."""
        return cls(
            train=np.ascontiguousarray(dataset.signals[dataset.indices("train")]),
            val=np.ascontiguousarray(dataset.signals[dataset.indices("val")]),
            fs=int(dataset.fs),
            fingerprint=str(dataset.fingerprint),
            leads=tuple(dataset.leads),
            source=str(dataset.manifest.get("source", "")),
        )


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
        (target / "metrics.json").write_text(json.dumps(metrics, indent=2))
        metrics = {**metrics, "checkpoint_dir": str(target)}
        self.history.append(metrics)
        if self.on_report:
            self.on_report(metrics)

    def latest_checkpoint(self) -> Path | None:
        return Path(self.resume_from) if self.resume_from else None


def resolve_device(config: LeadIdConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def lead_columns(config: LeadIdConfig, data_leads: tuple[str, ...]) -> np.ndarray:
    """Indices of the configured leads in the dataset's channel order."""
    return np.array([data_leads.index(lead) for lead in config.leads])


def augment_batch(
    x: torch.Tensor, config: LeadIdConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle lead order per ECG and add the reference's Gaussian jitter.

    Returns the augmented (B, K, T) signals and the (B, K) label of each position.
    """
    batch, n_leads, _ = x.shape
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
    return x, labels


def lead_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over (weighted) leads of the per-lead cross-entropy."""
    per_lead = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    weights = weight[labels.flatten()]
    return (per_lead * weights).sum() / weights.sum()


def iterate_batches(
    n: int, batch_size: int, rng: np.random.Generator | None
) -> Iterator[np.ndarray]:
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


@torch.no_grad()
def predict_log_probs(
    model: torch.nn.Module,
    signals: np.ndarray | torch.Tensor,
    device: torch.device,
    batch_size: int = 64,
    amp: bool = False,
) -> np.ndarray:
    """Log-probabilities (N, K, M) for signals (N, K, T) in the given lead order.

    ``signals`` may be a tensor already on ``device`` (the data-on-device path): batches are then
    slices of it, and the results come back to the host in one copy at the end.
    """
    model.eval()
    chunks = []
    for start in range(0, len(signals), batch_size):
        if isinstance(signals, torch.Tensor):
            x = signals[start : start + batch_size]
        else:
            batch = np.ascontiguousarray(signals[start : start + batch_size])
            x = torch.from_numpy(batch).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
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


def _rng_state(np_rng: np.random.Generator, generator: torch.Generator) -> dict[str, Any]:
    state = {
        "numpy": np_rng.bit_generator.state,
        "torch": torch.get_rng_state(),
        "augment": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], np_rng: np.random.Generator, generator: torch.Generator):
    np_rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model_from_checkpoint(path: str | Path, map_location: str = "cpu"):
    """(model in eval mode, LeadIdConfig, checkpoint dict) from a checkpoint folder or file."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no leadtune checkpoint at {file}; pass a trial checkpoint folder")
    state = torch.load(file, map_location=map_location, weights_only=False)
    config = LeadIdConfig.from_dict(state["config"])
    model = create_model(config.model_config())
    model.load_state_dict(state["model"])
    model.eval()
    return model, config, state


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
    the interrupted run stopped (model, optimiser, scheduler, RNG states, epoch).
    ``progress`` shows a per-batch progress bar (for interactive runs, not for Tune trials).

    ``data_on_device`` keeps both splits on the training device as tensors and cuts every batch
    there with an index tensor, so a GPU never waits for host copies (None: on CUDA only; on
    CPU it gives the same batches and results through the other code path). ``build_model``
    replaces :func:`create_model` (``leadtune bench --accuracy`` passes the plain rendering).
    """
    cfg = LeadIdConfig.from_dict(config)
    if data is None:
        raise ValueError("train_lead_id needs data=LeadIdData(...); see LeadIdData.from_prepared")
    reporter = reporter if reporter is not None else TuneReporter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg)
    amp = cfg.amp and device.type == "cuda"
    on_device = device.type == "cuda" if data_on_device is None else data_on_device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batch shapes repeat: let cuDNN pick its kernels
        apply_gpu_memory_fraction(device)

    torch.manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed + 1)

    columns = lead_columns(cfg, data.leads)
    train = data.train[: cfg.max_train_records]
    val = np.ascontiguousarray(data.val[: cfg.max_val_records][:, columns])
    if len(train) == 0 or len(val) == 0:
        raise ValueError("the training and validation splits must both hold records")
    loss_weight_np = np.array(
        [1.0 if cfg.loss_leads is None or lead in cfg.loss_leads else 0.0 for lead in cfg.leads]
    )
    loss_weight = torch.tensor(loss_weight_np, dtype=torch.float32, device=device)
    val_signals: np.ndarray | torch.Tensor = val
    if on_device:
        # The whole split lives on the device once; each batch is an index_select there.
        train_signals = torch.from_numpy(np.ascontiguousarray(train[:, columns])).to(device)
        val_signals = torch.from_numpy(val).to(device)

    model = (build_model or create_model)(cfg.model_config()).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        fused=True if device.type == "cuda" else None,  # one kernel for all parameters on a GPU
    )
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=cfg.epochs * steps_per_epoch, eta_min=cfg.lr_min
    )
    start_epoch, best_val_loss, stale_epochs = 0, math.inf, 0

    resume_dir = reporter.latest_checkpoint()
    if resume_dir is not None:
        state = torch.load(
            Path(resume_dir) / CHECKPOINT_FILE, map_location=device, weights_only=False
        )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"], np_rng, generator)
        start_epoch = state["epoch"]
        best_val_loss = state["best_val_loss"]
        stale_epochs = state["stale_epochs"]

    last: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        model.train()
        # Summed on the device in float64 (the same sums as Python floats): no sync per step.
        total_loss, total_n = torch.zeros((), dtype=torch.float64, device=device), 0
        batches: Any
        if on_device:
            batches = device_batches(len(train), cfg.batch_size, np_rng, device)
        else:
            batches = iterate_batches(len(train), cfg.batch_size, np_rng)
        if progress:
            from tqdm import tqdm

            batches = tqdm(
                batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False
            )
        for idx in batches:
            if on_device:
                x = train_signals.index_select(0, idx)
            else:
                x = torch.from_numpy(train[idx][:, columns]).to(device, non_blocking=True)
            x, labels = augment_batch(x, cfg, generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = lead_loss(logits, labels, loss_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.detach().double() * len(idx)
            total_n += len(idx)
        train_loss = float(total_loss) / total_n
        train_seconds = time.perf_counter() - started

        log_probs = predict_log_probs(
            model, val_signals, device, batch_size=max(cfg.batch_size, 64), amp=amp
        )
        last = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            **validation_metrics(log_probs, loss_weight_np),
            "lr": scheduler.get_last_lr()[0],
            "epoch_seconds": time.perf_counter() - started,
            "train_ecg_per_second": total_n / train_seconds,
        }
        if last["val_loss"] < best_val_loss:
            best_val_loss, stale_epochs = last["val_loss"], 0
        else:
            stale_epochs += 1
        last["best_val_loss"] = best_val_loss
        stop = (
            cfg.early_stopping_patience is not None and stale_epochs >= cfg.early_stopping_patience
        )
        last["early_stopped"] = bool(stop)

        with tempfile.TemporaryDirectory(prefix="leadtune-ckpt-") as tmp:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(np_rng, generator),
                    "epoch": epoch + 1,
                    "best_val_loss": best_val_loss,
                    "stale_epochs": stale_epochs,
                    "config": cfg.to_dict(),
                    "metrics": last,
                    "data": {"fingerprint": data.fingerprint, "fs": data.fs, "source": data.source},
                },
                Path(tmp) / CHECKPOINT_FILE,
            )
            reporter.report(dict(last), Path(tmp))
        if stop:
            break
    return last


def evaluate_checkpoint(
    checkpoint: str | Path, dataset: Any, split: str = "test"
) -> dict[str, Any]:
    """Lead and set accuracy (argmax and Hungarian) of a checkpoint on one split of a dataset."""
    model, config, _ = load_model_from_checkpoint(checkpoint)
    columns = lead_columns(config, tuple(dataset.leads))
    signals = np.ascontiguousarray(dataset.signals[dataset.indices(split)][:, columns])
    if len(signals) == 0:
        raise ValueError(f"the {split!r} split of {dataset.path} holds no records")
    log_probs = predict_log_probs(model, signals, torch.device("cpu"))
    weight = np.ones(len(config.leads))
    found = validation_metrics(log_probs, weight)
    prefix = f"{split}_"
    return {prefix + key[len("val_") :]: value for key, value in found.items()} | {
        f"{split}_records": int(len(signals))
    }

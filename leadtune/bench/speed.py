"""Speed: training and inference throughput of each variant, the data pipeline, and epoch
times on the shared subset."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from leadtune.bench.settings import MODEL_SIZES, VARIANTS, BenchSettings
from leadtune.bench.worker import Worker

# --- measuring ----------------------------------------------------------------------------------


def measure_model(
    name: str, settings: BenchSettings, batch_file: str | None, log: Any
) -> dict[str, Any]:
    """Throughput and peak memory of every variant of one model size, interleaved by round."""
    model = {"d_model": MODEL_SIZES[name], "n_classes": 12, **settings.model_overrides}
    variants = [v for v in VARIANTS if settings.default_allocator or v[1] == "tuned"]
    workers = [Worker(*variant) for variant in variants]
    try:
        info = [
            worker.ask(
                {
                    "op": "init",
                    "variant": worker.variant,
                    "model": model,
                    "batch_file": batch_file,
                    "batch_size": settings.batch_size,
                    "leads": settings.leads,
                    "samples": settings.samples,
                    "threads": settings.threads,
                }
            )
            for worker in workers
        ]
        found: dict[tuple[str, str], dict[str, Any]] = {
            variant: {"train": [], "train_cpu": [], "infer": [], "infer_cpu": []}
            for variant in variants
        }
        # Inference first: with the tuned allocator a process keeps the memory it has used, so
        # an inference peak taken after training would be the training peak.
        for phase in ("infer", "train"):
            for worker in workers:
                if settings.warmup:
                    worker.ask({"op": phase, "steps": settings.warmup})
                worker.ask({"op": "reset_peak"})
            for round_number in range(settings.rounds):
                shift = round_number % len(workers)
                for worker in workers[shift:] + workers[:shift]:
                    reply = worker.ask({"op": phase, "steps": 1})
                    key = (worker.variant, worker.allocator)
                    found[key][phase] += reply["wall"]
                    found[key][f"{phase}_cpu"] += reply["cpu"]
                log(f"  {name}: {phase} round {round_number + 1}/{settings.rounds} done")
            for worker in workers:
                found[(worker.variant, worker.allocator)][f"{phase}_peak_bytes"] = worker.ask(
                    {"op": "peak"}
                )["peak_bytes"]
    finally:
        for worker in workers:
            worker.close()
    rows = []
    for (variant, allocator), details in zip(variants, info):
        times = found[(variant, allocator)]
        rows.append(
            {
                "variant": variant,
                "allocator": allocator,
                "parameters": details["parameters"],
                "threads": details["threads"],
                "allocator_settings": details["allocator_settings"],
                "train_step_seconds": statistics.median(times["train"]),
                "train_step_cpu_seconds": statistics.median(times["train_cpu"]),
                "infer_step_seconds": statistics.median(times["infer"]),
                "infer_step_cpu_seconds": statistics.median(times["infer_cpu"]),
                "train_ecg_per_second": settings.batch_size / statistics.median(times["train"]),
                "infer_ecg_per_second": settings.batch_size / statistics.median(times["infer"]),
                # the fastest step: on a shared machine, the nearest to the unloaded speed
                "train_best_ecg_per_second": settings.batch_size / min(times["train"]),
                "infer_best_ecg_per_second": settings.batch_size / min(times["infer"]),
                "train_peak_bytes": times["train_peak_bytes"],
                "infer_peak_bytes": times["infer_peak_bytes"],
                "train_steps_seconds": times["train"],
                "infer_steps_seconds": times["infer"],
            }
        )
    return {
        "model": name,
        "config": model,
        "rows": rows,
        "ratios": speed_ratios(rows),
        "best_ratios": speed_ratios(rows, "best"),
    }


def speed_ratios(rows: list[dict[str, Any]], statistic: str = "") -> dict[str, float]:
    """Fast-path throughput over each plain variant's, for training and inference.

    ``statistic`` "" compares the medians, "best" the fastest steps.
    """
    by_variant = {(row["variant"], row["allocator"]): row for row in rows}
    fast = by_variant[("fast", "tuned")]
    prefix = f"{statistic}_" if statistic else ""
    ratios = {}
    for allocator in ("default", "tuned"):
        plain = by_variant.get(("plain", allocator))
        if plain is None:
            continue
        for phase in ("train", "infer"):
            key = f"{phase}_{prefix}ecg_per_second"
            ratios[f"{phase}_vs_plain_{allocator}"] = fast[key] / plain[key]
    return ratios


def load_bench_data(settings: BenchSettings, log: Any):
    """LeadIdData for --source (None when there is none) and the path of one batch for workers."""
    import numpy as np

    if not settings.source:
        return None, None
    from leadtune.trainables.data.cache import prepare_dataset
    from leadtune.trainables.lead_id.train import LeadIdData

    log(f"loading {settings.source} (cached after the first time)")
    dataset = prepare_dataset(
        Path(settings.source),
        cache_root=Path(settings.cache_dir) if settings.cache_dir else None,
        limit=settings.limit,
        progress=False,
    )
    data = LeadIdData.from_prepared(dataset)
    if len(data.train) < settings.batch_size:
        raise ValueError(
            f"{settings.source} has {len(data.train)} training records, fewer than "
            f"--batch-size {settings.batch_size}; lower --batch-size or raise --limit"
        )
    batch = np.ascontiguousarray(
        data.train[: settings.batch_size, : settings.leads, : settings.samples], dtype=np.float32
    )
    handle, path = tempfile.mkstemp(prefix="leadtune-bench-", suffix=".npy")
    os.close(handle)
    np.save(path, batch)
    return data, path


def measure_data_pipeline(data: Any, settings: BenchSettings, repeats: int = 3) -> dict[str, Any]:
    """ECG/s of the training loop's batch preparation alone (index, select leads, augment),
    through the host path and through the data-on-device path (here on the CPU)."""
    import numpy as np
    import torch

    from leadtune.trainables.lead_id.config import LeadIdConfig
    from leadtune.trainables.lead_id.train import augment_batch, lead_columns
    from leadtune.trainables.training import device_batches, iterate_batches

    config = LeadIdConfig(batch_size=settings.batch_size)
    columns = lead_columns(config, data.leads)
    train = data.train
    device = torch.device("cpu")
    on_device = torch.from_numpy(np.ascontiguousarray(train[:, columns]))
    results: dict[str, list[float]] = {"host": [], "on_device": []}
    for _ in range(repeats):
        for path in results:
            rng = np.random.default_rng(0)
            generator = torch.Generator().manual_seed(1)
            started = time.perf_counter()
            if path == "host":
                for idx in iterate_batches(len(train), config.batch_size, rng):
                    x = torch.from_numpy(train[idx][:, columns])
                    augment_batch(x, config, generator)
            else:
                for idx in device_batches(len(train), config.batch_size, rng, device):
                    augment_batch(on_device.index_select(0, idx), config, generator)
            results[path].append(len(train) / (time.perf_counter() - started))
    return {
        "records": len(train),
        "host_ecg_per_second": statistics.median(results["host"]),
        "on_device_ecg_per_second": statistics.median(results["on_device"]),
    }


def estimate_epochs(
    measured: dict[str, Any], data: Any, pipeline: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Seconds per epoch over the train split plus one validation pass, from the medians."""
    n_train, n_val = len(data.train), len(data.val)
    data_seconds = n_train / pipeline["host_ecg_per_second"] if pipeline else 0.0
    return [
        {
            "variant": row["variant"],
            "allocator": row["allocator"],
            "train_records": n_train,
            "val_records": n_val,
            "epoch_seconds": n_train / row["train_ecg_per_second"]
            + n_val / row["infer_ecg_per_second"]
            + data_seconds,
        }
        for row in measured["rows"]
    ]


def measure_epochs(data: Any, settings: BenchSettings, log: Any) -> list[dict[str, Any]]:
    """One real epoch of ``train_lead_id`` with the fast model and with the plain rendering."""
    from leadtune.trainables.lead_id.models.plain_reference import create_plain_model
    from leadtune.trainables.lead_id.train import train_lead_id

    results = []
    config = {"epochs": 1, "batch_size": settings.batch_size, **settings.model_overrides}
    for variant, build in (("fast", None), ("plain", create_plain_model)):
        log(f"  measuring one epoch of the {variant} model on {len(data.train)} records")
        with tempfile.TemporaryDirectory(prefix="leadtune-bench-epoch-") as tmp:
            from leadtune.trainables.training import LocalReporter

            last = train_lead_id(config, data, LocalReporter(Path(tmp)), build_model=build)
        results.append(
            {
                "variant": variant,
                "allocator": "tuned" if _allocator_tuned() else "default",
                "epoch_seconds": last["epoch_seconds"],
                "val_lead_accuracy": last["val_lead_accuracy"],
            }
        )
    return results


def _allocator_tuned() -> bool:
    from leadtune.trainables.runtime import allocator_settings_active

    return allocator_settings_active()

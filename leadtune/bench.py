"""`leadtune bench`: how fast the reference lead-ID model trains and predicts, and against what.

For the reference architecture (inception_gru + sab x 5, 12 leads, batch 38, fp32) at D = 128
(``--model reference``) and at D = 64 (``--model d64``) it measures, in one run:

- training-step throughput (forward, backward, AdamW step) and inference throughput of the
  project's model ("fast": fused channels-last encoder, allocator settings of
  :mod:`trainables.runtime`) and of :mod:`trainables.lead_id.models.plain_reference` (the direct
  PyTorch rendering, same parameter count) with glibc's default allocator and with the tuned one;
- peak resident memory of each (one process per variant, so the peaks do not mix);
- data-pipeline throughput (batch cutting, lead shuffling, jitter) of the training loop;
- epoch time on the shared PTB-XL subset, estimated from the medians (``--measure-epoch`` runs
  one epoch of each instead).

Every variant runs in its own worker process; the parent lets one worker compute at a time and
rotates their order every round, so a machine whose load changes treats all variants alike.
Figures are medians over ``--rounds`` after ``--warmup`` steps. ``--accuracy`` trains the fast
and the plain model side by side (same seed, same batches) and reports both validation
accuracies; ``--search`` times a small search against the sum of its trials and samples its
memory with 1 and 2 concurrent trials.

The last two lines printed are always ``train: <N> ECG/s`` and ``infer: <N> ECG/s``: the fast
path on the first model measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leadtune.bundled import sample_dir

# The shared 2,992-record subset beside a development checkout, where there is one.
SHARED_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptbxl-subset"
MODEL_SIZES = {"reference": 128, "d64": 64}
VARIANTS = (
    ("plain", "default"),  # the reference implementation as it runs out of the box
    ("plain", "tuned"),  # the same with the allocator settings
    ("fast", "tuned"),  # the project's model as leadtune runs it
)
VARIANT_NAMES = {
    ("plain", "default"): "plain, glibc malloc defaults",
    ("plain", "tuned"): "plain, tuned malloc",
    ("fast", "tuned"): "fast (leadtune)",
}


@dataclass
class BenchSettings:
    """What to measure. Defaults: the reference batch, full figures for both model sizes."""

    models: tuple[str, ...] = ("reference", "d64")
    batch_size: int = 38
    leads: int = 12
    samples: int = 1000
    warmup: int = 2
    rounds: int = 5
    threads: int | None = None  # torch threads per worker (None: torch's default)
    default_allocator: bool = True  # also measure the plain model with glibc's defaults
    source: str | None = None  # PTB-XL folder; None: no data figures, random batch
    cache_dir: str | None = None
    limit: int | None = None
    measure_epoch: bool = False
    quick: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)  # width, depth ... (tests)

    def validate(self) -> BenchSettings:
        unknown = [name for name in self.models if name not in MODEL_SIZES]
        if unknown:
            raise ValueError(f"unknown --model {unknown[0]!r}; choose reference, d64 or all")
        for name in ("batch_size", "leads", "samples", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.leads > 12:
            raise ValueError("--leads must be at most 12")
        if self.warmup < 0:
            raise ValueError("--warmup must be at least 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        from leadtune.trainables.lead_id.models.registry import ModelConfig

        for name in self.models:  # the model each worker will build, checked here
            model = {"d_model": MODEL_SIZES[name], "n_classes": 12, **self.model_overrides}
            try:
                ModelConfig(**model).validate()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"model {name} with {self.model_overrides}: {exc}") from None
        return self


# --- worker: one model variant in its own process ---------------------------------------------


def worker_main() -> None:
    """Serve JSON requests on stdin, one per line; answer each with one JSON line on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything printed by libraries must not break the protocol
    state: dict[str, Any] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = _serve(request, state)
        except Exception as exc:  # the parent reports it; the worker stays usable
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            out.write(json.dumps(reply) + "\n")
            out.flush()
        except BrokenPipeError:  # the parent is gone: nothing left to serve
            break
        if request.get("op") == "quit":
            break


def _serve(request: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    op = request["op"]
    if op == "init":
        if request.get("threads"):
            torch.set_num_threads(int(request["threads"]))
        from leadtune.trainables.lead_id.models import ModelConfig, count_parameters, create_model
        from leadtune.trainables.lead_id.models.plain_reference import create_plain_model
        from leadtune.trainables.runtime import allocator_settings_active

        torch.manual_seed(0)
        config = ModelConfig(**request["model"])
        model = create_model(config) if request["variant"] == "fast" else create_plain_model(config)
        if request.get("batch_file"):
            batch = torch.from_numpy(np.load(request["batch_file"]))
        else:
            generator = torch.Generator().manual_seed(1)
            shape = (request["batch_size"], request["leads"], request["samples"])
            batch = 0.3 * torch.randn(shape, generator=generator)
        state.update(
            model=model,
            batch=batch,
            labels=torch.arange(batch.shape[1]).expand(batch.shape[0], -1).reshape(-1),
            optimizer=torch.optim.AdamW(model.parameters(), lr=7e-4, weight_decay=1e-4),
        )
        return {
            "parameters": count_parameters(model),
            "threads": torch.get_num_threads(),
            "allocator_settings": allocator_settings_active(),
            "pid": os.getpid(),
        }
    if op in ("train", "infer"):
        model, batch = state["model"], state["batch"]
        wall, cpu = [], []
        for _ in range(int(request["steps"])):
            started, started_cpu = time.perf_counter(), time.process_time()
            if op == "train":
                model.train()
                logits = model(batch)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), state["labels"])
                state["optimizer"].zero_grad(set_to_none=True)
                loss.backward()
                state["optimizer"].step()
            else:
                model.eval()
                with torch.no_grad():
                    model(batch)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        return {"wall": wall, "cpu": cpu}
    if op == "reset_peak":
        try:  # Linux: resets VmHWM, the peak resident set size
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return {"reset": False}
        return {"reset": True}
    if op == "peak":
        return {"peak_bytes": peak_resident_bytes()}
    if op == "quit":
        return {}
    raise ValueError(f"unknown request {op!r}")


def peak_resident_bytes() -> int | None:
    """This process's peak resident set size (VmHWM), or None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, variant: str, allocator: str) -> None:
        from leadtune.trainables import runtime

        self.variant, self.allocator = variant, allocator
        if allocator == "tuned":
            environ = runtime.environment_with_allocator_settings()
        else:
            environ = runtime.environment_without_allocator_settings()
        environ[runtime.NO_REEXEC_ENV] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from leadtune.bench import worker_main; worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=environ,
            text=True,
        )

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"bench worker ({self.variant}, {self.allocator} malloc) exited with code "
                f"{self.process.wait()}; run with fewer --rounds or a smaller --batch-size"
            )
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"bench worker ({self.variant}): {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.ask({"op": "quit"})
            except (RuntimeError, OSError, ValueError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


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


# --- accuracy: fast vs plain training ----------------------------------------------------------

ACCURACY_CONFIG = {
    # the reference architecture, narrowed so that a few epochs run in minutes on a CPU
    "width": 0.5,
    "d_model": 64,
    "depth": 2,
    "heads": 4,
    "batch_size": 32,
    "lr": 2e-3,
    "epochs": 3,
    "max_train_records": 400,
    "max_val_records": 200,
    "seed": 0,
}


def with_artefacts_first(data: Any, count: int) -> tuple[Any, dict[str, Any]]:
    """The training records sorted so that the ``count`` kept hold every record above 5 mV
    (pacemaker spikes, electrode pops, saturation): the fast path must agree with the plain one
    on what real data holds, not on a clean sample."""
    import dataclasses

    import numpy as np

    peaks = np.abs(data.train).max(axis=(1, 2))
    loud = np.flatnonzero(peaks > 5.0)
    order = np.concatenate([loud, np.setdiff1d(np.arange(len(peaks)), loud)])[:count]
    ids = data.ids("train", order)
    chosen = dataclasses.replace(data, train=data.train[order], train_ids=ids)
    facts = {
        "records": int(len(order)),
        "above_5_mv": int((peaks[order] > 5).sum()),
        "above_10_mv": int((peaks[order] > 10).sum()),
        "largest_peak_mv": round(float(peaks[order].max()), 2),
        "largest_peak_ecg_id": int(ids[int(np.argmax(peaks[order]))]),
    }
    return chosen, facts


def compare_training(data: Any, config: dict[str, Any], log: Any) -> dict[str, Any]:
    """Train the fast model and the plain rendering from the same seed on the same batches,
    on real records that include the data's artefacts."""
    from leadtune.trainables.lead_id.models.plain_reference import create_plain_model
    from leadtune.trainables.lead_id.train import train_lead_id
    from leadtune.trainables.training import LocalReporter

    data, facts = with_artefacts_first(data, config["max_train_records"])
    log(f"  training records: {json.dumps(facts)}")
    histories = {}
    for variant, build in (("fast", None), ("plain", create_plain_model)):
        log(f"  training the {variant} model: {json.dumps(config)}")
        with tempfile.TemporaryDirectory(prefix="leadtune-bench-accuracy-") as tmp:
            reporter = LocalReporter(Path(tmp))
            train_lead_id(config, data, reporter, build_model=build)
            histories[variant] = [{key: m[key] for key in ACCURACY_KEYS} for m in reporter.history]
    return {"config": config, "training_records": facts, **histories}


ACCURACY_KEYS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_lead_accuracy",
    "val_set_accuracy",
    "epoch_seconds",
)


# --- search overhead and memory -----------------------------------------------------------------


class TreeMemorySampler:
    """Samples the summed proportional set size (PSS, shared pages split between their users)
    of this process and all its descendants, and keeps the peak."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_pss_bytes(os.getpid()))
            self._stop.wait(self.interval)


def tree_pss_bytes(root: int) -> int:
    """Summed PSS of ``root`` and its descendants (0 where /proc is missing)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def measure_search(settings: BenchSettings, log: Any) -> list[dict[str, Any]]:
    """A small search with 1 and with 2 concurrent trials: wall time, summed trial time, peak
    memory of the whole process tree (driver, Ray, trial workers)."""
    from leadtune.search.settings import SearchSettings
    from leadtune.search.state import read_state
    from leadtune.search.tuner import run_search
    from leadtune.trainables.tasks import DataRequest

    source = Path(settings.source or sample_dir())
    results = []
    for concurrent in (1, 2):
        with tempfile.TemporaryDirectory(prefix="leadtune-bench-search-") as tmp:
            search = SearchSettings(
                trials=2,
                epochs=1,
                max_concurrent=concurrent,
                cpus_per_trial=1.0,
                scheduler="fifo",
                storage_path=str(Path(tmp) / "runs"),
                tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                promote=False,
                overrides={
                    "encoder": "inception_gru",
                    "context": "sab",
                    "width": 0.25,
                    "d_model": 32,
                    "depth": 1,
                    "heads": 4,
                    "max_train_records": 64,
                    "max_val_records": 32,
                    "num_threads": 1,
                },
                data=DataRequest(source=source, cache_dir=settings.cache_dir, limit=settings.limit),
            )
            log(f"  search: 2 trials, {concurrent} at a time")
            started = time.perf_counter()
            with TreeMemorySampler() as sampler:
                outcome = run_search(search)
            total = time.perf_counter() - started
            state = read_state(Path(outcome.experiment_path))
            trial_seconds = [t.get("seconds") or 0.0 for t in outcome.trials]
            results.append(
                {
                    "max_concurrent": concurrent,
                    "trials": len(outcome.trials),
                    "command_seconds": total,  # Ray and MLflow start-up included
                    "wall_seconds": state.get("wall_seconds"),  # Tuner.fit alone
                    "trial_seconds_sum": sum(trial_seconds),
                    "peak_tree_pss_bytes": sampler.peak_bytes,
                    # CPU seconds outside the trials (search.cpu), as the summary prints them
                    "cpu_outside_share": outcome.cpu.outside_share if outcome.cpu else None,
                    "cpu_seconds": outcome.cpu.seconds if outcome.cpu else {},
                }
            )
            import ray

            ray.shutdown()  # each search starts its own Ray, so both include the start-up
    return results


# --- the command ---------------------------------------------------------------------------------


def command_line(settings: BenchSettings, extra: list[str]) -> str:
    """The command that reproduces these figures."""
    parts = ["leadtune", "bench", "--model", ",".join(settings.models)]
    if settings.quick:
        parts.append("--quick")
    defaults = BenchSettings()
    for name in ("batch_size", "leads", "samples", "warmup", "rounds", "threads", "limit"):
        value = getattr(settings, name)
        if value != getattr(defaults, name) and not settings.quick:
            parts += [f"--{name.replace('_', '-')}", str(value)]
    if not settings.default_allocator and not settings.quick:
        parts.append("--no-default-allocator")
    parts += ["--source", settings.source or "none"]
    for name, value in settings.model_overrides.items():
        parts += [f"--{name.replace('_', '-')}", str(value)]
    return " ".join(parts + extra)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    models = ("reference", "d64") if args.model == "all" else tuple(args.model.split(","))
    source = args.source
    if source is None:
        source = str(SHARED_SUBSET if SHARED_SUBSET.is_dir() else sample_dir())
    overrides = {
        name: getattr(args, name)
        for name in ("width", "depth", "heads", "d_model")
        if getattr(args, name) is not None
    }
    settings = BenchSettings(
        models=models,
        batch_size=args.batch_size,
        leads=args.leads,
        samples=args.samples,
        warmup=args.warmup,
        rounds=args.rounds,
        threads=args.threads,
        default_allocator=not args.no_default_allocator,
        source=None if source.lower() == "none" else source,
        cache_dir=args.cache_dir,
        limit=args.limit,
        measure_epoch=args.measure_epoch,
        quick=args.quick,
        model_overrides=overrides,
    )
    if args.quick:
        # A smoke run: one warm-up step and three rounds (a median that one outlier cannot
        # move) of a small batch, reference size only.
        settings = dataclasses.replace(
            settings,
            models=settings.models[:1],
            batch_size=min(settings.batch_size, 8),
            warmup=min(settings.warmup, 1),
            rounds=min(settings.rounds, 3),
            measure_epoch=False,
        )
    return settings.validate()


def run_bench(args: argparse.Namespace) -> int:
    """With --json the readable figures go to stderr and stdout carries one JSON object."""
    import contextlib

    if not args.json:
        return _run_bench(args)
    with contextlib.redirect_stdout(sys.stderr):
        report: dict = {}
        code = _run_bench(args, report)
    print(json.dumps(report, indent=2, default=str))
    return code


def _run_bench(args: argparse.Namespace, report_out: dict | None = None) -> int:
    settings = settings_from_args(args)
    if settings.source:  # a wrong folder is one line, before any other output
        from leadtune.trainables.data.ptbxl import database_files

        database_files(Path(settings.source))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    extra = [flag for flag, on in (("--accuracy", args.accuracy), ("--search", args.search)) if on]
    print(f"command: {command_line(settings, extra)}")
    from leadtune.trainables.runtime import describe_runtime

    environment = describe_runtime()
    print("environment: " + ", ".join(f"{key}={value}" for key, value in environment.items()))
    if settings.quick:
        print(
            f"quick run: batch {settings.batch_size}, figures are a smoke test, not the reference"
        )

    data, batch_file = load_bench_data(settings, log)
    report: dict[str, Any] = {"command": command_line(settings, extra), "environment": environment}
    try:
        report["models"] = []
        for name in settings.models:
            log(f"measuring {name}")
            measured = measure_model(name, settings, batch_file, log)
            report["models"].append(measured)
            print_model(measured, settings)
        if data is not None:
            pipeline = measure_data_pipeline(data, settings, repeats=1 if settings.quick else 3)
            report["data_pipeline"] = pipeline
            print(
                f"data pipeline (batch cutting + lead shuffle + jitter, {pipeline['records']} "
                f"records): host path {pipeline['host_ecg_per_second']:,.0f} ECG/s, "
                f"on-device path (CPU) {pipeline['on_device_ecg_per_second']:,.0f} ECG/s"
            )
            first = report["models"][0]
            report["epoch_estimates"] = estimate_epochs(first, data, pipeline)
            print(
                f"epoch on {settings.source} ({len(data.train)} train + {len(data.val)} val ECGs, "
                f"{first['model']}), estimated from the medians:"
            )
            for row in report["epoch_estimates"]:
                name = VARIANT_NAMES[(row["variant"], row["allocator"])]
                print(f"  {name:<30} {_duration(row['epoch_seconds'])}")
            if settings.measure_epoch:
                report["epochs"] = measure_epochs(data, settings, log)
                for row in report["epochs"]:
                    print(
                        f"  measured, {row['variant']} ({row['allocator']} malloc): "
                        f"{_duration(row['epoch_seconds'])}"
                    )
        if args.accuracy:
            if data is None:
                raise ValueError("--accuracy needs data: pass --source PTB-XL-FOLDER")
            config = {**ACCURACY_CONFIG, "epochs": args.accuracy_epochs}
            report["accuracy"] = compare_training(data, config, log)
            print_accuracy(report["accuracy"])
        if args.search:
            report["search"] = measure_search(settings, log)
            print_search(report["search"])
    finally:
        if batch_file:
            os.unlink(batch_file)
    report["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average at the end: {report['load_average_end']}")
    if report_out is not None:
        report_out.update(report)
    fast = next(r for r in report["models"][0]["rows"] if r["variant"] == "fast")
    print(f"train: {fast['train_ecg_per_second']:.1f} ECG/s")
    print(f"infer: {fast['infer_ecg_per_second']:.1f} ECG/s")
    return 0


def print_model(measured: dict[str, Any], settings: BenchSettings) -> None:
    config = measured["config"]
    rows = measured["rows"]
    counts = ", ".join(f"{row['parameters']:,}" for row in rows)
    print(
        f"\nmodel {measured['model']}: inception_gru + sab, D={config['d_model']}, "
        f"{settings.leads} leads x {settings.samples} samples, batch {settings.batch_size}, fp32, "
        f"{rows[0]['parameters']:,} parameters (all variants: {counts}), "
        f"{rows[0]['threads']} threads; "
        f"medians of {settings.rounds} steps after {settings.warmup} warm-up"
    )
    print(
        f"  {'ECG/s (median | best step)':<30} {'train':>15} {'infer':>15} "
        f"{'train peak':>10} {'infer peak':>10}"
    )
    for row in rows:
        print(
            f"  {VARIANT_NAMES[(row['variant'], row['allocator'])]:<30} "
            f"{row['train_ecg_per_second']:>7.2f} | {row['train_best_ecg_per_second']:>5.2f} "
            f"{row['infer_ecg_per_second']:>7.2f} | {row['infer_best_ecg_per_second']:>5.2f} "
            f"{_megabytes(row['train_peak_bytes']):>10} {_megabytes(row['infer_peak_bytes']):>10}"
        )
    for label, key in (("medians", "ratios"), ("best steps", "best_ratios")):
        text = ", ".join(
            f"{name.replace('_', ' ')} {value:.2f}x" for name, value in measured[key].items()
        )
        print(f"  fast path speed-up ({label}): {text}")


def _duration(seconds: float) -> str:
    return f"{seconds:7.1f} s ({seconds / 60:.1f} min)"


def _megabytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MB"


def print_accuracy(result: dict[str, Any]) -> None:
    print(f"\ntraining fast vs plain, same seed and batches: {json.dumps(result['config'])}")
    print(f"  on real training records with artefacts: {json.dumps(result['training_records'])}")
    for variant in ("fast", "plain"):
        last = result[variant][-1]
        print(
            f"  {variant:<6} epoch {last['epoch']}: train loss {last['train_loss']:.4f}, "
            f"val loss {last['val_loss']:.4f}, val lead accuracy {last['val_lead_accuracy']:.4f}, "
            f"val set accuracy {last['val_set_accuracy']:.4f}, "
            f"{last['epoch_seconds']:.0f} s/epoch"
        )


def print_search(results: list[dict[str, Any]]) -> None:
    print("\nsmall search (2 trials, 1 epoch, tiny inception_gru + sab):")
    for row in results:
        fit = row["wall_seconds"] or 0.0
        print(
            f"  {row['max_concurrent']} concurrent: command {row['command_seconds']:.0f} s "
            f"(Tuner.fit {fit:.0f} s), trials {row['trial_seconds_sum']:.0f} s summed; "
            f"peak memory (PSS of driver + Ray + workers) "
            f"{_megabytes(row['peak_tree_pss_bytes'])}"
        )
        if row.get("cpu_outside_share") is not None:
            outside = {k: round(v, 1) for k, v in row["cpu_seconds"].items() if k != "trials"}
            print(
                f"    CPU outside trials {100 * row['cpu_outside_share']:.1f} % "
                f"(trials {row['cpu_seconds'].get('trials', 0):.1f} CPU s; outside {outside})"
            )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from leadtune.trainables.commands import DefaultsHelpFormatter

    bench = subparsers.add_parser(
        "bench",
        help="training and inference speed of the reference model, fast path vs plain PyTorch",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    bench.add_argument(
        "--model",
        default="all",
        help="reference (D=128), d64, or all; comma-separated for several",
    )
    bench.add_argument("--quick", action="store_true", help="a smoke run of under a minute")
    bench.add_argument("--batch-size", type=int, default=38, help="ECGs per measured step")
    bench.add_argument("--leads", type=int, default=12, help="leads per ECG in the measured batch")
    bench.add_argument("--samples", type=int, default=1000, help="samples per lead")
    bench.add_argument("--warmup", type=int, default=2, help="unmeasured steps per variant")
    bench.add_argument("--rounds", type=int, default=5, help="measured steps per variant")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    bench.add_argument(
        "--no-default-allocator",
        action="store_true",
        help="skip the plain model under glibc's default malloc settings",
    )
    bench.add_argument(
        "--source",
        default=None,
        help="PTB-XL folder for the batch, data-pipeline and epoch figures (default: the shared "
        "subset beside the checkout, else the bundled sample; 'none' for a random batch)",
    )
    bench.add_argument("--cache-dir", default=None, help="dataset cache root")
    bench.add_argument("--limit", type=int, default=None, help="use only the first N records")
    bench.add_argument(
        "--measure-epoch", action="store_true", help="run one real epoch of fast and plain"
    )
    bench.add_argument(
        "--accuracy", action="store_true", help="train fast and plain side by side (minutes)"
    )
    bench.add_argument(
        "--accuracy-epochs",
        type=int,
        default=ACCURACY_CONFIG["epochs"],
        help="epochs of each side of --accuracy",
    )
    bench.add_argument(
        "--search", action="store_true", help="time a small search with 1 and 2 trials at once"
    )
    bench.add_argument(
        "--json", action="store_true",
        help="print every figure as JSON on standard output (the readable lines go to stderr)",
    )  # fmt: skip
    group = bench.add_argument_group("model overrides (smoke tests)")
    group.add_argument("--d-model", type=int, default=None, help="feature width D")
    group.add_argument("--width", type=float, default=None, help="encoder channel multiplier")
    group.add_argument("--depth", type=int, default=None, help="set attention blocks")
    group.add_argument("--heads", type=int, default=None, help="attention heads")
    bench.set_defaults(func=run_bench)

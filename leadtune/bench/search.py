"""A small search's overhead and the memory of its process tree (``leadtune bench --search``)."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from leadtune.bench.settings import BenchSettings
from leadtune.bundled import sample_dir

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
                    "state_keeping": time_state_keeping(Path(outcome.experiment_path)),
                }
            )
            import ray

            ray.shutdown()  # each search starts its own Ray, so both include the start-up
    return results


def time_state_keeping(search_dir: Path, repeats: int = 31) -> dict[str, float]:
    """Driver CPU the MLflow callback spends keeping Tune's last whole save (search.tune_state),
    on this search's own state files: per save (compare with its copy, write the kept one) and
    per Tune step without a new save (a look at the staging folder). Medians in ms."""
    from leadtune.search.tune_state import keep_whole_save, state_files

    files = state_files(search_dir)
    with tempfile.TemporaryDirectory(prefix="leadtune-bench-state-") as tmp:
        staged, stored = Path(tmp) / "staged", Path(tmp) / "stored"
        for folder in (staged, stored):
            folder.mkdir()
            for f in files:
                (folder / f.name).write_bytes(f.read_bytes())
        per_save, per_step = [], []
        for i in range(repeats):
            stamp = 1e9 + i  # a new save in the staging folder
            for f in state_files(staged):
                os.utime(f, (stamp, stamp))
            started = time.process_time()
            keep_whole_save(staged, stored, stamp - 0.5, {})
            per_save.append(time.process_time() - started)
            started = time.process_time()
            keep_whole_save(staged, stored, stamp, {})
            per_step.append(time.process_time() - started)
    return {
        "bytes": float(sum(f.stat().st_size for f in files)),
        "save_ms": 1000 * sorted(per_save)[repeats // 2],
        "step_ms": 1000 * sorted(per_step)[repeats // 2],
    }

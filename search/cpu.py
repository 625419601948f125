"""What a search costs beyond its trials: CPU seconds of every process the search runs.

A sampler thread in the driver reads, every ``interval_s``, the CPU time (user + system) of the
driver and all its descendants: Ray's processes (GCS, raylet, agents, workers), the local MLflow
server and its watchdog. A process is a trial's when a trial reported from it (Tune puts the
worker's ``pid`` in every result); everything else is outside the trials. A process that ends
between two samples loses at most one interval of its time, so short-lived processes are
slightly under-counted on both sides.

``python -m leadtune.search.cpu PID`` follows a running search (its driver's PID) from outside
and prints the same figures when it ends; ``python -m leadtune.search.cpu server-idle SECONDS``
measures what the local MLflow server costs to start and to keep idle (run it with and without
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true`` to see MLflow's job runner).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

ROLES = ("trials", "driver", "mlflow", "ray", "ray workers (idle)", "other")


# Ray's per-node agents carry a "ray::" title like its workers, but never run a trial.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _ray_worker(title: str) -> bool:
    return title.startswith("ray::") and not title.startswith(RAY_AGENTS)


def _role(cmdline: list[str], name: str, pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    text = " ".join(cmdline) or name
    if "mlflow" in text or "leadtune.search.tracking" in text or "huey" in text:
        return "mlflow"
    if _ray_worker(text):
        return "ray workers (idle)"  # until a trial reports from it
    if "ray" in text or name in ("gcs_server", "raylet"):
        return "ray"
    return "other"


@dataclass
class CpuShare:
    """CPU seconds by role over a search's life (promotion excluded)."""

    wall_s: float
    seconds: dict[str, float] = field(default_factory=dict)
    # the costliest processes outside the trials: [role, command (shortened), CPU seconds]
    top: list[list[Any]] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def trials_s(self) -> float:
        return self.seconds.get("trials", 0.0)

    @property
    def outside_s(self) -> float:
        return self.total_s - self.trials_s

    @property
    def outside_share(self) -> float:
        return self.outside_s / self.total_s if self.total_s > 0 else 0.0

    def sentence(self) -> str:
        parts = ", ".join(
            f"{role} {self.seconds[role]:.1f} s"
            for role in ROLES[1:]
            if self.seconds.get(role, 0.0) >= 0.05
        )
        return (
            f"CPU outside trials: {100 * self.outside_share:.1f} % ({self.outside_s:.1f} of "
            f"{self.total_s:.1f} CPU s over {self.wall_s:.0f} s; {parts or 'none'})"
        )

    def metrics(self) -> dict[str, float]:
        return {
            "search_cpu_total_s": round(self.total_s, 2),
            "search_cpu_trials_s": round(self.trials_s, 2),
            "search_cpu_outside_s": round(self.outside_s, 2),
            "search_cpu_outside_share": round(self.outside_share, 4),
        }


class CpuAccount:
    """Samples the CPU time of a process tree (default: this process and its descendants)."""

    def __init__(self, root_pid: int | None = None, interval_s: float = 2.0):
        self.root = root_pid or os.getpid()
        self.interval_s = interval_s
        # (pid, create time) -> [cpu seconds, role, command]
        self._seen: dict[tuple[int, float], list[Any]] = {}
        self._trial_pids: set[int] = set()
        self._parents: dict[int, int] = {}  # pid -> parent pid, read once per process
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def start(self) -> CpuAccount:
        self._started = time.monotonic()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="leadtune-cpu", daemon=True)
        self._thread.start()
        return self

    def note_trial_pid(self, pid: int) -> None:
        with self._lock:
            self._trial_pids.add(int(pid))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> bool:
        """One reading of the tree; False once the root has gone."""
        import psutil

        try:
            with self._lock:  # (stop() may sample while a late sampler thread still runs)
                pids = self._tree(psutil)
        except psutil.Error:
            return False
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    times = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
                    entry = self._seen.get(key)
                    # a Ray worker's title changes when it takes an actor: read it again
                    if entry is None or entry[1] == "ray workers (idle)":
                        cmdline, name = proc.cmdline(), proc.name()
                    else:
                        cmdline, name = None, None
            except psutil.Error:  # ended while we read it
                continue
            with self._lock:
                if entry is None:
                    entry = self._seen.setdefault(key, [0.0, "", ""])
                if cmdline is not None:
                    entry[1] = _role(cmdline, name, proc.pid, self.root)
                    entry[2] = (" ".join(cmdline) or name)[:120]
                entry[0] = max(entry[0], times.user + times.system)
        return True

    def _tree(self, psutil: Any) -> list[int]:
        """The root's PID and its descendants'. A process's parent is read once, when its PID
        first appears (psutil's own ``children`` reads every process's parent at every
        sample: a few ms each time on a machine with ~100 processes); the root must still
        exist (``psutil.NoSuchProcess`` otherwise)."""
        pids = set(psutil.pids())
        if self.root not in pids:
            raise psutil.NoSuchProcess(self.root)
        for gone in self._parents.keys() - pids:
            del self._parents[gone]
        for pid in pids - self._parents.keys():
            try:
                self._parents[pid] = psutil.Process(pid).ppid()
            except psutil.Error:  # ended between the listing and the read
                continue
        children: dict[int, list[int]] = {}
        for pid, parent in self._parents.items():
            children.setdefault(parent, []).append(pid)
        tree, todo = [], [self.root]
        while todo:  # (a PID reused between two samples keeps a stale parent: no loops)
            pid = todo.pop()
            if pid not in tree:
                tree.append(pid)
                todo.extend(children.get(pid, ()))
        return tree

    def close(self) -> None:
        """End the sampling without a last reading (error paths)."""
        self._stop.set()

    def stop(self) -> CpuShare:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample()
        return self.share()

    def share(self) -> CpuShare:
        seconds = dict.fromkeys(ROLES, 0.0)
        outside = []
        with self._lock:
            for (pid, _), (cpu, role, command) in self._seen.items():
                role = "trials" if pid in self._trial_pids else role
                seconds[role] += cpu
                if role != "trials":
                    outside.append([role, command, round(cpu, 2)])
        outside.sort(key=lambda item: -item[2])
        return CpuShare(time.monotonic() - self._started, seconds, outside[:12])


_ACTIVE: list[CpuAccount] = []  # the driver's account (Tune pickles its callbacks)


def activate(account: CpuAccount) -> None:
    """Make ``account`` the one that ``search.callback.TrialPidCallback`` tells of trial PIDs."""
    _ACTIVE[:] = [account]


def note_trial_pid(pid: int) -> None:
    if _ACTIVE:
        _ACTIVE[0].note_trial_pid(pid)


def _follow(argv: list[str]) -> int:
    """Follow a running search from outside: ``python -m leadtune.search.cpu DRIVER_PID``.

    From outside, trial workers are told by their process title (Tune's trial actors are named
    ``ray::ImplicitFunc`` or after the trainable); the driver-side account uses reported PIDs.
    """
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m leadtune.search.cpu DRIVER_PID", file=sys.stderr)
        return 2
    import psutil

    account = CpuAccount(int(argv[0]), interval_s=2.0)
    if not account.sample():
        print(f"no process {argv[0]}", file=sys.stderr)
        return 1
    account._started = time.monotonic()
    beat = 0
    while account.sample():
        for proc in psutil.Process(account.root).children(recursive=True):
            try:
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if _ray_worker(title) and "IDLE" not in title:
                account.note_trial_pid(proc.pid)
        beat += 1
        if beat % 15 == 0:  # a line every 30 s
            print(account.share().sentence(), flush=True)
        time.sleep(account.interval_s)
    print(account.share().sentence(), flush=True)
    return 0


def _server_idle(seconds: float) -> int:
    import tempfile
    from pathlib import Path

    from leadtune.search.tracking import MlflowServer

    account = CpuAccount(interval_s=1.0).start()
    with tempfile.TemporaryDirectory(prefix="leadtune-server-idle-") as tmp:
        server = MlflowServer(db_path=Path(tmp) / "mlflow.db", artifacts=Path(tmp) / "art")
        server.start()
        started = account.share()
        time.sleep(seconds)
        idle = account.stop()
        server.stop()
    processes = [row for row in idle.top if row[0] == "mlflow"]
    job_runner = os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false (leadtune's default)")
    print(
        f"MLflow server, job runner {job_runner}: {len(processes)} processes; start-up "
        f"{started.total_s:.1f} CPU s; then {idle.total_s - started.total_s:.1f} CPU s over "
        f"{seconds:g} s idle"
    )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["server-idle"] and len(sys.argv) == 3:
        raise SystemExit(_server_idle(float(sys.argv[2])))
    raise SystemExit(_follow(sys.argv[1:]))

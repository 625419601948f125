"""Crash points and the storage guard: what a search does when its process dies or its disk fills.

**Crash points** make the fault-injection tests (``tests/test_faults.py``) repeatable without
sleeps: ``LEADTUNE_CRASH_AT=NAME`` (or ``NAME:N``, the N-th time that point is reached) makes the
process kill itself with SIGKILL at the named point, as ``kill -9`` would: no cleanup, no
``finally``. Unset (always, outside tests) a crash point costs one dictionary lookup. The points
are listed in :data:`CRASH_POINTS` and in ``docs/faults.md``.

**The storage guard** ends a search at once, as ``interrupted`` (resumable), when its storage
path runs out of space: before the trials fill the last bytes (less than ``LEADTUNE_MIN_FREE_MB``
free, default 64), and when a write there fails with ENOSPC (a trial's checkpoint, the state
file, the SQLite databases behind MLflow and Optuna). The message is one line naming the path
and its free space.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any


class Interrupted(Exception):
    """The work stopped part-way and can be finished (a resume, ``leadtune promote``): the CLI
    prints its one line saying how and exits with status 3."""


CRASH_ENV = "LEADTUNE_CRASH_AT"
MIN_FREE_ENV = "LEADTUNE_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 64.0

# Where the driver can be made to die (see docs/faults.md); the tests define one case per point.
CRASH_POINTS = (
    "trial_last_report",  # the driver has logged a trial's last result, before its end is told
    "trial_checkpoint",  # Tune has registered a trial's checkpoint
    "optuna_tell",  # Optuna has stored a trial's end; Tune and the state file do not know it
    "trial_end_recorded",  # the state file records a trial's end; its MLflow run is RUNNING
    "tune_checkpoint",  # Tune's experiment state, saved after a trial's end and copied to storage
    "promote_model_logged",  # the model package is in the trial's run; nothing registered
    "promote_run_metrics",  # the test figures are on the trial's run
    "promote_version_created",  # the version exists with its tags; no alias yet
    "promote_alias_set",  # the champion alias moved; the runs are not marked promoted
)

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here (SIGKILL) when ``LEADTUNE_CRASH_AT`` names this point; nothing otherwise."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        print(f"[leadtune] crash point {name}: killing this process", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # (never reached: SIGKILL is not delivered late)


def armed(name: str) -> bool:
    """Whether ``LEADTUNE_CRASH_AT`` names this point (for points that need a check first)."""
    return os.environ.get(CRASH_ENV, "").partition(":")[0] == name


# -- storage ---------------------------------------------------------------------------------------


class StorageFull(OSError):
    """The storage path is (nearly) full: the search stops as interrupted (exit status 3)."""

    def __init__(self, path: Path, free: int, what: str = ""):
        self.path, self.free = Path(path), free
        doing = f" ({what})" if what else ""
        super().__init__(errno.ENOSPC, f"storage path {self.path} is full: {_mb(free)} free{doing}")

    def __str__(self) -> str:
        return self.strerror


def _mb(free: int) -> str:
    return f"{free / 2**20:.1f} MB"


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the file system holding ``path`` or its nearest parent."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def min_free_bytes() -> int:
    try:
        return int(float(os.environ.get(MIN_FREE_ENV, DEFAULT_MIN_FREE_MB)) * 2**20)
    except ValueError:
        return int(DEFAULT_MIN_FREE_MB * 2**20)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an exception, or one in its chain, is a full disk: ENOSPC, SQLite's "database or
    disk is full", or an MLflow server's answer that carries either."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, StorageFull):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "database or disk is full" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def text_says_disk_full(text: str) -> bool:
    return "No space left on device" in text or "database or disk is full" in text


class StorageGuard:
    """Checks the storage path's free space, at most once per ``every`` seconds."""

    def __init__(self, path: Path, every: float = 1.0):
        self.path, self.every = Path(path), every
        self._last = 0.0

    def check(self, what: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        free = free_bytes(self.path)
        if free < min_free_bytes():
            raise StorageFull(self.path, free, what or f"under {MIN_FREE_ENV}="
                              f"{min_free_bytes() / 2**20:g}")  # fmt: skip

    def full_error(self, what: str = "") -> StorageFull:
        return StorageFull(self.path, free_bytes(self.path), what)


def check_start_space(path: Path) -> None:
    """Before a search starts: refuse a storage path that is already below the reserve."""
    free = free_bytes(path)
    if free < min_free_bytes():
        raise ValueError(
            f"--storage-path {Path(path)} has {_mb(free)} free, under the "
            f"{min_free_bytes() / 2**20:g} MB a search keeps in reserve ({MIN_FREE_ENV}); free "
            "space there or pass another --storage-path"
        )


def describe(exc: BaseException, path: Path) -> str:
    """The one line for a full disk found in ``exc``'s chain."""
    found: Any = exc
    while found is not None and not isinstance(found, StorageFull):
        found = found.__cause__ or found.__context__
    if found is not None:
        return str(found)
    return str(StorageFull(path, free_bytes(path), "a write there failed"))

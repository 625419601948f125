"""A search's folder, its state file and lifecycle, and the locks that keep searches apart.

Every search gets a folder of its own, ``<storage>/<study>/search-YYYYmmdd-HHMMSS[-N]`` (created
atomically, so two searches started in the same second never share one), which Ray Tune also
writes its experiment into. ``leadtune_search.json`` there records the search's settings and its
status:

- ``running``: the driver holds the search's run lock (see :func:`run_lock`);
- ``interrupted``: at least one trial did not reach an end (Ctrl-C, a killed driver, a crash);
  the search is resumable with ``--resume`` and promotes nothing;
- ``finished``: every trial ended (completed, stopped early, or failed); the best one may be
  promoted.

A trial's own end is recorded by the driver as it happens (``trials`` in the state file, see
``tracking.MlflowTrialCallback``): a trial whose end was not recorded never counts as completed.
Locks are ``flock`` locks, which the kernel releases when their process dies, so a killed
process never leaves a lock behind.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leadtune.trainables.runtime import LockBusy, file_lock

STATE_FILE = "leadtune_search.json"
RUN_LOCK = ".leadtune-run.lock"

RUNNING, INTERRUPTED, FINISHED = "running", "interrupted", "finished"
# How a trial ended, as recorded when it did.
TERMINAL_TRIAL_STATES = (
    "completed",
    "early_stopped_scheduler",
    "early_stopped_patience",
    "stopped_by_budget",
    "failed",
)
SUCCESSFUL_TRIAL_STATES = TERMINAL_TRIAL_STATES[:-1]


def new_search_dir(study_dir: Path) -> Path:
    """A fresh, unique search folder under ``study_dir`` (created here)."""
    study_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("search-%Y%m%d-%H%M%S")
    for n in itertools.count():
        path = study_dir / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def read_state(path: Path) -> dict[str, Any]:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a leadtune search folder (no {STATE_FILE})")
    return json.loads(file.read_text())


def write_state(path: Path, **values: Any) -> dict[str, Any]:
    """Merge ``values`` into the state file, atomically (readers never see half a file)."""
    file = Path(path) / STATE_FILE
    state = json.loads(file.read_text()) if file.exists() else {}
    state.update(values)
    path.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, file)
    return state


def record_trial_end(path: Path, trial_id: str, state: str, **facts: Any) -> None:
    """Record that a trial ended, and how (called by the driver when Tune reports it)."""
    with file_lock(Path(path) / ".state.lock", "the search state file", quiet=True):
        trials = read_state(path).get("trials", {})
        trials[trial_id] = {"state": state, **facts}
        write_state(path, trials=trials)


def searches(study_dir: Path) -> list[Path]:
    """The study's search folders, oldest first."""
    return sorted(p.parent for p in Path(study_dir).glob(f"*/{STATE_FILE}"))


def is_running(path: Path) -> bool:
    """Whether a live process holds the search's run lock."""
    try:
        with file_lock(Path(path) / RUN_LOCK, "", timeout=0, quiet=True):
            return False
    except LockBusy:
        return True


def latest_unfinished(study_dir: Path) -> Path | None:
    """The newest search of the study that did not finish and is not running now."""
    for path in reversed(searches(study_dir)):
        if read_state(path).get("status") != FINISHED and not is_running(path):
            return path
    return None


def find_search(storage_path: Path, study: str | None, given: str | None = None) -> Path:
    """The search folder named by ``--experiment``, else the study's newest search; without a
    study, the only study under ``storage_path`` (several: a one-line error naming them)."""
    if given:
        path = Path(given)
        read_state(path)  # a one-line error where it is not a search folder
        return path
    storage = Path(storage_path)
    if study is None:
        studies = sorted({p.parent.parent.name for p in storage.glob(f"*/*/{STATE_FILE}")})
        if not studies:
            raise FileNotFoundError(
                f"no leadtune search under {storage}; pass the --storage-path a search used"
            )
        if len(studies) > 1:
            raise FileNotFoundError(
                f"several studies under {storage} ({', '.join(studies)}); pass --study NAME"
            )
        study = studies[0]
    found = searches(storage / study)
    if not found:
        raise FileNotFoundError(
            f"no search of study {study!r} under {storage}; pass the --storage-path the search "
            "used and --study"
        )
    return found[-1]


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """Held while a driver runs (or resumes) the search in ``path``: a second driver on the same
    search is refused at once instead of running its trials twice."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                file_lock(Path(path) / RUN_LOCK, f"search {path}", timeout=0, quiet=True)
            )
        except LockBusy as exc:
            raise ValueError(
                f"{exc}: that search is running now; wait for it or stop it first"
            ) from None
        yield

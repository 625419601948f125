"""A search's folder, its state file and lifecycle, and the locks that keep searches apart.

Every search gets a folder of its own, ``<storage>/<study>/search-YYYYmmdd-HHMMSS[-N]`` (created
atomically, so two searches started in the same second never share one), which Ray Tune also
writes its experiment into. ``leadtune_search.state`` there (JSON) records the search's settings
and its status:

- ``running``: the driver holds the search's run lock (see :func:`run_lock`);
- ``interrupted``: at least one trial did not reach an end (Ctrl-C, a killed driver, a crash);
  the search is resumable with ``--resume`` and promotes nothing;
- ``finished``: every trial ended (completed, stopped early, or failed); the best one may be
  promoted.

A trial's own end is recorded by the driver as it happens (``trials`` in the state file, see
``tracking.MlflowTrialCallback``): a trial whose end was not recorded never counts as completed.
The state file's name must not end in ``.json`` or ``.pkl``: on resume, Tune copies every such file
of the experiment folder into its staging folder and copies them back over the originals at each
experiment snapshot, which would put back the state as it was when the resume started (and lose
the trial ends recorded since). Searches from leadtune 0.1 have ``leadtune_search.json``; it is
read when the new file is absent and replaced by it at the next write.
Locks are ``flock`` locks, which the kernel releases when their process dies, so a killed
process never leaves a lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leadtune.trainables.runtime import LockBusy, file_lock

STATE_FILE = "leadtune_search.state"
LEGACY_STATE_FILE = "leadtune_search.json"  # leadtune 0.1
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


def state_file(path: Path) -> Path:
    """The search's state file: ``leadtune_search.state``, else a 0.1 search's legacy one."""
    file = Path(path) / STATE_FILE
    legacy = Path(path) / LEGACY_STATE_FILE
    return legacy if not file.is_file() and legacy.is_file() else file


def is_search_dir(path: Path) -> bool:
    return state_file(path).is_file()


def read_state(path: Path) -> dict[str, Any]:
    file = state_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a leadtune search folder (no {STATE_FILE})")
    return json.loads(file.read_text())


def write_state(path: Path, **values: Any) -> dict[str, Any]:
    """Merge ``values`` into the state file, atomically (readers never see half a file)."""
    current = state_file(path)
    state = json.loads(current.read_text()) if current.exists() else {}
    state.update(values)
    file = Path(path) / STATE_FILE
    path.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    text = json.dumps(state, indent=2, default=str)
    try:
        tmp.write_text(text)
        os.replace(tmp, file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno != errno.ENOSPC or not file.is_file():
            raise
        _write_in_place(file, text)  # a full disk: the blocks the file holds are enough
    return state


def _write_in_place(file: Path, text: str) -> None:
    """Rewrite ``file`` over its own blocks (no new file on a full disk): the new text, padded
    with spaces to the old length where it is shorter (JSON ignores trailing spaces), so no
    block is freed and needed again. A reader may see it half-written for a moment."""
    data = text.encode()
    with open(file, "r+b") as f:
        old = f.seek(0, os.SEEK_END)
        f.seek(0)
        f.write(data + b" " * max(0, old - len(data)))
        f.flush()
        os.fsync(f.fileno())


def record_trial_end(path: Path, trial_id: str, state: str, **facts: Any) -> None:
    """Record that a trial ended, and how (called by the driver when Tune reports it)."""
    with file_lock(Path(path) / ".state.lock", "the search state file", quiet=True):
        trials = read_state(path).get("trials", {})
        trials[trial_id] = {"state": state, **facts}
        write_state(path, trials=trials)


def searches(study_dir: Path) -> list[Path]:
    """The study's search folders, oldest first."""
    return sorted(p for p in Path(study_dir).glob("*") if p.is_dir() and is_search_dir(p))


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
        studies = sorted(
            {p.parent.name for p in storage.glob("*/*") if p.is_dir() and is_search_dir(p)}
        )
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

"""Tune's saved search state, kept whole for a resume after a kill that tore it.

Tune saves a search's state (its trials, the searcher, the trial generator:
``experiment_state-*.json``, ``searcher-state-*.pkl``, ``search_gen_state-*.json``,
``tuner.pkl``) into a local staging folder during its loop, and a thread then copies the folder
into the search's folder, writing each file in place. A driver killed during that copy (SIGKILL,
the OOM killer, a lost node) leaves a torn file there, and Tune's resume then logs an error and
starts the search afresh, beside the trials that Optuna, MLflow and the state file already hold.

So the MLflow callback keeps the last save whose copy arrived whole, in ``.leadtune-tune-state/``
inside the search's folder (:func:`keep_whole_save`: a compare and a copy of a few files per save,
which Tune makes every 10 s or more, and once more when the search stops), and a resume whose
state files are torn puts that save back first (:func:`repair`; the files it replaces are kept
beside as ``*.set-aside``). Only the files Tune reads count: the newest of each kind and
``tuner.pkl`` (older sessions' files are copied along, never read). Rolling Tune back
to an earlier save is a case the resume handles anyway (a driver killed between a trial's end and
Tune's next save): a trial Optuna already holds as finished is not told again, an MLflow run is
found again by its trial id. Without a kept save a torn state is a one-line refusal
(:func:`check`), not a silent fresh start.

Nothing here runs a pickle: a ``.pkl`` is read as a stream of opcodes only, to see that it ends.
"""

from __future__ import annotations

import json
import os
import pickletools
import shutil
from pathlib import Path

KEPT_DIR = ".leadtune-tune-state"
SET_ASIDE = ".set-aside"
LOOP_PREFIXES = ("experiment_state-", "searcher-state-", "search_gen_state-")
TUNER_FILE = "tuner.pkl"


def state_files(folder: Path) -> list[Path]:
    """The files Tune restores a search from: the folder's top-level ``.json`` and ``.pkl``."""
    return sorted(
        f for f in Path(folder).glob("*") if f.suffix in (".json", ".pkl") and f.is_file()
    )


def is_loop_file(name: str) -> bool:
    """Whether Tune rewrites this file at each save (the rest, ``tuner.pkl``, is written once)."""
    return name.startswith(LOOP_PREFIXES)


def read_files(folder: Path) -> list[Path]:
    """The state files a resume reads: the newest (by name: they carry the session's start
    time) of each kind Tune saves in its loop, and ``tuner.pkl``."""
    files = state_files(folder)
    newest = [max((f for f in files if f.name.startswith(prefix)), key=lambda f: f.name,
                  default=None) for prefix in LOOP_PREFIXES]  # fmt: skip
    return [f for f in [*newest, Path(folder) / TUNER_FILE] if f is not None and f.is_file()]


def is_torn(path: Path) -> bool:
    """Whether a state file stops part-way: JSON that does not parse, a pickle whose opcodes do
    not reach its STOP (read with ``pickletools``, nothing is run). Which one it is comes from
    its first byte, not its name (Tune's ``search_gen_state-*.json`` is a pickle)."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\x80"):  # every pickle protocol from 2 on starts with PROTO
        try:
            json.loads(data)
        except ValueError:
            return True
        return False
    try:
        last = None
        for opcode, _, _ in pickletools.genops(data):
            last = opcode.name
    except Exception:  # a truncated or garbled stream, whatever the opcode reader says
        return True
    return last != "STOP"


def _newest(files: list[Path]) -> float:
    return max((f.stat().st_mtime for f in files), default=0.0)


def newest_save(staged: Path) -> float:
    """When Tune last saved into its staging folder (0.0 before its first save)."""
    return _newest(state_files(staged))


def whole_copy(staged: Path, stored: Path) -> dict[str, bytes] | None:
    """The staged save's files by name when each is in ``stored`` byte for byte; ``None`` while
    its copy has not arrived whole."""
    blobs = {}
    for f in state_files(staged):
        data, copy = f.read_bytes(), Path(stored) / f.name
        if not copy.is_file() or copy.read_bytes() != data:
            return None
        blobs[f.name] = data
    return blobs


def keep_whole_save(
    staged: Path, stored: Path, since: float, memo: dict | None = None
) -> float | None:
    """If Tune's newest save in ``staged`` (newer than ``since``, a modification time) is in
    ``stored`` byte for byte, keep a copy of it in ``stored/.leadtune-tune-state`` and return its
    time; ``None`` while there is no newer save or its copy has not arrived yet. ``memo`` (a dict
    the caller keeps) spares re-reading files that have not changed since the last mismatch."""
    files = state_files(staged)
    newest = _newest(files)
    if newest <= since:
        return None
    copies = [Path(stored) / f.name for f in files]
    try:
        seen = tuple((f.name, f.stat().st_size, c.stat().st_size, c.stat().st_mtime_ns)
                     for f, c in zip(files, copies))  # fmt: skip
    except FileNotFoundError:  # a copy not there yet
        return None
    if any(a != b for _, a, b, _ in seen) or (
        memo is not None and memo.get("seen") == (newest, seen)
    ):
        return None
    blobs = whole_copy(staged, stored)
    if blobs is None:
        if memo is not None:
            memo["seen"] = (newest, seen)
        return None
    tuner = Path(stored) / TUNER_FILE  # a first session writes it into the storage path only
    if TUNER_FILE not in blobs and tuner.is_file() and not is_torn(tuner):
        blobs[TUNER_FILE] = tuner.read_bytes()
    kept = Path(stored) / KEPT_DIR
    name = f"{int(newest * 1000):015d}"
    part = kept / f"{name}.part"  # written whole, then renamed: a kill leaves no half save
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    for file_name, data in blobs.items():
        (part / file_name).write_bytes(data)
    if (kept / name).exists():
        shutil.rmtree(kept / name)
    part.rename(kept / name)
    for older in kept.iterdir():  # only the newest whole save is kept
        if older.name != name:
            shutil.rmtree(older, ignore_errors=True)
    return newest


def _latest_kept(search_dir: Path) -> Path | None:
    kept = Path(search_dir) / KEPT_DIR
    saves = [d for d in kept.glob("*") if d.is_dir() and d.name.isdigit()] if kept.is_dir() else []
    return max(saves, key=lambda d: d.name, default=None)


def torn_files(search_dir: Path) -> list[Path]:
    """The torn files among those a resume reads (:func:`read_files`)."""
    return [f for f in read_files(search_dir) if is_torn(f)]


def _beyond_repair(search_dir: Path, torn: list[Path]) -> list[Path]:
    """The torn files the kept save cannot stand in for (all of them when none is kept)."""
    kept = _latest_kept(search_dir)
    if kept is None:
        return torn
    names = {f.name for f in state_files(kept)}
    return [f for f in torn if f.name not in names and not is_loop_file(f.name)]


def check(search_dir: Path, study: str) -> None:
    """Refuse a resume whose Tune state is torn where no whole save kept can replace it."""
    lost = _beyond_repair(search_dir, torn_files(search_dir))
    if lost:
        raise ValueError(
            f"cannot resume {search_dir}: Tune's saved state {lost[0].name} is incomplete (the "
            f"search was killed while Tune wrote it) and no whole save of it was kept; start a "
            f"new search of the study instead (leadtune search --study {study} ...), which "
            "continues it"
        )


def _aside(path: Path) -> Path:
    """A free ``*.set-aside`` name beside ``path``."""
    target, n = path.with_name(path.name + SET_ASIDE), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}{SET_ASIDE}.{n}"), n + 1
    return target


def _put_back(current: Path, data: bytes) -> None:
    """Keep ``current`` as ``*.set-aside`` (if there) and put ``data`` in its place atomically."""
    if current.exists():
        aside = _aside(current)
        try:
            os.link(current, aside)
        except OSError:  # (a file system without hard links)
            shutil.copy2(current, aside)
    temporary = current.with_name(f".{current.name}.leadtune-tmp")
    temporary.write_bytes(data)
    os.replace(temporary, current)


def repair(search_dir: Path) -> str | None:
    """Put the kept whole save back where a file a resume reads is torn. What it replaces is kept
    as ``*.set-aside``: every file of the kept save that differs from it, and the files Tune
    rewrites at each save that are newer than it (a later session's). The torn files are dealt
    with last, so a repair cut short is found torn, and finished, by the next resume. Returns a
    line saying what was done, or ``None`` when nothing was torn."""
    search_dir = Path(search_dir)
    torn = torn_files(search_dir)
    if not torn:
        return None
    lost, kept = _beyond_repair(search_dir, torn), _latest_kept(search_dir)
    if lost or kept is None:  # (check() refuses this before any work)
        raise ValueError(f"cannot resume {search_dir}: {(lost or torn)[0].name} is incomplete")
    whole = {f.name: f.read_bytes() for f in state_files(kept)}
    torn_names = {f.name for f in torn}
    current = {f.name: f for f in state_files(search_dir)}
    order = sorted(set(whole) | set(current), key=lambda n: (n in torn_names, n))
    for name in order:
        path = search_dir / name
        if name in whole:
            if name not in current or whole[name] != current[name].read_bytes():
                _put_back(path, whole[name])
        elif is_loop_file(name):  # newer than the kept save
            path.rename(_aside(path))
    names = ", ".join(f.name for f in torn)
    return (
        f"Tune's saved state was torn by the kill ({names}); resuming from its last whole save "
        f"(the replaced files are kept as *{SET_ASIDE})"
    )

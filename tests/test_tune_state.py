"""Tune's saved state kept whole (search/tune_state.py): what is kept, what counts as torn, and
the repair a resume makes. The end-to-end case (a real search whose state is torn, resumed) is
in tests/test_faults.py."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from leadtune.search import tune_state
from leadtune.search.tune_state import KEPT_DIR, SET_ASIDE, is_torn, keep_whole_save, repair


def _save(folder: Path, session: str, trials: int, mtime: float | None = None) -> None:
    """Files shaped like one Tune save (a session's state, searcher and generator files)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        f"experiment_state-{session}.json": json.dumps(
            {"trial_data": list(range(trials))}
        ).encode(),
        f"searcher-state-{session}.pkl": pickle.dumps({"asked": trials}),
        # (Tune's generator state is a pickle, its name notwithstanding)
        f"search_gen_state-{session}.json": pickle.dumps({"counter": trials}),
        "tuner.pkl": pickle.dumps({"name": "search"}),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
        if mtime is not None:
            os.utime(folder / name, (mtime, mtime))


def _copy(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for f in tune_state.state_files(source):
        (target / f.name).write_bytes(f.read_bytes())


class _Runs:
    """A pickle that would run code when loaded (it must never be)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_torn_files_are_found_without_running_a_pickle(tmp_path):
    good_json, cut_json = tmp_path / "a.json", tmp_path / "b.json"
    good_json.write_text(json.dumps({"x": [1, 2, 3]}))
    cut_json.write_text(json.dumps({"x": [1, 2, 3]})[:7])
    marker = tmp_path / "ran"
    armed = pickle.dumps(_Runs(marker))
    good_pkl, cut_pkl, empty = tmp_path / "c.pkl", tmp_path / "d.pkl", tmp_path / "e.pkl"
    good_pkl.write_bytes(armed)
    cut_pkl.write_bytes(armed[: len(armed) // 2])
    empty.write_bytes(b"")
    assert not is_torn(good_json) and is_torn(cut_json)
    assert not is_torn(good_pkl) and is_torn(cut_pkl) and is_torn(empty)
    assert not marker.exists()  # read as opcodes only


def test_a_save_is_kept_only_once_its_copy_is_whole_and_only_the_newest(tmp_path):
    staged, stored = tmp_path / "staged", tmp_path / "stored"
    _save(staged, "s1", trials=1, mtime=1000.0)
    stored.mkdir()
    assert keep_whole_save(staged, stored, since=0.0) is None  # nothing copied yet
    _copy(staged, stored)
    (stored / "experiment_state-s1.json").write_bytes(b'{"trial_da')  # a copy part-way
    assert keep_whole_save(staged, stored, since=0.0) is None
    _copy(staged, stored)
    assert keep_whole_save(staged, stored, since=0.0) == 1000.0
    assert keep_whole_save(staged, stored, since=1000.0) is None  # no newer save
    _save(staged, "s1", trials=2, mtime=1010.0)
    _copy(staged, stored)
    assert keep_whole_save(staged, stored, since=1000.0) == 1010.0
    (kept,) = (stored / KEPT_DIR).iterdir()
    assert json.loads((kept / "experiment_state-s1.json").read_text()) == {"trial_data": [0, 1]}


def test_a_torn_state_is_replaced_by_the_kept_save_and_nothing_is_lost(tmp_path):
    staged, search = tmp_path / "staged", tmp_path / "search"
    _save(staged, "s1", trials=1, mtime=1000.0)
    _copy(staged, search)
    assert keep_whole_save(staged, search, since=0.0) == 1000.0
    assert repair(search) is None  # whole: nothing to do
    # a later session of the search (a resume) was killed while Tune copied its first save
    _save(staged, "s2", trials=2)
    _copy(staged, search)
    torn = search / "searcher-state-s2.pkl"
    torn.write_bytes(torn.read_bytes()[:20])
    tune_state.check(search, "smoke")  # a kept save: no refusal
    line = repair(search)
    assert line is not None and "searcher-state-s2.pkl" in line
    assert {f.name for f in tune_state.state_files(search)} == {
        "experiment_state-s1.json", "searcher-state-s1.pkl", "search_gen_state-s1.json",
        "tuner.pkl",
    }  # fmt: skip
    assert not any(is_torn(f) for f in tune_state.state_files(search))
    aside = sorted(f.name for f in search.glob(f"*{SET_ASIDE}"))
    assert aside == [f"{n}{SET_ASIDE}" for n in ("experiment_state-s2.json",
                                                 "search_gen_state-s2.json",
                                                 "searcher-state-s2.pkl")]  # fmt: skip


def test_a_first_session_keeps_its_tuner_file_and_a_torn_one_is_refused(tmp_path):
    """In a search's first session Tune writes ``tuner.pkl`` straight into the storage path
    (not through the staging folder), so the kept save does not hold it: a repair leaves it be,
    and a torn one cannot be repaired."""
    staged, search = tmp_path / "staged", tmp_path / "search"
    _save(staged, "s1", trials=1, mtime=1000.0)
    _copy(staged, search)
    (staged / "tuner.pkl").unlink()
    assert keep_whole_save(staged, search, since=0.0) == 1000.0
    tuner = (search / "tuner.pkl").read_bytes()
    (search / "experiment_state-s1.json").write_bytes(b'{"trial')
    assert repair(search) is not None
    assert (search / "tuner.pkl").read_bytes() == tuner
    assert not list(search.glob(f"tuner.pkl{SET_ASIDE}"))
    (search / "tuner.pkl").write_bytes(tuner[:30])
    with pytest.raises(ValueError, match="tuner.pkl is incomplete"):
        tune_state.check(search, "smoke")


def test_a_torn_state_with_nothing_kept_is_refused_in_one_line(tmp_path):
    _save(tmp_path, "s1", trials=1)
    (tmp_path / "experiment_state-s1.json").write_bytes(b"")
    with pytest.raises(ValueError) as caught:
        tune_state.check(tmp_path, "smoke")
    message = str(caught.value)
    assert "\n" not in message and "experiment_state-s1.json is incomplete" in message
    assert "leadtune search --study smoke" in message

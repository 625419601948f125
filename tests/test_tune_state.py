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


def _two_sessions(tmp_path: Path) -> Path:
    """A search folder after a resume: session 1's save kept, session 2's copied in whole."""
    staged, search = tmp_path / "staged", tmp_path / "search"
    _save(staged, "s1", trials=1, mtime=1000.0)
    _copy(staged, search)
    assert keep_whole_save(staged, search, since=0.0) == 1000.0
    _save(staged, "s2", trials=2, mtime=1010.0)
    _copy(staged, search)
    return search


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


def test_a_first_session_keeps_the_tuner_file_it_wrote_straight_to_storage(tmp_path):
    """In a search's first session Tune writes ``tuner.pkl`` straight into the storage path,
    not through the staging folder: the kept save takes it from there, and a later session
    that tears it (each of its copies rewrites every file) gets it back."""
    staged, search = tmp_path / "staged", tmp_path / "search"
    _save(staged, "s1", trials=1, mtime=1000.0)
    _copy(staged, search)
    (staged / "tuner.pkl").unlink()
    assert keep_whole_save(staged, search, since=0.0) == 1000.0
    tuner = (search / "tuner.pkl").read_bytes()
    (search / "tuner.pkl").write_bytes(tuner[:30])
    tune_state.check(search, "smoke")
    assert repair(search) is not None
    assert (search / "tuner.pkl").read_bytes() == tuner
    assert (search / f"tuner.pkl{SET_ASIDE}").read_bytes() == tuner[:30]


def test_a_torn_file_tune_does_not_read_changes_nothing(tmp_path):
    """A later session's copies rewrite the earlier sessions' files too (Tune brings them into
    its staging folder on resume); Tune reads only the newest of each kind, so a torn older one
    is no reason to roll a whole newer state back."""
    search = _two_sessions(tmp_path)
    (search / "experiment_state-s1.json").write_bytes(b'{"tri')
    tune_state.check(search, "smoke")
    assert repair(search) is None
    assert json.loads((search / "experiment_state-s2.json").read_text())["trial_data"] == [0, 1]
    assert not list(search.glob(f"*{SET_ASIDE}*"))


def test_a_repair_cut_short_is_finished_by_the_next_resume(tmp_path, monkeypatch):
    search = _two_sessions(tmp_path)
    (search / "searcher-state-s2.pkl").write_bytes(b"\x80\x05")  # torn
    renamed = []
    real_rename = Path.rename

    def dies_on_second(self, target):  # the process dies during the repair's second step
        if renamed:
            raise KeyboardInterrupt
        renamed.append(self.name)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        repair(search)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert renamed and "searcher-state-s2.pkl" not in renamed  # the torn file is dealt with last
    assert tune_state.torn_files(search)  # so the next resume still sees it
    assert repair(search) is not None
    assert {f.name for f in tune_state.state_files(search)} == {
        "experiment_state-s1.json", "searcher-state-s1.pkl", "search_gen_state-s1.json",
        "tuner.pkl",
    }  # fmt: skip
    assert not tune_state.torn_files(search)


def test_a_save_whose_copy_is_not_there_is_read_again_once_it_changes(tmp_path):
    staged, stored, memo = tmp_path / "staged", tmp_path / "stored", {}
    _save(staged, "s1", trials=1, mtime=1000.0)
    _copy(staged, stored)
    state = stored / "experiment_state-s1.json"
    whole = state.read_bytes()
    state.write_bytes(whole.replace(b"0", b"7"))  # same size, other bytes: an older save
    assert keep_whole_save(staged, stored, 0.0, memo) is None and memo
    assert keep_whole_save(staged, stored, 0.0, memo) is None  # nothing changed: not re-read
    state.write_bytes(whole)
    os.utime(state, ns=(state.stat().st_mtime_ns + 10**6,) * 2)
    assert keep_whole_save(staged, stored, 0.0, memo) == 1000.0


def test_a_torn_state_with_nothing_kept_is_refused_in_one_line(tmp_path):
    _save(tmp_path, "s1", trials=1)
    (tmp_path / "experiment_state-s1.json").write_bytes(b"")
    with pytest.raises(ValueError) as caught:
        tune_state.check(tmp_path, "smoke")
    message = str(caught.value)
    assert "\n" not in message and "experiment_state-s1.json is incomplete" in message
    assert "leadtune search --study smoke" in message


def test_the_bench_times_keeping_a_search_s_own_state_files(tmp_path):
    from leadtune.bench.search import time_state_keeping

    _save(tmp_path, "s1", trials=3)
    timing = time_state_keeping(tmp_path, repeats=3)
    assert timing["bytes"] == sum(f.stat().st_size for f in tune_state.state_files(tmp_path))
    assert timing["save_ms"] > 0 and timing["step_ms"] >= 0

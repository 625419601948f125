"""Fault injection: the driver killed at each named step of a trial's end and of promotion
(``LEADTUNE_CRASH_AT``, see ``search/faults.py`` and ``docs/faults.md``), a storage path that
fills up, and the small one-line refusals. Real Ray, MLflow and Optuna through the CLI.

A search-level case costs two short searches (about 1-2 min on 2 busy cores), so every case
that runs a search is marked ``slow``: ``make test-faults`` (``LEADTUNE_SLOW_TESTS=1``) runs
them, CI runs them after ``make test``. The promotion cases share one finished search.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from leadtune.search.faults import CRASH_ENV, CRASH_POINTS
from leadtune.search.state import read_state

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "ptbxl-sample"
KILLED = -signal.SIGKILL  # Popen's return code of a process killed by SIGKILL


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _search(root: Path, cache: Path, *extra: str, trials: int = 2, epochs: int = 1) -> list[str]:
    return [
        "search", "--space", "smoke", "--trials", str(trials), "--epochs", str(epochs),
        "--max-concurrent", "1", "--tracking-uri", f"sqlite:///{root}/mlflow.db",
        "--storage-path", str(root / "ray"), "--source", str(SAMPLE), "--cache-dir", str(cache),
        *extra,
    ]  # fmt: skip


def _cli(args: list[str], crash_at: str | None = None, timeout: float = 600,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        environment[CRASH_ENV] = crash_at
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "leadtune", *args], cwd=REPO, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )  # fmt: skip


def _client(root: Path):
    from leadtune.search.tracking import mlflow_client

    return mlflow_client(f"sqlite:///{root}/mlflow.db")


def assert_whole(root: Path, trials: int, name: str = "lead-id", study: str = "smoke") -> None:
    """Each trial once, nothing left RUNNING (MLflow run, Optuna trial, state file), and a
    complete champion: one version with its test figures and provenance, the alias on it, its
    run marked promoted."""
    client = _client(root)
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    ids = [r.data.tags["leadtune.trial_id"] for r in children]
    assert len(ids) == len(set(ids)) == trials, ids
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status)
                                                             for r in runs]  # fmt: skip
    assert all(r.data.tags["leadtune.state"] != "running" for r in children)
    found = optuna.load_study(study_name=study, storage=f"sqlite:///{root}/ray/optuna.db").trials
    done = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert len(found) == trials and {t.state for t in found} <= done, found
    assert sorted(t.user_attrs["tune_trial_id"] for t in found) == sorted(ids)
    (search_dir,) = (root / "ray" / study).glob("search-*")
    state = read_state(search_dir)
    assert state["status"] == "finished" and sorted(state["trials"]) == sorted(ids)

    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1, versions
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == versions[0].version
    assert float(champion.tags["leadtune.test_lead_accuracy_hungarian"]) >= 0
    assert champion.tags["leadtune.trial_id"] in ids and champion.tags["leadtune.val_value"]
    run = client.get_run(champion.run_id)
    assert run.data.tags["leadtune.promoted"] == f"{name}/{champion.version}"
    assert "test_lead_accuracy" in run.data.metrics
    parent = client.get_run(state["parent_run_id"])
    assert parent.data.tags["leadtune.promoted"] == f"{name}/{champion.version}"


# -- the crash points themselves -------------------------------------------------------------------


def test_a_crash_point_kills_only_where_named_and_every_point_is_in_the_code():
    code = textwrap.dedent("""
        from leadtune.search.faults import crash_point
        crash_point("optuna_tell"); print("passed one", flush=True)
        crash_point("trial_checkpoint"); print("passed two", flush=True)
        crash_point("trial_checkpoint"); print("passed three", flush=True)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, CRASH_ENV: "trial_checkpoint:2"})  # fmt: skip
    assert run.returncode == KILLED and run.stdout.split("\n")[:2] == ["passed one", "passed two"]
    assert "passed three" not in run.stdout and "crash point trial_checkpoint" in run.stderr
    clean = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean)
    assert run.returncode == 0 and "passed three" in run.stdout
    source = "".join(p.read_text() for p in (REPO / "search").glob("*.py"))
    for point in CRASH_POINTS:  # each documented point is placed (and documented)
        assert re.search(rf'crash_point\("{point}"\)', source), point
        assert f"`{point}`" in (REPO / "docs" / "faults.md").read_text(), point


# -- the driver killed at each step of a trial's end -----------------------------------------------

SEARCH_POINTS = ["trial_last_report", "trial_checkpoint", "optuna_tell", "trial_end_recorded",
                 "tune_checkpoint"]  # fmt: skip


@pytest.mark.parametrize(
    "point",
    [pytest.param(p, marks=pytest.mark.slow)
     for p in SEARCH_POINTS],
)  # fmt: skip
def test_a_driver_killed_at_a_trial_end_step_resumes_to_a_whole_search(point, tmp_path, cache_dir):
    """SIGKILL at the named step of the first trial's end; ``--resume`` then ends with each
    trial once, nothing RUNNING anywhere, and a complete champion."""
    # Tune saves its experiment state every 10 s or more ("auto"); the second 1-epoch trial can
    # end sooner than that, and then no save falls between the first trial's end and the search's.
    # Every 0.1 s, the step that handles the trial's end usually saves too, and that save's copy
    # to the storage path (a thread) can land after the searcher has asked for the next trial.
    first = _cli(_search(tmp_path, cache_dir), crash_at=point,
                 env={"TUNE_GLOBAL_CHECKPOINT_S": "0.1"} if point == "tune_checkpoint" else None)  # fmt: skip
    assert first.returncode == KILLED, first.stdout[-3000:]
    assert f"crash point {point}" in first.stdout
    assert read_state(next((tmp_path / "ray" / "smoke").glob("search-*")))["status"] == "running"
    time.sleep(1)  # the killed driver's local Ray and MLflow watchdog notice it is gone
    resumed = _cli(_search(tmp_path, cache_dir, "--resume"))
    assert resumed.returncode == 0, first.stdout[-3000:] + "\n--- resumed ---\n" + resumed.stdout
    assert "Traceback" not in resumed.stdout, resumed.stdout
    assert_whole(tmp_path, trials=2)


@pytest.mark.slow
def test_a_tune_state_torn_by_the_kill_resumes_from_its_last_whole_save(tmp_path, cache_dir):
    """A driver killed while Tune copied its state into the storage path leaves a torn file;
    Tune alone would then start the search afresh beside the trials the study holds. The
    resume puts back the last save that arrived whole (search/tune_state.py)."""
    first = _cli(_search(tmp_path, cache_dir), crash_at="trial_end_recorded")
    assert first.returncode == KILLED, first.stdout[-3000:]
    search_dir = next((tmp_path / "ray" / "smoke").glob("search-*"))
    assert list((search_dir / ".leadtune-tune-state").iterdir()), "no whole save was kept"
    state = max(search_dir.glob("experiment_state-*.json"))
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # the copy cut part-way
    time.sleep(1)
    resumed = _cli(_search(tmp_path, cache_dir, "--resume"))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming from its last whole save" in resumed.stdout, resumed.stdout[-3000:]
    assert "Traceback" not in resumed.stdout and "Failed to restore" not in resumed.stdout
    assert (search_dir / f"{state.name}.set-aside").is_file()
    assert_whole(tmp_path, trials=2)


# -- the driver killed at each registry write of a promotion ---------------------------------------

PROMOTE_POINTS = [p for p in CRASH_POINTS if p.startswith("promote_")]


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory, cache_dir) -> tuple[Path, dict[str, str]]:
    """One finished search whose promotion a Ctrl-C stopped and ``leadtune promote`` finished
    (what happened is kept for the test below); each crash case registers under its own name."""
    root = tmp_path_factory.mktemp("promote")
    environment = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    proc = subprocess.Popen(
        # one trial: it is the space's reference point, so no paired test against it
        [sys.executable, "-m", "leadtune", *_search(root, cache_dir, trials=1)], cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen, sent = [], None
    for line in proc.stdout:  # one Ctrl-C, as the promotion starts its test evaluation
        seen.append(line)
        if "on the test split" in line and sent is None:
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
    proc.wait(timeout=120)
    record = {"output": "".join(seen), "returncode": proc.returncode,
              "seconds": time.monotonic() - sent if sent else None}  # fmt: skip
    (search_dir,) = (root / "ray" / "smoke").glob("search-*")
    record["status"] = read_state(search_dir)["status"]
    record["versions"] = len(_client(root).search_model_versions("name = 'lead-id'"))
    promote = _cli(["promote", "--study", "smoke", "--storage-path", str(root / "ray")])
    record["promote"], record["promote_code"] = promote.stdout, promote.returncode
    return root, record


@pytest.mark.slow
def test_a_ctrl_c_during_promotion_stops_it_with_status_3_and_promote_finishes(finished_search):
    root, record = finished_search
    output = record["output"]
    assert record["seconds"] is not None, output[-3000:]
    assert record["returncode"] == 3 and record["seconds"] < 30, (record, output[-3000:])
    assert "leadtune promote --study smoke" in output and "Traceback" not in output, output[-3000:]
    assert record["status"] == "finished" and record["versions"] == 0
    assert record["promote_code"] == 0, record["promote"][-3000:]
    assert_whole(root, trials=1)


@pytest.mark.parametrize(
    "point",
    [pytest.param(p, marks=pytest.mark.slow)
     for p in PROMOTE_POINTS],
)  # fmt: skip
def test_a_promotion_killed_at_a_registry_write_is_finished_by_promote(point, finished_search):
    """SIGKILL after the named write: the registry holds nothing or a complete version (its test
    figures written with it), and ``leadtune promote`` finishes it: one version, its test
    figures, the alias, both runs marked; promoting again changes nothing."""
    root, name = finished_search[0], f"m-{point.replace('_', '-')}"
    client = _client(root)
    args = ["promote", "--study", "smoke", "--storage-path", str(root / "ray"),
            "--tracking-uri", f"sqlite:///{root}/mlflow.db", "--register-name", name]  # fmt: skip
    cut = _cli(args, crash_at=point)
    assert cut.returncode == KILLED and f"crash point {point}" in cut.stdout, cut.stdout[-3000:]
    left = client.search_model_versions(f"name = '{name}'")
    assert len(left) <= 1
    for version in left:  # nothing, or a version with every figure it will have
        assert "leadtune.test_lead_accuracy_hungarian" in version.tags, version.tags
    finished = _cli(args)
    assert finished.returncode == 0, finished.stdout[-3000:]
    assert "test: {}" not in finished.stdout and "test_lead_accuracy" in finished.stdout
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert client.get_model_version_by_alias(name, "champion").version == version.version
    assert "leadtune.test_lead_accuracy_hungarian" in version.tags
    assert client.get_run(version.run_id).data.tags["leadtune.promoted"] == f"{name}/1"
    again = _cli(args)
    assert again.returncode == 0 and "already is the champion" in again.stdout, again.stdout
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


# -- a storage path that fills up ------------------------------------------------------------------


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
        capture_output=True,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("tracking", ["database", "server"])
def test_a_storage_path_that_fills_up_stops_the_search_in_seconds_and_resume_finishes(
    tracking, tmp_path, cache_dir
):
    """A real small file system (tmpfs in a private mount namespace) filled while the first
    trial runs: the search stops within seconds, exit 3, one line naming the path and its free
    space, state ``interrupted``; with the space freed, ``--resume`` finishes."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not _can_mount_tmpfs(mount):
        pytest.skip("no private mount namespace here (unshare -m needs root or user namespaces)")
    out = tmp_path / "out"
    out.mkdir()
    # prepare the data cache first, outside the small disk (it is not what this is about)
    prepared = _cli(["data", "prepare", "--source", str(SAMPLE), "--cache-dir", str(cache_dir)])
    assert prepared.returncode == 0, prepared.stdout[-2000:]
    search = " ".join(
        ["search", "--space", "smoke", "--trials", "2", "--epochs", "2", "--max-concurrent", "1",
         "--storage-path", f"{mount}/s", "--source", str(SAMPLE), "--cache-dir", str(cache_dir),
         "--no-promote", *(["--mlflow-server"] if tracking == "server" else [])]
    )  # fmt: skip
    python = f"{sys.executable} -m leadtune"
    script = textwrap.dedent(f"""
        set -u
        mount -t tmpfs -o size=48m tmpfs {mount}
        {python} {search} > {out}/first.log 2>&1 &
        pid=$!
        until ls -d {mount}/s/smoke/search-*/lead_id_*/checkpoint_* >/dev/null 2>&1; do
            kill -0 $pid 2>/dev/null || break; sleep 0.2
        done
        free=$(df --output=avail -B1 {mount} | tail -1)
        fallocate -l $((free - 65536)) {mount}/filler || head -c $((free - 65536)) /dev/zero > {mount}/filler
        t0=$(date +%s.%N)
        wait $pid; echo $? > {out}/first.rc
        t1=$(date +%s.%N)
        echo "$t1 - $t0" | bc > {out}/first.seconds
        cp {mount}/s/smoke/search-*/leadtune_search.state {out}/first.state
        rm {mount}/filler
        {python} {search} --resume > {out}/second.log 2>&1; echo $? > {out}/second.rc
        cp -r {mount}/s {out}/s
    """)
    subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script],
                   cwd=REPO, env={**os.environ, "LEADTUNE_MIN_FREE_MB": "8"}, timeout=900,
                   check=False)  # fmt: skip
    first = (out / "first.log").read_text()
    assert (out / "first.rc").read_text().strip() == "3", first[-3000:]
    seconds = float((out / "first.seconds").read_text())
    assert seconds < 30, (seconds, first[-3000:])
    lines = [line for line in first.splitlines() if line.startswith("leadtune: ")]
    assert len(lines) == 1 and f"{mount}/s" in lines[0] and "MB free" in lines[0], first[-3000:]
    # The driver checks the free space once a second; when a trial's checkpoint meets the full
    # disk first, Ray prints that trial's traceback before leadtune's line (docs/faults.md), in
    # either mode. Nothing else may.
    for block in first.split("Traceback (most recent call last):")[1:]:
        assert "No space left on device" in block, first[-3000:]
    assert first.count("Traceback") <= first.count("Trial task failed"), first[-3000:]
    import json

    assert json.loads((out / "first.state").read_text())["status"] == "interrupted"
    second = (out / "second.log").read_text()
    assert (out / "second.rc").read_text().strip() == "0", second[-3000:]
    (search_dir,) = (out / "s" / "smoke").glob("search-*")
    assert read_state(search_dir)["status"] == "finished"
    trials = optuna.load_study(study_name="smoke", storage=f"sqlite:///{out}/s/optuna.db").trials
    assert len(trials) == 2 and all(t.state.is_finished() for t in trials)
    assert all(t.state != optuna.trial.TrialState.FAIL for t in trials)  # none blamed on the disk
    print(f"full disk: stopped {seconds:.1f} s after it filled")


# -- small one-line refusals -----------------------------------------------------------------------


def test_a_missing_database_driver_is_named_not_the_server(tmp_path, capsys):
    from leadtune.cli import main

    pytest.importorskip("sqlalchemy")
    try:
        import psycopg  # noqa: F401  # pyright: ignore[reportMissingImports]  (absent on purpose)

        pytest.skip("psycopg is installed here")
    except ImportError:
        pass
    for flag in ("--optuna-storage", "--tracking-uri"):
        code = main(["search", "--space", "smoke", "--storage-path", str(tmp_path / "s"),
                     flag, "postgresql+psycopg://u:secret@127.0.0.1:9/optuna"])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0, err
        assert "driver (psycopg) is not installed" in err and "pip install" in err, err
        assert "secret" not in err and "answer" not in err
    assert not (tmp_path / "s" / "smoke").exists()


def test_data_prepare_skips_a_record_with_the_wrong_channel_count(tmp_path):
    """15 channels (the 12 leads and three more, as in PTB's Frank leads) are skipped with the
    reason, as the README says, not kept with the extra channels dropped."""
    import numpy as np
    import wfdb
    from test_data_cache import _copy_ptbxl

    from leadtune.trainables.data.cache import prepare_dataset

    source = _copy_ptbxl(SAMPLE, tmp_path / "ptbxl", list(range(1, 61)))
    record = source / "records100/00000/00005_lr"
    signal, fields = wfdb.rdsamp(str(record))
    extra = np.column_stack([signal, signal[:, :3] * 0.5])
    names = list(fields["sig_name"]) + ["vx", "vy", "vz"]
    wfdb.wrsamp("00005_lr", fs=100, units=["mV"] * 15, sig_name=names, p_signal=extra,
                fmt=["16"] * 15, write_dir=str(record.parent))  # fmt: skip
    dataset = prepare_dataset(source, tmp_path / "cache", limit=None, progress=False)
    assert 5 not in dataset.ecg_ids and len(dataset) == 59
    (skipped,) = dataset.manifest["skipped"]
    assert skipped["ecg_id"] == 5 and "15 channels, not the 12" in skipped["reason"]


def test_a_pickled_package_is_refused_without_torch_advice_to_unpickle(tmp_path):
    """The refusal says what the file holds and that leadtune loads tensors only; it never
    passes on torch's hint to load with weights_only=False (which would run the file's code)."""
    import torch

    from leadtune.trainables.model_package import PackageError, package_weights

    marker = tmp_path / "ran"
    torch.save({"w": _RunsCode(str(marker))}, tmp_path / "weights.pt")
    with pytest.raises(PackageError) as info:
        package_weights(tmp_path)
    message = str(info.value)
    assert "weights_only=False" not in message and "False" not in message, message
    assert "pickled Python objects" in message and "tensors only" in message
    assert "\n" not in message and not marker.exists()


class _RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))

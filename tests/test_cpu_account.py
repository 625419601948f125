"""The account of a search's CPU outside its trials (leadtune.search.cpu): who is counted as
what, and that a real process tree's seconds land on the right side."""

from __future__ import annotations

import subprocess
import sys

from leadtune.search.cpu import CpuAccount, _role


def test_processes_are_counted_by_role() -> None:
    def role(title: str, name: str = "python", pid: int = 2) -> str:
        return _role(title.split(), name, pid, root=1)

    assert role("anything", pid=1) == "driver"
    assert role("ray::IDLE") == "ray workers (idle)"
    assert role("ray::ImplicitFunc.train") == "ray workers (idle)"  # a trial once it reports
    # Ray's agents are titled like workers but never run a trial
    assert role("ray::DashboardAgent") == "ray"
    assert role("ray::RuntimeEnvAgent") == "ray"
    assert role("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x") == "ray"
    assert role("/x/gcs_server", name="gcs_server") == "ray"
    assert role("python -m mlflow server --backend-store-uri sqlite:///db") == "mlflow"
    assert role("sleep 5", name="sleep") == "other"


def test_a_trial_process_is_counted_as_trial_work_and_the_rest_outside() -> None:
    burn = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"
    trial = subprocess.Popen([sys.executable, "-c", burn.format(s=1.5)])
    helper = subprocess.Popen([sys.executable, "-c", burn.format(s=0.5)])
    account = CpuAccount(interval_s=0.2).start()
    account.note_trial_pid(trial.pid)
    try:
        for proc in (trial, helper):
            proc.wait(timeout=60)
    finally:
        share = account.stop()
    # A process that ends between two readings loses at most one interval of its time.
    assert 1.5 - 0.3 <= share.seconds["trials"] <= 1.5 + 0.3, share.seconds
    assert 0.5 - 0.3 <= share.seconds["other"] <= 0.5 + 0.3, share.seconds
    assert share.outside_s >= share.seconds["other"]
    assert 0 < share.outside_share < 1
    assert "CPU outside trials" in share.sentence()


def test_a_local_ray_head_is_asked_for_no_log_monitor_and_no_autoscaler_monitor() -> None:
    """What _lean_local_node changes, and only while a local Ray starts (the demo's process
    listing shows neither process since; docs/figures.md)."""
    from ray._private import parameter

    from leadtune.search.tuner import _lean_local_node

    with _lean_local_node(True):
        lean = parameter.RayParams()
    with _lean_local_node(False):  # joining a cluster: Ray's own defaults
        plain = parameter.RayParams()
    after = parameter.RayParams()
    assert (lean.include_log_monitor, lean.no_monitor) == (False, True)
    assert (plain.include_log_monitor, plain.no_monitor) == (None, False)
    assert (after.include_log_monitor, after.no_monitor) == (None, False)


def test_tune_runs_without_its_own_loggers_only_while_it_runs(tmp_path, monkeypatch) -> None:
    """The search's CSV/JSON loggers replace Tune's automatic ones (whose TensorBoard logger
    imports torch into the driver); a search an older leadtune started keeps Tune's."""
    import os
    from types import SimpleNamespace

    from leadtune.search.tuner import _own_result_loggers

    name = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
    monkeypatch.delenv(name, raising=False)
    with _own_result_loggers(SimpleNamespace(resumed=False, search_dir=tmp_path)):
        assert os.environ[name] == "1"
    assert name not in os.environ  # put back
    (tmp_path / "trial_1").mkdir()
    (tmp_path / "trial_1" / "events.out.tfevents.1").write_text("")
    with _own_result_loggers(SimpleNamespace(resumed=True, search_dir=tmp_path)):
        assert name not in os.environ  # resumed old-style search: Tune's loggers as before

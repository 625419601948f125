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


def test_a_local_ray_head_is_asked_for_no_monitors_and_no_dashboard_head() -> None:
    """What _lean_local_node changes, and only while a local Ray starts (the demo's process
    listing shows neither process since; docs/figures.md)."""
    from ray._private import node, parameter

    from leadtune.search.tuner import _lean_local_node

    ray_api_server = node.Node.start_api_server
    with _lean_local_node(True):
        lean = parameter.RayParams()
        assert node.Node.start_api_server is not ray_api_server
    with _lean_local_node(False):  # joining a cluster: Ray's own defaults
        plain = parameter.RayParams()
    after = parameter.RayParams()
    assert node.Node.start_api_server is ray_api_server  # put back
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


LEAN_PROBE = """
import json, time
import psutil, ray
from ray.air.execution import PlacementGroupResourceManager, ResourceRequest
from ray.air.execution._internal.actor_manager import RayActorManager

from leadtune.search.tuner import _lean_local_node, patient_controller

with _lean_local_node(True):
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
commands = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
works = ray.get(ray.remote(lambda: 41 + 1).remote())
resources = PlacementGroupResourceManager()
resources.request_resources(ResourceRequest([{"CPU": 64}]))  # never ready: a future to wait on
manager = RayActorManager(resource_manager=resources)
waits = {}
for name, context in (("tune", None), ("patient", patient_controller(1.0))):
    if context is not None:
        context.__enter__()
    started = time.monotonic()
    manager.next(timeout=0.1)  # what TuneController.step asks for
    waits[name] = time.monotonic() - started
    if context is not None:
        context.__exit__(None, None, None)
print(json.dumps({"commands": commands, "works": works, "waits": waits}))
ray.shutdown()
"""


def test_a_lean_local_ray_runs_tasks_without_its_head_extras_and_tune_waits_longer() -> None:
    """A real local Ray started lean: no dashboard head, log monitor or autoscaler monitor
    among its processes, and it still runs work. Under patient_controller, Tune's controller
    waits a second for the next event where Tune asks for 0.1 s (docs/figures.md: the demo's
    CPU outside its trials)."""
    import json
    import os

    env = {**os.environ, "RAY_ADDRESS": "local"}
    done = subprocess.run([sys.executable, "-c", LEAN_PROBE], capture_output=True, text=True,
                          timeout=180, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["works"] == 42
    commands = " | ".join(found["commands"])
    assert "raylet" in commands and "gcs_server" in commands, commands
    for absent in ("dashboard/dashboard.py", "log_monitor.py", "/autoscaler/"):
        assert absent not in commands, commands
    assert found["waits"]["tune"] < 0.5, found["waits"]
    assert 0.9 <= found["waits"]["patient"] < 3, found["waits"]


def test_a_search_driver_defers_full_collections_until_its_set_up_is_done() -> None:
    """leadtune.cli defers Python's full garbage collections while `leadtune search` imports
    and sets up; the search settles the heap once before Tune starts. A search run from Python
    (no deferral begun) leaves the collector alone."""
    import gc

    from leadtune.trainables import runtime

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    runtime.settle_heap()  # nothing begun: nothing changes
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen
    runtime.defer_full_collections()
    try:
        assert gc.get_threshold()[:2] == before[:2]  # young objects collected as usual
        assert gc.get_threshold()[2] == runtime.SETUP_FULL_COLLECTION_THRESHOLD
        runtime.settle_heap()
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() > frozen  # what the set-up left, frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        runtime._DEFERRED_THRESHOLDS.clear()

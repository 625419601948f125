"""The registered model is an MLflow model: ``mlflow.pyfunc.load_model`` predicts with it, and
``mlflow models serve`` answers a scoring request on 127.0.0.1 (real MLflow, a real registry on
SQLite, the model promoted the way ``search/promote.py`` does it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import wfdb
from delivery_fixtures import SAMPLE, delivery_env

RECORD = SAMPLE / "records100" / "00000" / "00001_lr"


def _raw_record() -> np.ndarray:
    """One bundled record as it is on disk: (1, 12, 1000) mV at 100 Hz."""
    return wfdb.rdrecord(str(RECORD)).p_signal.T[None].astype(np.float32)


def _leadtune_prediction(env, signals: np.ndarray) -> np.ndarray:
    """What leadtune's own loader and preprocessing give for the same record."""
    import torch

    from leadtune.analysis import load_model
    from leadtune.trainables.data.preprocess import PreprocessConfig, preprocess

    loaded = load_model("models:/lead-id@champion", env.tracking_uri)
    x = preprocess(signals[0], 100, PreprocessConfig(**loaded.preprocess))[None]
    with torch.inference_mode():
        return loaded.model(torch.from_numpy(x)).log_softmax(-1).numpy()


def test_the_champion_loads_with_mlflow_pyfunc_and_predicts_a_bundled_record(
    tmp_path_factory, monkeypatch
):
    import mlflow

    env = delivery_env(tmp_path_factory)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/lead-id@champion")
    (spec,) = model.metadata.signature.inputs.inputs
    assert spec.shape == (-1, -1, -1) and spec.type == np.dtype(np.float32)
    assert model.metadata.metadata["leadtune_task"] == "lead_id"
    assert "log-probabilities" in model.metadata.metadata["output"]

    signals = _raw_record()
    out = model.predict(signals)
    assert out.shape == (1, 12, 12)
    assert np.allclose(np.exp(out).sum(-1), 1, atol=1e-4)  # log-probabilities per lead
    assert np.allclose(out, _leadtune_prediction(env, signals), atol=1e-5)
    # fewer leads (a lead-ID model takes any K), and the record at 500 Hz with fs given
    assert model.predict(signals[:, :3]).shape == (1, 3, 12)
    upsampled = np.repeat(signals, 5, axis=-1)
    assert model.predict(upsampled, params={"fs": 500.0}).shape == (1, 12, 12)
    with pytest.raises(Exception, match="does not match expected shape"):  # the signature
        model.predict(np.zeros(12, np.float32))
    gapped = signals.copy()
    gapped[0, 3, 100:200] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite samples"):
        model.predict(gapped)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_models_serve_answers_a_scoring_request(tmp_path_factory):
    env = delivery_env(tmp_path_factory)
    port = _free_port()
    log = open(env.root / "serve.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/lead-id@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        # MLflow starts `uvicorn` by name: the environment's bin folder must be on PATH, as
        # it is in an activated virtual environment
        env={**os.environ, "MLFLOW_TRACKING_URI": env.tracking_uri,
             "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (env.root / "serve.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
                time.sleep(1)
        signals = _raw_record()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": signals.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        predictions = np.asarray(answer["predictions"], dtype=np.float32)
        assert predictions.shape == (1, 12, 12)
        assert np.allclose(predictions, _leadtune_prediction(env, signals), atol=1e-4)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        log.close()


def test_the_registered_version_is_a_logged_model_of_its_run_with_its_test_figures(
    tmp_path_factory,
):
    """The run's "Logged models" tab holds the promoted model (MLflow 3 logged model, READY),
    the registered version links it, and the test figures are the model's metrics."""
    from mlflow.tracking import MlflowClient

    env = delivery_env(tmp_path_factory)
    client = MlflowClient(env.tracking_uri)
    version = client.get_model_version_by_alias("lead-id", "champion")
    run = client.get_run(version.run_id)
    (logged,) = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
    )
    assert str(logged.status).endswith("READY") and logged.name == "model"
    linked = json.loads(logged.tags["mlflow.modelVersions"])
    assert {"name": "lead-id", "version": str(version.version)} in linked
    on_model = {m.key: m.value for m in logged.metrics or []}
    tests = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    assert tests and all(on_model.get(k) == v for k, v in tests.items()), (on_model, tests)

"""Shared, real artefacts for the delivery tests (evaluate, export, label, report).

Built once per test session (memoised here, not in conftest.py, so several test modules share
them): the bundled PTB-XL sample prepared into a temporary cache, a tiny lead-ID model trained on
it for real, and that model logged and registered in a SQLite MLflow exactly the way
``search/promote.py`` does it (``lead-id`` version with ``leadtune.*`` tags, alias ``champion``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "ptbxl-sample"
SUBSET = REPO.parent / "shared" / "data" / "ptbxl-subset"
REGISTERED = "lead-id"

# Small enough to train in seconds on 2 CPU cores; real 10 s signals (label needs them).
TINY_CONFIG = {
    "encoder": "cnn",
    "context": "sab",
    "d_model": 16,
    "depth": 1,
    "heads": 2,
    "batch_size": 16,
    "lr": 3e-3,
    "epochs": 2,
    "max_train_records": 64,
    "max_val_records": 24,
    "seed": 0,
    "num_threads": 2,
}


@dataclass
class DeliveryEnv:
    root: Path
    cache_dir: Path
    dataset: Any  # PreparedDataset of the bundled sample
    checkpoint: Path  # the last epoch's checkpoint folder
    first_checkpoint: Path  # epoch 1: a second, different model for --compare
    history: list[dict[str, Any]]
    tracking_uri: str
    run_id: str
    version: str
    seconds: dict[str, float]


_ENV: DeliveryEnv | None = None


def delivery_env(tmp_path_factory) -> DeliveryEnv:
    """The shared environment, built on first use in this session."""
    global _ENV
    if _ENV is None:
        _ENV = _build(tmp_path_factory.mktemp("delivery"))
    return _ENV


def _build(root: Path) -> DeliveryEnv:
    from leadtune.trainables.data.cache import prepare_dataset
    from leadtune.trainables.lead_id.train import LeadIdData, train_lead_id
    from leadtune.trainables.training import LocalReporter

    seconds = {}
    started = time.perf_counter()
    cache_dir = root / "cache"
    dataset = prepare_dataset(SAMPLE, cache_root=cache_dir, progress=False)
    seconds["prepare"] = time.perf_counter() - started

    started = time.perf_counter()
    reporter = LocalReporter(root / "train")
    train_lead_id(TINY_CONFIG, LeadIdData.from_prepared(dataset), reporter=reporter)
    seconds["train"] = time.perf_counter() - started
    checkpoint = Path(reporter.history[-1]["checkpoint_dir"])

    started = time.perf_counter()
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id, version = register_like_promote(tracking_uri, checkpoint, reporter.history, dataset)
    seconds["register"] = time.perf_counter() - started
    return DeliveryEnv(
        root=root,
        cache_dir=cache_dir,
        dataset=dataset,
        checkpoint=checkpoint,
        first_checkpoint=Path(reporter.history[0]["checkpoint_dir"]),
        history=reporter.history,
        tracking_uri=tracking_uri,
        run_id=run_id,
        version=version,
        seconds=seconds,
    )


def register_like_promote(
    tracking_uri: str, checkpoint: Path, history: list[dict[str, Any]], dataset: Any
) -> tuple[str, str]:
    """A search-shaped MLflow record of one trained model, registered as lead-id@champion.

    Parent run tagged leadtune.kind=search, one child run with per-epoch metrics (step = epoch)
    and params, and the model registered by promotion's own code
    (:func:`leadtune.search.promote.register_checkpoint`: a model package in the child run),
    with the alias champion.
    """
    from mlflow.entities import Metric

    from leadtune.search.promote import register_checkpoint
    from leadtune.search.tracking import mlflow_client
    from leadtune.trainables.lead_id.train import evaluate_checkpoint
    from leadtune.trainables.tasks import get_task

    client = mlflow_client(tracking_uri)
    db_dir = Path(tracking_uri[len("sqlite:///") :]).parent
    experiment_id = client.create_experiment(
        "delivery", artifact_location=(db_dir / "mlartifacts").as_uri()
    )
    parent = client.create_run(
        experiment_id,
        tags={"leadtune.kind": "search", "leadtune.study": "delivery"},
    )
    child = client.create_run(
        experiment_id,
        tags={
            "mlflow.parentRunId": parent.info.run_id,
            "leadtune.trial_id": "trial0",
            "leadtune.state": "completed",
        },
    )
    run_id = child.info.run_id
    client.log_batch(
        run_id,
        metrics=[
            Metric(k, float(v), 0, int(m["epoch"]))
            for m in history
            for k, v in m.items()
            if k.startswith("val_") and isinstance(v, float)
        ],
    )
    for key, value in TINY_CONFIG.items():
        client.log_param(run_id, key, str(value))
    test_metrics = evaluate_checkpoint(checkpoint, dataset, "test")
    last = history[-1]
    version = register_checkpoint(
        client, get_task("lead_id"), REGISTERED, run_id, checkpoint, test_metrics,
        {
            "leadtune.study": "delivery",
            "leadtune.trial_id": "trial0",
            "leadtune.search_run_id": parent.info.run_id,
            "leadtune.data_fingerprint": dataset.fingerprint,
            "leadtune.checkpoint": str(checkpoint),
            "leadtune.val_metric": "val_loss",
            "leadtune.val_mode": "min",
            "leadtune.val_value": repr(float(last["val_loss"])),
        },
    )  # fmt: skip
    client.set_registered_model_alias(REGISTERED, "champion", version.version)
    return run_id, str(version.version)


def register_pickled_like_before(
    tracking_uri: str, checkpoint: Path, name: str, tagged: Path | None = None
) -> str:
    """A version the way leadtune registered models before model packages: a pickled module
    (``mlflow.pytorch.log_model``), tagged with its trial checkpoint (or ``tagged``). Returns
    the version."""
    import mlflow
    import mlflow.pytorch

    from leadtune.search.tracking import mlflow_client, use_tracking_uri
    from leadtune.trainables.tasks import load_trained_model

    client = mlflow_client(tracking_uri)
    use_tracking_uri(tracking_uri)
    experiment = client.get_experiment_by_name("delivery")
    run = client.create_run(experiment.experiment_id, tags={"leadtune.trial_id": "old"})
    model, _, _ = load_trained_model(checkpoint)
    with mlflow.start_run(run_id=run.info.run_id):
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle")
    version = mlflow.register_model(info.model_uri, name)
    client.set_model_version_tag(
        name, version.version, "leadtune.checkpoint", str(tagged or checkpoint)
    )
    return str(version.version)


def write_wfdb_copy(
    header: Path, out_dir: Path, name: str, swap: dict[str, str] | None = None
) -> Path:
    """Rewrite a WFDB record with some channels' samples exchanged but the header names kept.

    ``swap={"V2": "V3", "I": "aVL"}`` puts V3's samples under the name V2 and vice versa (a
    swap must be symmetric: give each pair once). Digital samples, gains and baselines are copied
    unchanged, so the unswapped channels read back bit for bit.
    """
    import wfdb

    record = wfdb.rdrecord(str(Path(header).with_suffix("")), physical=False)
    digital = record.d_signal.copy()
    names = [str(n) for n in record.sig_name]
    folded = [n.casefold() for n in names]
    for a, b in (swap or {}).items():
        i, j = folded.index(a.casefold()), folded.index(b.casefold())
        digital[:, [i, j]] = digital[:, [j, i]]
    out_dir.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        name,
        fs=record.fs,
        units=list(record.units),
        sig_name=names,
        d_signal=digital,
        fmt=list(record.fmt),
        adc_gain=list(record.adc_gain),
        baseline=list(record.baseline),
        write_dir=str(out_dir),
    )
    return out_dir / f"{name}.hea"


def split_records(dataset: Any, count: int, split: str = "test") -> list[Path]:
    """Headers of the first `count` records of one split of a prepared PTB-XL dataset."""
    import pandas as pd

    source = Path(dataset.manifest["source"])
    table = pd.read_csv(source / "ptbxl_database.csv", index_col="ecg_id")
    ids = np.asarray(dataset.ecg_ids)[dataset.indices(split)][:count]
    return [source / f"{table.loc[int(i), 'filename_lr']}.hea" for i in ids]


def slow_tests_enabled() -> bool:
    return os.environ.get("LEADTUNE_SLOW_TESTS") == "1"


# The slow swap test's model: trained for real on the shared subset (about 2 min per epoch on
# 2 CPU cores), kept in the dataset cache root so later runs reuse it.
SUBSET_CONFIG = {
    "encoder": "cnn",
    "context": "sab",
    "d_model": 32,
    "depth": 2,
    "heads": 4,
    "batch_size": 32,
    "lr": 3e-3,
    "epochs": 8,
    "seed": 0,
    "num_threads": 2,
}


def trained_subset_model() -> tuple[Path, Any]:
    """(checkpoint folder, prepared subset) of SUBSET_CONFIG, training it if not cached yet."""
    import hashlib

    from leadtune.trainables.data.cache import default_cache_root, prepare_dataset
    from leadtune.trainables.lead_id.train import LeadIdData, train_lead_id
    from leadtune.trainables.training import LocalReporter

    dataset = prepare_dataset(SUBSET, progress=False)
    key = hashlib.sha256(
        json.dumps([SUBSET_CONFIG, dataset.fingerprint], sort_keys=True).encode()
    ).hexdigest()[:16]
    folder = default_cache_root() / "test-models" / key
    final = folder / f"epoch_{SUBSET_CONFIG['epochs']:03d}"
    if not (final / "checkpoint.pt").is_file():
        reporter = LocalReporter(folder)
        train_lead_id(SUBSET_CONFIG, LeadIdData.from_prepared(dataset), reporter=reporter)
    return final, dataset

"""Promotion: the best trial of a finished search becomes a registered model version.

The best trial is chosen on the validation metric only. Its best checkpoint is evaluated once on
the test split, logged with ``mlflow.pytorch.log_model`` into the trial's MLflow run, registered,
and given the alias ``champion`` only if it beats the current champion on validation.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from search.tracking import STATE_TAG, TRIAL_TAG

CHAMPION = "champion"


def _log(message: str) -> None:
    print(f"[leadtune] {message}", file=sys.stderr, flush=True)


def best_trial(experiment_path: Path, metric: str, mode: str) -> tuple[str, Path, float, dict]:
    """(trial id, best checkpoint folder, its validation metric, trial config) of a search."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_path), default_metric=metric, default_mode=mode)
    trial = analysis.get_best_trial(metric, mode, scope="all", filter_nan_and_inf=True)
    if trial is None:
        raise ValueError(f"no trial of {experiment_path} reported {metric!r}; nothing to promote")
    checkpoint = analysis.get_best_checkpoint(trial, metric, mode)
    if checkpoint is None:
        raise ValueError(f"trial {trial.trial_id} of {experiment_path} kept no checkpoint")
    frame = analysis.trial_dataframes.get(trial.path)
    if frame is not None and metric in frame:
        values = frame[metric].dropna()
        value = float(values.min() if mode == "min" else values.max())
    else:
        value = float(trial.last_result[metric])
    return trial.trial_id, Path(checkpoint.path), value, dict(trial.config)


def better(new: float, old: float, mode: str) -> bool:
    return new < old if mode == "min" else new > old


def promote_best(
    tracking_uri: str,
    experiment_path: Path,
    dataset: Any = None,
    register_name: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Evaluate, log, register and (maybe) crown the best model of a search. Returns the decision."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from search.tuner import STATE_FILE
    from spaces import get_space
    from trainables.registry import DataRequest, get_trainable

    state_file = Path(experiment_path) / STATE_FILE
    if not state_file.exists():
        raise FileNotFoundError(f"{experiment_path} is not a leadtune search (no {STATE_FILE})")
    state = json.loads(state_file.read_text())
    metric, mode = state["metric"], state["mode"]
    register_name = register_name or state.get("register_name", "lead-id")
    spec = get_trainable(get_space(state["space"]).trainable)
    client = MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)

    trial_id, checkpoint, val_value, config = best_trial(Path(experiment_path), metric, mode)
    _log(f"best trial {trial_id}: {metric} = {val_value:.5f} (checkpoint {checkpoint})")

    runs = client.search_runs(
        [state["experiment_id"]],
        filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' "
        f"and tags.`mlflow.parentRunId` = '{state['parent_run_id']}'",
        max_results=1,
    )
    if not runs:
        raise ValueError(
            f"no MLflow run for trial {trial_id} in experiment {state['experiment_id']}"
        )
    run_id = runs[0].info.run_id

    existing = [
        v
        for v in client.search_model_versions(f"name = '{register_name}'")
        if v.run_id == run_id and v.tags.get("leadtune.checkpoint") == str(checkpoint)
    ] if _model_exists(client, register_name) else []  # fmt: skip

    if dataset is None:
        _, dataset = spec.load_data(
            DataRequest(source=Path(state["data_source"]), limit=state.get("data_limit"))
        )
    fingerprint = getattr(dataset, "fingerprint", "unknown")
    if fingerprint != state.get("data_fingerprint"):
        raise ValueError(
            f"the data at {state['data_source']} (fingerprint {fingerprint}) is not what the "
            f"search used ({state.get('data_fingerprint')}); pass the same --source and --limit"
        )

    if existing:
        version = existing[0]
        test_metrics = {
            k[len("leadtune.") :]: float(v)
            for k, v in version.tags.items()
            if k.startswith("leadtune.test_")
        }
        _log(f"trial {trial_id} is already registered as {register_name} v{version.version}")
    else:
        _log("evaluating the best checkpoint once on the test split ...")
        test_metrics = spec.evaluate(checkpoint, dataset, "test")
        model, model_config, example = spec.load_model(checkpoint)
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        signature = infer_signature(example, output)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({k: float(v) for k, v in test_metrics.items()})
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                signature=signature,
                input_example=example,
                # pickle keeps the module whole (any batch size and lead count); MLflow 3's
                # default "pt2" would freeze the input shape to the example's (1, 12, T).
                serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
            )
        version = mlflow.register_model(info.model_uri, register_name)
        tags = {
            "leadtune.study": state["study"],
            "leadtune.trial_id": trial_id,
            "leadtune.search_run_id": state["parent_run_id"],
            "leadtune.data_fingerprint": fingerprint,
            "leadtune.checkpoint": str(checkpoint),
            "leadtune.val_metric": metric,
            "leadtune.val_mode": mode,
            "leadtune.val_value": repr(val_value),
            "leadtune.config": json.dumps(model_config, default=str),
        }
        tags.update({f"leadtune.{k}": repr(float(v)) for k, v in test_metrics.items()})
        for key, value in tags.items():
            client.set_model_version_tag(register_name, version.version, key, value)
        client.set_tag(run_id, STATE_TAG + ".promoted", f"{register_name}/{version.version}")

    try:
        champion = client.get_model_version_by_alias(register_name, CHAMPION)
    except MlflowException:
        champion = None

    if champion is None:
        move, reason = True, "there was no champion yet"
    elif champion.version == version.version:
        move, reason = False, f"v{version.version} already is the champion"
    elif force:
        move, reason = True, "forced (--force)"
    elif champion.tags.get("leadtune.val_metric") != metric:
        move, reason = (
            False,
            (
                f"the champion v{champion.version} was chosen on "
                f"{champion.tags.get('leadtune.val_metric')!r}, not {metric!r}: not comparable "
                "(use --force to move the alias)"
            ),
        )
    elif champion.tags.get("leadtune.data_fingerprint") != fingerprint:
        move, reason = (
            False,
            (
                f"the champion v{champion.version} was validated on other data "
                f"({champion.tags.get('leadtune.data_fingerprint')}): not comparable "
                "(use --force to move the alias)"
            ),
        )
    else:
        old = float(champion.tags.get("leadtune.val_value", "nan"))
        if math.isnan(old) or better(val_value, old, mode):
            move = True
            reason = f"{metric} {val_value:.5f} beats the champion v{champion.version}'s {old:.5f}"
        else:
            move = False
            reason = (
                f"{metric} {val_value:.5f} does not beat the champion v{champion.version}'s "
                f"{old:.5f}"
            )
    if move:
        client.set_registered_model_alias(register_name, CHAMPION, version.version)

    decision = {
        "registered_model": register_name,
        "version": str(version.version),
        "model_uri": f"models:/{register_name}/{version.version}",
        "champion_uri": f"models:/{register_name}@{CHAMPION}",
        "alias_moved": move,
        "reason": reason,
        "trial_id": trial_id,
        "run_id": run_id,
        "checkpoint": str(checkpoint),
        "val_metric": metric,
        "val_value": val_value,
        "test_metrics": test_metrics,
        "config": config,
    }
    _log(
        f"registered {register_name} v{version.version}; champion "
        f"{'moved to it' if move else 'unchanged'}: {reason}"
    )
    return decision


def _model_exists(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False

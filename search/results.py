"""A search's trials as leadtune reports them: one row per trial with the state recorded when
it ended and the figures of its best epoch (the checkpoint that would be promoted). Shared by the
search's conclusion and by ``leadtune promote`` (which reads a finished search from disk)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from leadtune.search.study import OPTUNA_TRIAL_KEY, training_config


def load_results(search_dir: Path) -> Any:
    """The search's Tune results, read from its folder."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    # absolute: Ray reads a relative path as a URI with an empty scheme and refuses it
    return ResultGrid(ExperimentAnalysis(str(Path(search_dir).resolve())))


def trial_runs(client: Any, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """The search's child runs by trial id."""
    from leadtune.search.tracking import TRIAL_TAG

    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        max_results=10_000,
    )
    return {run.data.tags.get(TRIAL_TAG): run.info.run_id for run in runs}


def summarise_trials(
    grid: Any,
    metric: str,
    mode: str,
    spec: Any,
    ended: dict[str, dict[str, Any]],
    budget_spent: bool,
    runs: dict[str, str],
    objectives: list | tuple = (),
) -> list[dict[str, Any]]:
    """One row per trial: id, state as recorded when it ended (or ``unfinished``), config, and
    the figures of its best epoch (the checkpoint that would be promoted), with the further
    objectives [(metric, mode)] and the model's cost at that epoch under ``objectives``."""
    from leadtune.search.objectives import COST_METRICS

    rows = []
    for result in grid:
        config = result.config or {}
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.split("_")[-1]
        record = ended.get(trial_id)
        if record is not None:
            state = record["state"]
        elif budget_spent and result.metrics:
            state = "stopped_by_budget"
        else:
            state = "unfinished"
        checkpoint, epoch_metrics = best_checkpoint(result, metric, mode)
        rows.append(
            {
                "trial_id": trial_id,
                "optuna_trial": config.get(OPTUNA_TRIAL_KEY),
                "state": state,
                "config": training_config(config),
                "epochs_run": (result.metrics or {}).get("epoch"),
                "best_epoch": epoch_metrics.get("epoch"),
                "value": epoch_metrics.get(metric),
                **{column.key: epoch_metrics.get(column.key) for column in spec.table_metrics},
                "objectives": {
                    name: epoch_metrics.get(name)
                    for name in dict.fromkeys([*(m for m, _ in objectives), *COST_METRICS])
                },
                "seconds": (result.metrics or {}).get("time_total_s"),
                "node_id": (result.metrics or {}).get("trial_node_id"),
                "best_checkpoint": checkpoint,
                "path": result.path,
                "run_id": runs.get(trial_id),
                "error": str(result.error).strip().splitlines()[-1] if result.error else None,
            }
        )
    return rows


def best_checkpoint(result: Any, metric: str, mode: str) -> tuple[str | None, dict[str, Any]]:
    """(path, metrics of its epoch) of the trial's kept checkpoint with the best metric."""
    pairs = [(c, m) for c, m in (result.best_checkpoints or []) if finite(m.get(metric))]
    if not pairs:
        return None, {}
    pick = min if mode == "min" else max
    checkpoint, metrics = pick(pairs, key=lambda pair: pair[1][metric])
    return checkpoint.path, dict(metrics)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)

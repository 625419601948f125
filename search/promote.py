"""Promotion: the best trial of a finished search becomes a registered model version.

The best trial is chosen on the validation metric only, by the rule every part of leadtune uses:
a trial's value is the best epoch's value of the searched metric, and that epoch's checkpoint is
the one promoted. It is evaluated once on the test split, written into the trial's MLflow run as a
model package (task, config, tensors-only weights, and a ``torch.export`` program; see
:mod:`leadtune.trainables.model_package`), registered under the task's name, and given the alias
``champion`` only if it beats the current champion on the same validation metric and data.
An interrupted search promotes nothing.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from leadtune.search import state as search_state
from leadtune.search.faults import crash_point
from leadtune.search.objectives import choose_best, within_text
from leadtune.search.results import load_results, summarise_trials, trial_runs
from leadtune.search.tracking import TASK_TAG, mlflow_client, use_tracking_uri

CHAMPION = "champion"
MODEL_ARTIFACT = "model"
GAIN_TAG = "leadtune.search_gain"


def _log(message: str) -> None:
    print(f"[leadtune] {message}", file=sys.stderr, flush=True)


def better(new: float, old: float, mode: str) -> bool:
    return new < old if mode == "min" else new > old


def task_of(saved: dict[str, Any]) -> str:
    """The task of a search. Searches written before tasks were recorded: their space's task
    when the space is registered here, else the default task (the only task back then)."""
    if saved.get("task"):
        return saved["task"]
    from leadtune.spaces import SPACES
    from leadtune.trainables.tasks import DEFAULT_TASK

    space = SPACES.get(saved.get("space", ""))
    return space.task if space is not None else DEFAULT_TASK


def best_trial(search_dir: Path, saved: dict[str, Any], spec: Any, client: Any) -> dict[str, Any]:
    return _best_and_rows(search_dir, saved, spec, client)[0]


def _best_and_rows(search_dir: Path, saved: dict[str, Any], spec: Any,
                   client: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    metric, mode = saved["metric"], saved["mode"]
    rows = summarise_trials(
        load_results(search_dir),
        metric,
        mode,
        spec,
        saved.get("trials", {}),
        budget_spent=False,
        runs=trial_runs(client, saved["experiment_id"], saved["parent_run_id"]),
        objectives=saved.get("objectives", []),
    )
    ranked = [
        r
        for r in rows
        if r["state"] in search_state.SUCCESSFUL_TRIAL_STATES
        and r["value"] is not None
        and r["best_checkpoint"]
    ]
    if not ranked:
        raise ValueError(f"no trial of {search_dir} ended with a checkpoint; nothing to promote")
    budgets = saved.get("budgets", [])
    best = choose_best(ranked, mode, budgets)
    if best is None:
        raise ValueError(
            f"no trial of {search_dir} meets the budgets ({within_text(budgets)}); nothing to "
            "promote (loosen --within)"
        )
    return best, ranked


def reference_trial(rows: list[dict[str, Any]], saved: dict[str, Any]) -> dict[str, Any] | None:
    """The trial that ran the space's first queued configuration (its reference point), if
    this search ran it to a checkpoint."""
    from leadtune.spaces import SPACES

    space = SPACES.get(saved.get("space", ""))
    if space is None or not space.initial_points:
        return None
    point = space.initial_points[0]
    matches = [
        r for r in rows
        if all((r.get("config") or {}).get(k) == v for k, v in point.items())
    ]  # fmt: skip
    if not matches:
        return None
    return min(matches, key=lambda r: (r.get("optuna_trial") is None, r.get("optuna_trial") or 0))


def search_gain(spec: Any, best: dict[str, Any], reference: dict[str, Any] | None,
                metric: str, dataset: Any) -> dict[str, Any] | None:  # fmt: skip
    """What the search found beyond its reference point: on validation (the trials' values)
    and once on the test split, with the task's paired test on the same records."""
    if reference is None:
        return None
    found: dict[str, Any] = {
        "reference_trial": reference["trial_id"],
        "validation": {
            "metric": metric,
            "champion": float(best["value"]),
            "reference": float(reference["value"]),
            "difference": float(best["value"]) - float(reference["value"]),
        },
    }
    if reference["trial_id"] == best["trial_id"]:
        found["test"] = None
        found["note"] = "the space's reference point is the champion"
        return found
    if spec.paired_test is not None:
        _log(f"comparing with the reference point (trial {reference['trial_id']}) on test ...")
        found["test"] = spec.paired_test(
            Path(best["best_checkpoint"]), Path(reference["best_checkpoint"]), dataset, "test"
        )
    return found


def gain_sentence(gain: dict[str, Any] | None) -> str:
    """One sentence for the registry and the summary."""
    if not gain:
        return ""
    if gain.get("note"):
        return f"search gain: none, {gain['note']}"
    val = gain["validation"]
    text = (
        f"search gain over the reference point (trial {gain['reference_trial']}): "
        f"{val['metric']} {val['champion']:.4f} vs {val['reference']:.4f}"
    )
    test = gain.get("test")
    if test:
        extra = f" [{test['ci_low']:+.4f}, {test['ci_high']:+.4f}]" if "ci_low" in test else ""
        text += (
            f"; test {test['metric']} {test['a']:.4f} vs {test['b']:.4f} "
            f"({test['difference']:+.4f}{extra}, {test['test']}, p = {test['p_value']:.3g})"
        )
    return text


def check_finished(search_dir: Path) -> dict[str, Any]:
    """The search's saved state, if it finished: only a finished search is promoted."""
    saved = search_state.read_state(search_dir)
    if saved.get("status") != search_state.FINISHED:
        raise ValueError(
            f"search {search_dir} has not finished (status {saved.get('status')!r}); finish it "
            "with `leadtune search --resume` before promoting"
        )
    return saved


def promote_best(
    tracking_uri: str,
    experiment_path: Path,
    dataset: Any = None,
    register_name: str | None = None,
    force: bool = False,
    budgets: list | None = None,
) -> dict[str, Any]:
    """Evaluate, register and (maybe) crown the best model of a search. Returns the decision.
    ``budgets`` ([(metric, op, value)], ``--within``) replace the search's own."""

    from leadtune.trainables.tasks import DataRequest, get_task

    search_dir = Path(experiment_path)
    saved = check_finished(search_dir)
    spec = get_task(task_of(saved))
    metric, mode = saved["metric"], saved["mode"]
    register_name = register_name or saved.get("register_name") or spec.register_name
    client = mlflow_client(tracking_uri)
    if budgets is not None:
        saved = {**saved, "budgets": [list(b) for b in budgets]}
    best, ranked = _best_and_rows(search_dir, saved, spec, client)
    checkpoint, val_value = Path(best["best_checkpoint"]), float(best["value"])
    _log(
        f"best trial {best['trial_id']}: {metric} = {val_value:.5f} at epoch "
        f"{best['best_epoch']} (checkpoint {checkpoint})"
    )
    run_id = best.get("run_id")
    if not run_id:
        raise ValueError(f"no MLflow run for trial {best['trial_id']} of {search_dir}")

    if dataset is None:
        _, dataset = spec.load_data(
            DataRequest(source=Path(saved["data_source"]), limit=saved.get("data_limit"))
        )
    fingerprint = str(getattr(dataset, "fingerprint", "unknown"))
    if fingerprint != saved.get("data_fingerprint"):
        raise ValueError(
            f"the data at {saved['data_source']} (fingerprint {fingerprint[:12]}) is not what the "
            f"search used ({str(saved.get('data_fingerprint'))[:12]}); pass the same data"
        )

    version = _registered_version(client, register_name, run_id, checkpoint)
    if version is not None:
        _log(
            f"trial {best['trial_id']} is already registered as {register_name} v{version.version}"
        )
        version, test_metrics = _complete_version(client, spec, version, run_id, checkpoint,
                                                  dataset)  # fmt: skip
        gain = None
    else:
        _log("evaluating the best checkpoint once on the test split ...")
        test_metrics = spec.evaluate(checkpoint, dataset, "test")
        gain = search_gain(spec, best, reference_trial(ranked, saved), metric, dataset)
        if gain is not None:
            client.log_batch(saved["parent_run_id"], metrics=_metrics(_gain_metrics(gain)))
        version = register_checkpoint(
            client, spec, register_name, run_id, checkpoint, test_metrics,
            {
                "leadtune.study": saved["study"],
                "leadtune.trial_id": best["trial_id"],
                "leadtune.optuna_trial": str(best.get("optuna_trial")),
                "leadtune.search_run_id": saved["parent_run_id"],
                "leadtune.data_fingerprint": fingerprint,
                "leadtune.checkpoint": str(checkpoint),
                "leadtune.epoch": str(best["best_epoch"]),
                "leadtune.val_metric": metric,
                "leadtune.val_mode": mode,
                "leadtune.val_value": repr(val_value),
            },
            gain,
            preprocessing=_dataset_preprocessing(dataset),
        )  # fmt: skip
    # The registry's writes are ordered so that a crash anywhere leaves nothing or a complete
    # version (its test figures and provenance as tags, written with it in one call); the
    # alias and the runs' marks follow, and promoting again finishes them (docs/faults.md).
    with search_state.file_lock(
        search_dir.parents[1] / f".{saved['study']}.lock", f"study {saved['study']}"
    ):
        move, reason = champion_decision(
            client, register_name, version, metric, mode, val_value, fingerprint, force
        )
        if move:
            client.set_registered_model_alias(register_name, CHAMPION, version.version)
            # the model page's description (full width there) says what the champion is
            client.update_registered_model(
                register_name,
                description=f"{model_description(spec)} Champion: v{version.version}"
                + (f", {version.description}" if version.description else "."),
            )
            crash_point("promote_alias_set")
    _log(
        f"registered {register_name} v{version.version}; champion "
        f"{'moved to it' if move else 'unchanged'}: {reason}"
    )
    client.set_tag(run_id, "leadtune.promoted", f"{register_name}/{version.version}")
    # the decision on the search's parent run, where the report (and a reader of MLflow) finds it
    decision = {
        "leadtune.promoted": f"{register_name}/{version.version}",
        "leadtune.promoted_trial": best["trial_id"],
        "leadtune.champion_decision": f"{'moved to it' if move else 'unchanged'}: {reason}",
    }
    sentence = gain_sentence(gain) if gain is not None else version.tags.get(GAIN_TAG)
    if sentence:
        decision[GAIN_TAG] = sentence
    for key, value in decision.items():
        client.set_tag(saved["parent_run_id"], key, value[:5000])
    return {
        "task": spec.name,
        "registered_model": register_name,
        "version": str(version.version),
        "model_uri": f"models:/{register_name}/{version.version}",
        "champion_uri": f"models:/{register_name}@{CHAMPION}",
        "alias_moved": move,
        "reason": reason,
        "trial_id": best["trial_id"],
        "optuna_trial": best.get("optuna_trial"),
        "run_id": run_id,
        "checkpoint": str(checkpoint),
        "epoch": best["best_epoch"],
        "val_metric": metric,
        "val_value": val_value,
        "test_metrics": test_metrics,
        "config": best["config"],
        "search_gain": gain,
    }


def _registered_version(client: Any, name: str, run_id: str, checkpoint: Path) -> Any:
    """The version this checkpoint was registered as before (promote run twice), if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for version in versions:
        if version.run_id == run_id and version.tags.get("leadtune.checkpoint") == str(checkpoint):
            return version
    return None


def _gain_metrics(gain: dict[str, Any]) -> dict[str, float]:
    """The search gain as MLflow metrics of the search's parent run."""
    found = {"search_gain_val": gain["validation"]["difference"]}
    test = gain.get("test") or {}
    if _is_number(test.get("difference")):
        found["search_gain_test"] = test["difference"]
        found["search_gain_test_p"] = test["p_value"]
    return found


def _complete_version(client: Any, spec: Any, version: Any, run_id: str, checkpoint: Path,
                      dataset: Any) -> tuple[Any, dict[str, float]]:  # fmt: skip
    """A version registered before, with its test figures: a version an older leadtune left
    without them (it tagged them one by one after creating it, and could die in between) gets
    them now, on its run as well."""
    test_metrics = _test_tags(version.tags)
    if test_metrics:
        return version, test_metrics
    _log(f"v{version.version} has no test figures (a promotion cut short); evaluating ...")
    test_metrics = {k: v for k, v in spec.evaluate(checkpoint, dataset, "test").items()
                    if _is_number(v)}  # fmt: skip
    client.log_batch(run_id, metrics=_metrics(test_metrics))
    for key, value in test_metrics.items():
        client.set_model_version_tag(version.name, version.version, f"leadtune.{key}",
                                     repr(float(value)))  # fmt: skip
    return client.get_model_version(version.name, version.version), test_metrics


def _test_tags(tags: dict[str, str]) -> dict[str, float]:
    return {
        k[len("leadtune.") :]: float(v) for k, v in tags.items() if k.startswith("leadtune.test_")
    }


def register_checkpoint(client: Any, spec: Any, name: str, run_id: str, checkpoint: Path,
              test_metrics: dict[str, Any], tags: dict[str, str],
              gain: dict[str, Any] | None = None,
              preprocessing: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """Write the model into the trial's run as an MLflow model (pyfunc flavour around the
    weights-only package, ``trainables.pyfunc``) and its test figures, then register it as a
    new version with all its tags in one call (a crash before leaves no version, one after a
    complete one)."""
    from mlflow.exceptions import MlflowException

    from leadtune.trainables.data.cache import find_preprocess
    from leadtune.trainables.model_package import write_package
    from leadtune.trainables.pyfunc import PACKAGE_DATA, save_pyfunc
    from leadtune.trainables.tasks import load_trained_model

    model, config, state = load_trained_model(checkpoint)
    data = state.get("data") or {}
    example = spec.example_input(config, int(data.get("fs", 100)))
    with tempfile.TemporaryDirectory(prefix="leadtune-package-") as tmp:
        package = write_package(
            Path(tmp) / PACKAGE_DATA,
            spec.name,
            config.to_dict(),
            model.state_dict(),
            {
                "data": data,
                "epoch": state.get("epoch"),
                "validation_metrics": _numbers(state.get("metrics") or {}, "val_"),
                "val_thresholds": (state.get("metrics") or {}).get("val_thresholds"),
                "test_metrics": {k: v for k, v in test_metrics.items() if _is_number(v)},
                "source": {"checkpoint": str(checkpoint), "run_id": run_id, **tags},
                # what the training data went through, so the package says what input it wants:
                # the prepared dataset's own settings where the caller has it
                "preprocessing": preprocessing
                or find_preprocess(
                    str(data.get("fingerprint", "unknown")), int(data.get("fs", 100))
                )[0],
            },
            program_of=(model, example),
            dynamic_leads=spec.variable_leads,
        )
        mlmodel = save_pyfunc(Path(tmp) / MODEL_ARTIFACT, package, spec, example)
        client.log_artifacts(run_id, str(mlmodel), MODEL_ARTIFACT)
        model_id = _log_model_entity(client, run_id, mlmodel, spec, tags)
    crash_point("promote_model_logged")
    client.log_batch(run_id, metrics=_metrics(test_metrics, model_id))
    crash_point("promote_run_metrics")
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    try:
        client.create_registered_model(name, description=model_description(spec))
    except MlflowException:
        pass  # it exists
    figures = {f"leadtune.{k}": repr(float(v)) for k, v in test_metrics.items() if _is_number(v)}
    if gain is not None:
        figures[GAIN_TAG] = gain_sentence(gain)[:5000]
    version = client.create_model_version(
        name, source=source, run_id=run_id, tags={TASK_TAG: spec.name, **tags, **figures},
        description="; ".join(
            p for p in (version_description(spec, test_metrics, tags), gain_sentence(gain)) if p
        ),
    )  # fmt: skip
    crash_point("promote_version_created")
    if model_id is not None:
        _link_version(client, model_id, name, version.version)
    use_tracking_uri(client.tracking_uri)
    return client.get_model_version(name, version.version)


def model_description(spec: Any) -> str:
    return f"leadtune {spec.name} models; load with leadtune.analysis.load_model."


def version_description(spec: Any, test_metrics: dict[str, Any], tags: dict[str, str]) -> str:
    """One line for the registry's version table (its tags are cut off there): the test
    figures, the validation value it was chosen on, and where it came from."""
    parts = [
        f"{c.label} {float(test_metrics[c.key]):.4f}"
        for c in spec.test_metrics
        if _is_number(test_metrics.get(c.key))
    ]
    if tags.get("leadtune.val_metric") and tags.get("leadtune.val_value"):
        parts.append(
            f"chosen on {tags['leadtune.val_metric']} {float(tags['leadtune.val_value']):.4f}"
            + (f" (epoch {tags['leadtune.epoch']})" if tags.get("leadtune.epoch") else "")
        )
    if tags.get("leadtune.trial_id"):
        parts.append(
            f"trial {tags['leadtune.trial_id']}"
            + (f" of study {tags['leadtune.study']}" if tags.get("leadtune.study") else "")
        )
    return "; ".join(parts)


def champion_decision(client: Any, name: str, version: Any, metric: str, mode: str,
                      value: float, fingerprint: str, force: bool) -> tuple[bool, str]:  # fmt: skip
    """Whether ``version`` becomes the champion, and why (one sentence)."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return True, "there was no champion yet"
    if champion.version == version.version:
        return False, f"v{version.version} already is the champion"
    if force:
        return True, "forced (--force)"
    if champion.tags.get("leadtune.val_metric") != metric:
        return False, (
            f"the champion v{champion.version} was chosen on "
            f"{champion.tags.get('leadtune.val_metric')!r}, not {metric!r}: not comparable "
            "(use --force to move the alias)"
        )
    if champion.tags.get("leadtune.data_fingerprint") != fingerprint:
        return False, (
            f"the champion v{champion.version} was validated on other data "
            f"({str(champion.tags.get('leadtune.data_fingerprint'))[:12]}): not comparable "
            "(use --force to move the alias)"
        )
    old = float(champion.tags.get("leadtune.val_value", "nan"))
    if math.isnan(old) or better(value, old, mode):
        return True, f"{metric} {value:.5f} beats the champion v{champion.version}'s {old:.5f}"
    return False, (
        f"{metric} {value:.5f} does not beat the champion v{champion.version}'s {old:.5f}"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(values: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if k.startswith(prefix) and _is_number(v)}


def _metrics(values: dict[str, Any], model_id: str | None = None) -> list:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(k, float(v), now, 0, model_id=model_id) for k, v in values.items() if _is_number(v)
    ]


def _dataset_preprocessing(dataset: Any) -> dict[str, Any] | None:
    """The preprocessing a prepared dataset's manifest records (None: the caller's data says
    none, e.g. a task with its own data layer)."""
    manifest = getattr(dataset, "manifest", None) or {}
    found = (manifest.get("settings") or {}).get("preprocess")
    return dict(found) if found else None


def _link_version(client: Any, model_id: str, name: str, version: str) -> None:
    """Name the registered version on the logged model, as ``mlflow.register_model`` does (the
    tag the model's page reads its "Registered versions" from)."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    known = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    versions = (json.loads(known) if known else []) + [{"name": name, "version": str(version)}]
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})


def _log_model_entity(
    client: Any, run_id: str, folder: Path, spec: Any, tags: dict[str, str]
) -> str | None:
    """The same MLflow model as an MLflow 3 *logged model* of the trial's run (its "Logged
    models" tab, the model's own page with its test metrics, linked from the registered
    version). The run artefact ``model/`` stays the version's source. A tracking server that
    knows no logged models (MLflow 2) is said and skipped: the registration does not need it."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    try:
        experiment_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(
            experiment_id, name=MODEL_ARTIFACT, source_run_id=run_id, model_type=spec.name,
            tags={k: v for k, v in tags.items() if k.startswith("leadtune.")},
        )  # fmt: skip
        client.log_model_artifacts(logged.model_id, str(folder))
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except MlflowException as exc:
        print(f"[promote] no MLflow logged model ({str(exc).splitlines()[0][:200]})",
              file=sys.stderr)  # fmt: skip
        return None
    return logged.model_id

"""The Optuna side of a search: the persistent study, the sampler, the space with the user's fixed
settings, and the bookkeeping that ties every Optuna trial to one Tune trial.

- Fixed settings (``--set``, the space's ``fixed``) win over what the space suggests: the space
  sees them as constants and the trial's config carries them unchanged. :func:`check_space`
  samples the space a few times before anything starts, so a combination the task refuses
  (``--set heads=3`` with ``d_model`` 32) is a one-line error, not failed trials.
- Every Tune trial's config carries its Optuna trial number (:data:`OPTUNA_TRIAL_KEY`), and every
  Optuna trial the search asks for is marked with the search's name. Optuna trials that no Tune
  trial can finish any more (a driver killed between asking and saving) are failed with a reason
  (:func:`fail_orphaned_trials`), so a study never keeps RUNNING trials that nothing will end.
- The sampler's seed is offset by the number of trials the study already holds, so continuing a
  study explores new points instead of replaying the first search's random start.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

# Tune config keys that are leadtune's bookkeeping, not training settings (removed before the
# config reaches the task).
OPTUNA_TRIAL_KEY = "_optuna_trial"
SEARCH_ATTR = "leadtune_search"
TUNE_TRIAL_ATTR = "tune_trial_id"  # the Tune trial id, on every Optuna trial a search asks for
END_ATTR = "leadtune_end"  # how the trial ended: completed, stopped_early, failed, ...
BUDGET_ATTR = "leadtune_budget"  # study: the data and fixed settings its values depend on
WARM_ATTR = "leadtune_warm_start"  # trial: the study#number it was copied or queued from


def training_config(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's Tune config without leadtune's bookkeeping keys."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


class _FixedTrial:
    """An Optuna trial as a space sees it: ``suggest_*`` of a fixed name returns the fixed
    value without making it a searched parameter."""

    def __init__(self, trial: Any, fixed: dict[str, Any]) -> None:
        self._trial, self._fixed = trial, fixed

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._trial, name)
        if not name.startswith("suggest_"):
            return attribute

        def suggest(param: str, *args: Any, **kwargs: Any) -> Any:
            if param in self._fixed:
                return self._fixed[param]
            return attribute(param, *args, **kwargs)

        return suggest


class SpaceWithFixed:
    """The space's define-by-run function with ``fixed`` settings applied on top (a class, not a
    closure, so that the searcher that holds it can be pickled into Tune's checkpoints)."""

    def __init__(self, define: Callable[[Any], dict | None], fixed: dict[str, Any]) -> None:
        self.define, self.fixed = define, copy.deepcopy(fixed)

    def __call__(self, trial: Any) -> dict[str, Any]:
        suggested = self.define(_FixedTrial(trial, self.fixed)) or {}
        return {**suggested, **self.fixed}


def check_space(
    define: Callable[[Any], dict], fixed: dict[str, Any], make_config: Callable, samples: int = 16
) -> None:
    """Sample the space (with the fixed settings) a few times in memory and build each trial's
    config as the task will; the first refusal becomes a one-line error."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(samples):
        trial = study.ask()
        try:
            params = define(trial)
        except Exception as exc:
            raise ValueError(f"the search space failed with the fixed settings: {exc}") from None
        try:
            make_config({**fixed, **params})
        except ValueError as exc:
            shown = {k: v for k, v in params.items() if k not in fixed}
            raise ValueError(
                f"{exc} (a trial of the space would get {shown} with the fixed "
                f"settings {fixed}); change or remove --set values"
            ) from None
        study.tell(trial, 0.0)


# one Optuna storage per database and process: each new one costs the driver ~30-50 ms of CPU
# (an engine and Optuna's schema check) and a search opened five
_STORAGES: dict[str, tuple[Any, Any]] = {}


def optuna_storage(url: str) -> Any:
    """The Optuna storage for database ``url``, made once per process (and again when a SQLite
    file was replaced by another, as between tests)."""
    import optuna

    cached = _STORAGES.get(url)
    if cached is not None and cached[1] == _database_identity(url):
        return cached[0]
    storage = optuna.storages.RDBStorage(url)
    _STORAGES[url] = (storage, _database_identity(url))
    return storage


def _database_identity(url: str) -> Any:
    """A SQLite database's file (device, inode), or None where there is none yet; the URL for
    a database server."""
    import os

    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return url
    try:
        found = os.stat(url[len(prefix) :].split("?", 1)[0])
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


def open_study(storage: str, name: str, mode: str | list[str], initial_points: tuple, seed: int,
               objective: str | list[str] | None = None, budget: dict[str, Any] | None = None,
               warm_start: str | None = None, warm_trials: int = 3):  # fmt: skip
    """Create or load the study; when it is new, record what its values depend on
    (``budget``: the data and the fixed settings), queue the space's initial points and warm
    start it from another study (:func:`warm_start_from`). Names its objective (optuna-dashboard
    shows the name instead of "Objective 0"). ``mode`` and ``objective`` are lists for a
    multi-objective study (one direction per objective).
    Returns (study, the sampler seed for this search, what the warm start did or None)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    modes = list(mode) if isinstance(mode, (list, tuple)) else [mode]
    wanted = ["minimize" if m == "min" else "maximize" for m in modes]
    study = optuna.create_study(
        study_name=name,
        storage=optuna_storage(storage),
        directions=wanted,
        load_if_exists=True,
    )
    found = [d.name.lower() for d in study.directions]
    if found != wanted:
        raise ValueError(
            f"study {name!r} in {storage} has directions {found}, but this search would "
            f"{wanted}; use another --study, or the study's --mode and --objective"
        )
    existing = len(study.trials)
    names = list(objective) if isinstance(objective, (list, tuple)) else [objective]
    if objective and study.metric_names and list(study.metric_names) != names:
        raise ValueError(
            f"study {name!r} in {storage} optimises {study.metric_names}, but this search would "
            f"{names}; use another --study, or the study's --metric and --objective"
        )
    if objective and not study.metric_names:
        study.set_metric_names(
            list(objective) if isinstance(objective, (list, tuple)) else [objective]
        )
    warmed = None
    if not existing:
        if budget is not None:
            study.set_user_attr(BUDGET_ATTR, _budget_key(budget))
        for point in initial_points:
            study.enqueue_trial(dict(point))
        if warm_start:
            warmed = warm_start_from(study, storage, warm_start, warm_trials)
    return study, seed + existing, warmed


def _budget_key(budget: dict[str, Any]) -> str:
    import json

    return json.dumps(budget, sort_keys=True, default=str)


def check_warm_start(storage: str, name: str, study: str) -> None:
    """``--warm-start NAME`` names another study with finished trials in the same storage."""
    import optuna

    if name == study:
        raise ValueError(f"--warm-start {name}: that is this search's own study; name another")
    try:
        source = optuna.load_study(study_name=name, storage=optuna_storage(storage))
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise ValueError(
            f"--warm-start {name}: no such study in {storage} (studies there: "
            f"{', '.join(known) or 'none'})"
        ) from None
    if not source.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise ValueError(f"--warm-start {name}: that study has no completed trial yet")
    try:
        own = optuna.load_study(study_name=study, storage=optuna_storage(storage))
    except KeyError:
        return
    if own.trials:
        raise ValueError(
            f"--warm-start {name}: study {study!r} already has {len(own.trials)} trial(s); a warm "
            "start begins a new study (pass another --study)"
        )


def warm_start_from(study: Any, storage: str, name: str, k: int) -> dict[str, Any]:
    """Start ``study`` from the best ``k`` completed trials of study ``name``.

    Where both studies' values mean the same thing (same data, same fixed settings and
    objective: their recorded budgets match), the trials are copied in as completed, so TPE
    learns from their results at once. Otherwise their settings are queued, to be run again
    under this study's budget. Each trial keeps where it came from (``leadtune_warm_start``)."""
    import optuna

    source = optuna.load_study(study_name=name, storage=optuna_storage(storage))
    if source.directions[0] != study.directions[0]:
        raise ValueError(f"--warm-start {name}: that study optimises in the other direction")
    # ranked by the primary objective (the first); results are copied only where every
    # objective and the budget match
    done = [
        t
        for t in source.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.values and math.isfinite(t.values[0])
    ]
    done.sort(key=lambda t: t.values[0], reverse=study.directions[0].name == "MAXIMIZE")
    best = done[:k]
    same = (
        source.user_attrs.get(BUDGET_ATTR) is not None
        and source.user_attrs.get(BUDGET_ATTR) == study.user_attrs.get(BUDGET_ATTR)
        and len(source.directions) == len(study.directions)
    )
    for trial in best:
        origin = {WARM_ATTR: f"{name}#{trial.number}"}
        if same:
            study.add_trial(
                optuna.trial.create_trial(
                    params=trial.params,
                    distributions=trial.distributions,
                    values=trial.values,
                    intermediate_values=trial.intermediate_values,
                    user_attrs=origin,
                )
            )
        else:
            study.enqueue_trial(dict(trial.params), user_attrs=origin)
    return {"from": name, "trials": [t.number for t in best],
            "how": "results copied" if same else "settings queued"}  # fmt: skip


def tune_trial_numbers(storage: str, study: str, search: str) -> dict[str, int]:
    """Tune trial id -> Optuna trial number for the trials this search asked for. A Tune trial
    that has not reported yet carries no config in Tune's results, so this is how its Optuna
    trial is found."""
    import optuna

    loaded = optuna.load_study(study_name=study, storage=optuna_storage(storage))
    return {
        trial.user_attrs[TUNE_TRIAL_ATTR]: trial.number
        for trial in loaded.get_trials(deepcopy=False)
        if trial.user_attrs.get(SEARCH_ATTR) == search and TUNE_TRIAL_ATTR in trial.user_attrs
    }


def prune_budget_stopped(storage: str, study: str, numbers: list[int]) -> list[int]:
    """Tell Optuna PRUNED for the trials the time budget stopped (Tune does not tell the
    searcher of those): each keeps its last intermediate value, as a scheduler-stopped trial
    does. Returns the numbers changed (only trials still RUNNING are)."""
    import optuna

    loaded = optuna.load_study(study_name=study, storage=optuna_storage(storage))
    running = {
        t.number: t
        for t in loaded.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    }
    pruned = []
    for number in numbers:
        trial = running.get(number)
        if trial is None:
            continue
        loaded._storage.set_trial_user_attr(trial._trial_id, END_ATTR, "stopped_by_budget")
        loaded.tell(number, state=optuna.trial.TrialState.PRUNED)
        pruned.append(number)
    return pruned


def fail_orphaned_trials(storage: str, study: str, search: str, alive: set[str]) -> list[int]:
    """Fail the RUNNING Optuna trials this search asked for that no Tune trial will finish (their
    Tune trial id is not in ``alive``, the Tune trials a resume will run). Returns their numbers."""
    import optuna

    loaded = optuna.load_study(study_name=study, storage=optuna_storage(storage))
    failed = []
    for trial in loaded.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if (
            trial.user_attrs.get(SEARCH_ATTR) != search
            or trial.user_attrs.get(TUNE_TRIAL_ATTR) in alive
        ):
            continue
        loaded._storage.set_trial_user_attr(
            trial._trial_id, "leadtune_failed_because", "no Tune trial of the search holds it"
        )
        loaded._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        failed.append(trial.number)
    return failed

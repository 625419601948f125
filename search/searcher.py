"""Ray's OptunaSearch, with every Optuna trial tied to its Tune trial (see ``study``), and each
trial's end told to Optuna as it happened.

Ray's own searcher tells Optuna COMPLETE for every trial that returns a value, including one the
scheduler stopped after a fraction of its budget; TPE would then learn from cut-short values as
if they were final. Here every epoch's value is an intermediate value (step = epoch), a trial
that ran its whole schedule (or stopped on its own patience) is COMPLETE, one the scheduler or
the time budget stopped is PRUNED (Optuna then takes its last intermediate value as its value),
and one that crashed is FAIL. The reason is kept as the trial's ``leadtune_end`` attribute.

In a multi-objective study (``metric`` a list, see ``search.objectives``) a completed trial is told
all its values; Optuna keeps no intermediate values there (it does not support them with several
objectives), so a pruned trial has none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from leadtune.search.faults import StorageGuard, crash_point
from leadtune.search.study import (
    END_ATTR,
    OPTUNA_TRIAL_KEY,
    SEARCH_ATTR,
    TUNE_TRIAL_ATTR,
    optuna_storage,
)

PROGRESS_KEY = "schedule_pct"  # share of its own epochs a trial has run (SearchReporter)


def ran_full_budget(result: dict[str, Any]) -> bool:
    """Whether a trial's last result ends its schedule (or its own early stopping)."""
    if result.get("early_stopped"):
        return True
    progress = result.get(PROGRESS_KEY)
    return progress is None or float(progress) >= 100.0 - 1e-9


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class LeadtuneOptunaSearch(OptunaSearch):
    """Marks each Optuna trial with the search's name and its Tune trial id, and puts the Optuna
    trial number into the Tune trial's config (``_optuna_trial``): the two ids match across
    Optuna, Tune and MLflow, and a search can tell its own Optuna trials from others'."""

    def __init__(self, search_name: str, storage_path: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.search_name = search_name
        self.storage_path = storage_path  # checked before a failed trial is told (faults)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr(SEARCH_ATTR, self.search_name)
            ot_trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
            config = {**config, OPTUNA_TRIAL_KEY: ot_trial.number}
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if isinstance(self.metric, list):  # Optuna has no intermediate values for several
            return
        value, step = result.get(self.metric), result.get("epoch")
        reported = self.__dict__.setdefault("_reported_steps", {})  # (absent in old pickles)
        if (
            _finite(value)
            and step is not None
            and reported.get(trial_id) != int(step)
            and not self._told_before(trial_id)
        ):
            self._ot_trials[trial_id].report(float(value), int(step))
            reported[trial_id] = int(step)

    def _told_before(self, trial_id: str) -> bool:
        """Whether the study already holds the trial as finished: told by a run of this search
        that was killed before Tune saved it (resume). Asked of the storage once per trial and
        process (the answer is kept in ``_storage_finished``, which is never saved: a resume
        asks again); after that only this searcher tells it, and it remembers that too."""
        known = self.__dict__.setdefault("_storage_finished", {})
        if trial_id not in known:
            known[trial_id] = _finished_in_storage(self._ot_study, self._ot_trials[trial_id])
        return known[trial_id]

    def save(self, checkpoint_path: str) -> None:
        # what this process saw in the storage is not saved: a resume asks again
        seen = self.__dict__.pop("_storage_finished", None)
        try:
            super().save(checkpoint_path)
        finally:
            if seen is not None:
                self._storage_finished = seen

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.__dict__.pop("_storage_finished", None)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        import optuna

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial, result = self._ot_trials[trial_id], result or {}
        if _finished_in_storage(self._ot_study, ot_trial):
            # a driver that died after telling Optuna but before Tune saved its state: the
            # restored searcher sees the trial end again; Optuna's record is kept as it is
            self._completed_trials.add(trial_id)
            return
        names = self.metric if isinstance(self.metric, list) else [self.metric]
        found = [result.get(name) for name in names]
        value = found[0] if all(_finite(v) for v in found) else None
        if not error:  # Tune hands a trial's last result here, not to on_trial_result
            self.on_trial_result(trial_id, result)
        if error and getattr(self, "storage_path", None) is not None:
            # a trial that failed on a full disk did not fail: the search stops (interrupted)
            # and a resume on a freed path runs it again, so Optuna is not told
            StorageGuard(self.storage_path).check(f"trial {trial_id} failed", force=True)
        if error:
            state, values, reason = optuna.trial.TrialState.FAIL, None, "failed"
        elif not _finite(value):
            state, values, reason = optuna.trial.TrialState.FAIL, None, "no finite value"
        elif ran_full_budget(result):
            state = optuna.trial.TrialState.COMPLETE
            values = [float(v) for v in found] if len(found) > 1 else float(value)
            reason = "early_stopped_patience" if result.get("early_stopped") else "completed"
        else:
            # stopped by the scheduler (or the time budget): Optuna keeps the last intermediate
            # value as the trial's value
            state, values, reason = optuna.trial.TrialState.PRUNED, None, "stopped_early"
        ot_trial.set_user_attr(END_ATTR, reason)
        self._ot_study.tell(ot_trial, values, state=state)
        crash_point("optuna_tell")  # told, and neither Tune nor the state file knows it yet
        self._completed_trials.add(trial_id)


def _finished_in_storage(study: Any, ot_trial: Any) -> bool:
    """Whether the study's storage already holds this trial as finished (told before)."""
    stored = study._storage.get_trial(ot_trial._trial_id)
    return stored.state.is_finished()


def make_searcher(define: Callable, metric: str | list[str], mode: str | list[str], storage: str,
                  study: str, seed: int, search: str, storage_path: Any = None):  # fmt: skip
    """Ray's OptunaSearch on the persistent study, tagging each trial (see module doc)."""
    import optuna

    return LeadtuneOptunaSearch(
        search_name=search,
        storage_path=storage_path,
        space=define,
        metric=metric,
        mode=mode,
        sampler=optuna.samplers.TPESampler(seed=seed),
        study_name=study,
        storage=optuna_storage(storage),
    )

"""Ray's OptunaSearch, with every Optuna trial tied to its Tune trial (see ``study``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from leadtune.search.study import OPTUNA_TRIAL_KEY, SEARCH_ATTR, TUNE_TRIAL_ATTR


class LeadtuneOptunaSearch(OptunaSearch):
    """Marks each Optuna trial with the search's name and its Tune trial id, and puts the Optuna
    trial number into the Tune trial's config (``_optuna_trial``): the two ids match across
    Optuna, Tune and MLflow, and a search can tell its own Optuna trials from others'."""

    def __init__(self, search_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.search_name = search_name

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr(SEARCH_ATTR, self.search_name)
            ot_trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
            config = {**config, OPTUNA_TRIAL_KEY: ot_trial.number}
        return config


def make_searcher(
    define: Callable, metric: str, mode: str, storage: str, study: str, seed: int, search: str
):
    """Ray's OptunaSearch on the persistent study, tagging each trial (see module doc)."""
    import optuna

    return LeadtuneOptunaSearch(
        search_name=search,
        space=define,
        metric=metric,
        mode=mode,
        sampler=optuna.samplers.TPESampler(seed=seed),
        study_name=study,
        storage=optuna.storages.RDBStorage(storage),
    )

"""The Optuna side of a search without Ray: warm starts between studies."""

from __future__ import annotations

import optuna
import pytest

from leadtune.search.study import WARM_ATTR, check_warm_start, open_study

SPACE = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}


def _earlier(storage: str, budget: dict) -> None:
    study, _, _ = open_study(storage, "earlier", "min", (), 0, "best_val_loss", budget)
    for lr, value in ((1e-3, 0.5), (1e-2, 0.2), (3e-2, 0.9), (5e-3, 0.3)):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=SPACE,
                                                  value=value))  # fmt: skip
    pruned = optuna.trial.create_trial(params={"lr": 2e-2}, distributions=SPACE, value=0.01,
                                       state=optuna.trial.TrialState.PRUNED)  # fmt: skip
    study.add_trial(pruned)  # cut short: never a warm start's best


def test_warm_start_copies_results_where_the_budget_matches(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    budget = {"data": "abc", "fixed": {"epochs": 4}}
    _earlier(storage, budget)
    check_warm_start(storage, "earlier", "later")
    study, _, warmed = open_study(storage, "later", "min", ({"lr": 1e-3},), 0, "best_val_loss",
                                  budget, "earlier", 2)  # fmt: skip
    assert warmed == {"from": "earlier", "trials": [1, 3], "how": "results copied"}
    copied = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.value for t in copied] == [0.2, 0.3]
    assert [t.user_attrs[WARM_ATTR] for t in copied] == ["earlier#1", "earlier#3"]
    # the space's own starting point is still queued first
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert [t.system_attrs["fixed_params"] for t in waiting] == [{"lr": 1e-3}]


def test_warm_start_queues_settings_where_the_budget_differs(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    _earlier(storage, {"data": "abc", "fixed": {"epochs": 4}})
    study, _, warmed = open_study(storage, "later", "min", (), 0, "best_val_loss",
                                  {"data": "abc", "fixed": {"epochs": 30}}, "earlier", 3)  # fmt: skip
    assert warmed["how"] == "settings queued" and warmed["trials"] == [1, 3, 0]
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert [t.system_attrs["fixed_params"]["lr"] for t in waiting] == [1e-2, 5e-3, 1e-3]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def test_warm_start_errors_are_one_line_and_come_first(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    _earlier(storage, {"data": "abc"})
    with pytest.raises(ValueError, match=r"no such study .*\(studies there: earlier\)"):
        check_warm_start(storage, "nope", "later")
    with pytest.raises(ValueError, match="own study"):
        check_warm_start(storage, "earlier", "earlier")
    open_study(storage, "later", "min", ({"lr": 1e-3},), 0)
    with pytest.raises(ValueError, match="already has 1 trial"):
        check_warm_start(storage, "earlier", "later")
    with pytest.raises(ValueError, match="other direction"):
        open_study(storage, "upside", "max", (), 0, None, None, "earlier")


def _one_float(trial):  # a space the searcher's save can pickle
    return {"x": trial.suggest_float("x", 0, 1)}


def test_a_trial_optuna_already_finished_is_never_told_again(tmp_path):
    """A driver killed after telling Optuna a trial's end, before Tune saved the searcher: the
    restored searcher sees the trial end again. It must not tell Optuna a second time (that was
    ``UpdateFinishedTrialError`` on every --resume) nor change the recorded result."""
    from leadtune.search.searcher import make_searcher

    storage = f"sqlite:///{tmp_path}/optuna.db"
    open_study(storage, "s", "min", (), 0, "best_val_loss")
    searcher = make_searcher(_one_float, "best_val_loss", "min", storage, "s", 0, "a")
    searcher.suggest("t1")
    result = {"best_val_loss": 0.5, "epoch": 2, "schedule_pct": 100.0}
    searcher.on_trial_result("t1", result)
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune's last save before the kill
    searcher.on_trial_complete("t1", result)
    # the state Tune restores is older: the trial is not known as completed there
    searcher.restore(str(tmp_path / "searcher.pkl"))
    assert "t1" not in searcher._completed_trials
    searcher.on_trial_result("t1", {**result, "best_val_loss": 0.1, "epoch": 3})
    searcher.on_trial_complete("t1", {**result, "best_val_loss": 0.1})
    (trial,) = optuna.load_study(study_name="s", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.5
    assert trial.intermediate_values == {2: 0.5}


def test_a_trial_stopped_short_of_its_schedule_is_not_called_completed():
    """The state leadtune records (summary, MLflow tag, Pareto front) follows the schedule the
    trial ran, also when the space leaves ``epochs`` to the task's default (not in the config):
    the diagnosis search once called 13 ASHA-stopped trials "completed"."""
    from types import SimpleNamespace

    from leadtune.search.callback import trial_state

    unfixed = SimpleNamespace(config={"model": "inception1d", "lr": 0.01})
    assert trial_state(unfixed, {"epoch": 13, "schedule_pct": 26.0}) == "early_stopped_scheduler"
    assert trial_state(unfixed, {"epoch": 50, "schedule_pct": 100.0}) == "completed"
    assert trial_state(unfixed, {"epoch": 7, "early_stopped": True}) == "early_stopped_patience"
    fixed = SimpleNamespace(config={"epochs": 4})  # a result from before schedule_pct existed
    assert trial_state(fixed, {"epoch": 2}) == "early_stopped_scheduler"

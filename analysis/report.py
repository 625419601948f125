"""`leadtune report`: a readable report of one search, from what the search stored.

Sources: the search folder's ``leadtune_search.state`` (which study, MLflow parent run, Optuna
storage), the MLflow child runs (one per trial: params, per-epoch metrics with step = epoch,
state, duration) and the Optuna study (objective values, parameter importances).

Output: ``report.md`` or ``report.html`` with PNG plots in ``plots/`` (Optuna's own
``optuna.visualization.matplotlib`` plots of the study, and leadtune's learning curves from
MLflow's per-epoch metrics), plus
``trials.csv`` and ``report.json``; the folder is also logged to the search's MLflow parent run
under ``report/`` so it shows in the MLflow UI.
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leadtune.search.state import read_state


def curve_metrics(state: dict[str, Any]) -> list[str]:
    """The validation metrics a report shows per epoch: the searched one and the task's table
    metrics (lead and set accuracy for lead identification)."""
    from leadtune.search.promote import task_of
    from leadtune.trainables.tasks import get_task

    spec = get_task(task_of(state))
    return list(dict.fromkeys([state["metric"], *(c.key for c in spec.table_metrics)]))


# Below this many finished trials, importances say little; the report says so.
FEW_TRIALS = 10


@dataclass
class TrialRow:
    trial_id: str
    run_id: str
    state: str
    params: dict[str, str]
    metrics: dict[str, float]  # last value of each metric
    best_value: float | None  # of the search metric, best over epochs
    seconds: float | None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    optuna_trial: str | None = None  # the Optuna trial number of this Tune trial
    best_epoch: int | None = None  # the epoch of best_value (the checkpoint promotion uses)

    def at_best_epoch(self, name: str) -> float | None:
        """A metric's value at the best epoch: one number per fact, as everywhere else."""
        for step, value in self.curves.get(name, []):
            if step == self.best_epoch:
                return value
        return None


@dataclass
class SearchData:
    search_dir: Path
    state: dict[str, Any]
    tracking_uri: str
    trials: list[TrialRow]
    optuna_trials: list[dict[str, Any]]  # number, state, value, params
    importances: dict[str, float]
    importance_note: str
    notes: list[str] = field(default_factory=list)
    parent_tags: dict[str, str] = field(default_factory=dict)  # the search's MLflow parent run

    @property
    def metric(self) -> str:
        return self.state["metric"]

    @property
    def mode(self) -> str:
        return self.state["mode"]

    def best(self) -> TrialRow | None:
        """The search's champion as the search chose it (search.objectives: the best metric
        within its budgets), else the best metric."""
        chosen = self.state.get("best_trial")
        for trial in self.trials:
            if chosen and trial.trial_id == chosen:
                return trial
        if self.state.get("budgets") and self.state.get("status") == "finished":
            return None  # no trial met the search's --within budgets
        done = [t for t in self.trials if t.best_value is not None and math.isfinite(t.best_value)]
        if not done:
            return None
        pick = min if self.mode == "min" else max
        return pick(done, key=lambda t: t.best_value)


# -- finding a search ----------------------------------------------------------------------------


def tracking_uri_for(search_dir: Path, state: dict[str, Any], given: str | None) -> str | None:
    """--tracking-uri, else the one the search was given, else its own SQLite database."""
    if given:
        return given
    if state.get("tracking_uri_given"):
        return state["tracking_uri_given"]
    db = search_dir.parents[1] / "mlflow.db"  # where a search started its own server
    return f"sqlite:///{db.resolve()}" if db.is_file() else None


# -- collecting ----------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def collect(search_dir: Path, tracking_uri: str | None) -> SearchData:
    """Read the search state, its MLflow child runs and its Optuna study."""
    from leadtune.search.tracking import check_tracking_uri

    search_dir = Path(search_dir)
    state = read_state(search_dir)
    uri = check_tracking_uri(
        tracking_uri_for(search_dir, state, tracking_uri), f"the report of {search_dir}"
    )
    from leadtune.search.tracking import mlflow_client

    client = mlflow_client(uri)
    metric, mode = state["metric"], state["mode"]
    runs = client.search_runs(
        [state["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'",
        max_results=5000,
    )
    trials = []
    for run in runs:
        curves = {}
        for name in {*curve_metrics(state), metric}:
            history = client.get_metric_history(run.info.run_id, name)
            curves[name] = sorted((int(m.step), float(m.value)) for m in history)
        points = [(s, v) for s, v in curves.get(metric, []) if math.isfinite(v)]
        best = (min if mode == "min" else max)(points, key=lambda p: p[1]) if points else None
        end = run.info.end_time or int(time.time() * 1000)
        trials.append(
            TrialRow(
                trial_id=run.data.tags.get("leadtune.trial_id", run.info.run_name or "?"),
                run_id=run.info.run_id,
                state=run.data.tags.get("leadtune.state", run.info.status.lower()),
                params=dict(run.data.params),
                metrics={k: float(v) for k, v in run.data.metrics.items()},
                best_value=best[1] if best else None,
                seconds=(end - run.info.start_time) / 1000 if run.info.start_time else None,
                curves=curves,
                optuna_trial=run.data.tags.get("leadtune.optuna_trial"),
                best_epoch=best[0] if best else None,
            )
        )
    trials.sort(key=lambda t: (t.trial_id, t.run_id))
    optuna_trials, importances, note = _optuna_facts(state)
    try:
        parent_tags = dict(client.get_run(state["parent_run_id"]).data.tags)
    except Exception:  # a parent run removed from MLflow: the report goes on without it
        parent_tags = {}
    if not parent_tags.get("leadtune.promoted"):  # promoted before the parent recorded it
        for run in runs:
            if run.data.tags.get("leadtune.promoted"):
                parent_tags["leadtune.promoted"] = run.data.tags["leadtune.promoted"]
                parent_tags["leadtune.promoted_trial"] = run.data.tags.get("leadtune.trial_id", "")
    return SearchData(
        search_dir, state, uri, trials, optuna_trials, importances, note, parent_tags=parent_tags
    )


def _optuna_facts(state: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, float], str]:
    """The study's trials and parameter importances; a note instead where there are none."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = state.get("optuna_storage")
    if not storage:
        return [], {}, "the search recorded no Optuna storage; no importances"
    try:
        study = optuna.load_study(study_name=state["study"], storage=storage)
    except Exception as exc:  # a missing database or study, in several exception types
        return [], {}, f"Optuna study {state['study']!r} not readable at {storage} ({exc})"
    rows = [
        {
            "number": t.number,
            "state": t.state.name.lower(),
            # the primary objective (the first of a multi-objective study's)
            "value": _finite(t.values[0]) if t.values else None,
            "params": dict(t.params),
        }
        for t in study.trials
    ]
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    if len(complete) < 2:
        return (
            rows,
            {},
            (
                f"parameter importances need at least 2 finished trials; this study has "
                f"{len(complete)}"
            ),
        )
    try:
        # fANOVA, asked for by name: Optuna's default evaluator changed to PED-ANOVA in 5.0.
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        importances = optuna.importance.get_param_importances(
            study,
            evaluator=evaluator,
            target=lambda t: t.values[0],  # the primary objective
        )
    except (RuntimeError, ValueError) as exc:
        return rows, {}, f"Optuna could not compute importances ({exc})"
    note = "fANOVA importances (optuna.importance.FanovaImportanceEvaluator, seed 0)"
    if len(complete) < FEW_TRIALS:
        note += (
            f"; only {len(complete)} finished trials, so treat them as a rough hint "
            "(conditional parameters count only in the trials that have them)"
        )
    if not importances:
        note = "Optuna found no parameter that varies across the finished trials"
    return rows, {k: float(v) for k, v in importances.items()}, note


# -- plots ---------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _study(data: SearchData) -> Any:
    """The search's Optuna study, or None where it cannot be read (moved or missing storage):
    the rest of the report still stands."""
    import optuna

    storage = data.state.get("optuna_storage")
    if not storage:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=data.state["study"], storage=storage)
    except Exception:  # a missing database or study, in several exception types
        return None


def _optuna_plot(data: SearchData, path: Path, draw: Any, size: tuple[float, float]) -> Path | None:
    """Save one of ``optuna.visualization.matplotlib``'s plots of the search's study. ``draw``
    gets the study and the target options (the primary objective, named, for a multi-objective
    study) and returns the Axes; a plot Optuna cannot draw (too few trials) is left out."""
    import warnings

    study = _study(data)
    if study is None or not any(t.state.name == "COMPLETE" for t in study.trials):
        return None
    options: dict[str, Any] = {"target_name": data.metric}
    if len(study.directions) > 1:
        options["target"] = lambda t: t.values[0]  # the primary objective
    plt = _pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        try:
            ax = draw(study, options)
        except (ValueError, RuntimeError):
            return None
    axes = ax if isinstance(ax, np.ndarray) else np.array([ax])
    fig = axes.flat[0].figure
    fig.set_size_inches(*size)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # Optuna puts some legends outside the axes
    plt.close(fig)
    return path


def plot_history(data: SearchData, path: Path) -> Path | None:
    """Objective value per Optuna trial and the best so far (Optuna's
    ``plot_optimization_history``)."""
    import optuna.visualization.matplotlib as ovm
    from matplotlib.ticker import MaxNLocator

    def draw(study: Any, options: dict[str, Any]) -> Any:
        ax = ovm.plot_optimization_history(study, **options)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are whole numbers
        return ax

    return _optuna_plot(data, path, draw, (7, 4))


def plot_importances(data: SearchData, path: Path) -> Path | None:
    """fANOVA importances (seed 0) as Optuna draws them (``plot_param_importances``)."""
    if not data.importances:
        return None
    import optuna
    import optuna.visualization.matplotlib as ovm

    def draw(study: Any, options: dict[str, Any]) -> Any:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return ovm.plot_param_importances(study, evaluator=evaluator, **options)

    return _optuna_plot(data, path, draw, (7, 0.4 * len(data.importances) + 2))


def plot_parallel(data: SearchData, path: Path) -> Path | None:
    """One line per finished trial across its parameters and the objective (Optuna's
    ``plot_parallel_coordinate``)."""
    import optuna.visualization.matplotlib as ovm

    names = {k for r in data.optuna_trials if r["value"] is not None for k in r["params"]}
    width = max(7.0, 1.2 * (len(names) + 1))
    return _optuna_plot(
        data, path, lambda st, o: ovm.plot_parallel_coordinate(st, **o), (width, 4.8)
    )


def plot_intermediate(data: SearchData, path: Path) -> Path | None:
    """Each trial's reported value per epoch, as ASHA saw it (Optuna's
    ``plot_intermediate_values``; single-objective studies only: Optuna keeps no intermediate
    values with several objectives)."""
    import optuna.visualization.matplotlib as ovm

    study = _study(data)
    if study is None or len(study.directions) > 1:
        return None
    if not any(t.intermediate_values for t in study.trials):
        return None
    return _optuna_plot(data, path, lambda st, o: ovm.plot_intermediate_values(st), (7, 4))


def plot_pareto(data: SearchData, path: Path) -> Path | None:
    """A multi-objective study's Pareto front, drawn by Optuna's own visualisation
    (``optuna.visualization.matplotlib.plot_pareto_front``; with three objectives or more, the
    primary against each further one in turn is what Optuna draws in 2-D: here the first two)."""
    import warnings

    import optuna

    study = _study(data) if data.state.get("objectives") else None
    if study is None:
        return None
    if len(study.directions) < 2 or not study.best_trials:
        return None
    plt = _pyplot()
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        if len(study.directions) == 2:
            ax = optuna.visualization.matplotlib.plot_pareto_front(study, target_names=names)
        else:
            ax = optuna.visualization.matplotlib.plot_pareto_front(
                study, targets=lambda t: (t.values[0], t.values[1]), target_names=names[:2]
            )
    fig = ax.figure
    fig.set_size_inches(7, 4.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _robust_limits(values: list[float]) -> tuple[float, float] | None:
    """y-limits that show the bulk of the curves: one diverged trial must not squash the rest."""
    finite = np.array([v for v in values if math.isfinite(v)])
    if finite.size < 4:
        return None
    low, high = np.percentile(finite, [2, 98])
    pad = 0.08 * (high - low or abs(high) or 1.0)
    return float(low - pad), float(high + pad)


def plot_learning_curves(data: SearchData, path: Path) -> Path | None:
    """The searched metric and the task's table metrics per epoch, one line per trial (labelled
    with its Optuna trial number and Tune id); y-limits on the 2nd-98th percentiles."""
    names = curve_metrics(data.state)
    if not any(t.curves.get(m) for t in data.trials for m in names):
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), dpi=100)
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        everything = []
        for trial in data.trials:
            curve = trial.curves.get(name) or []
            if curve:
                epochs, values = zip(*curve)
                everything += values
                ax.plot(epochs, values, "-o", markersize=3, label=_trial_label(trial))
        limits = _robust_limits(everything)
        if limits:
            ax.set_ylim(*limits)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.set_title(name)
    if len(data.trials) <= 12:
        axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _trial_label(trial: TrialRow) -> str:
    return f"#{trial.optuna_trial} {trial.trial_id}" if trial.optuna_trial else trial.trial_id


# -- writing -------------------------------------------------------------------------------------

HIDDEN_PARAMS = ("seed", "num_threads", "device", "amp")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)


def _short(value: str | None) -> str:
    """A parameter as logged (a string), with long floats cut to 4 significant digits."""
    if value is None:
        return "–"
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() or len(value) <= 8 else f"{number:.4g}"


def trials_table(data: SearchData) -> tuple[list[str], list[list[str]]]:
    """Header and rows: trial (Optuna number and Tune id), state, epochs, the best epoch and
    every metric at that epoch (the figures of the checkpoint promotion would use), duration,
    and the parameters that vary."""
    varied = sorted(
        {
            k
            for t in data.trials
            for k, v in t.params.items()
            if k not in HIDDEN_PARAMS and len({u.params.get(k) for u in data.trials}) > 1
        }
    )
    metric_columns = [m for m in curve_metrics(data.state) if m != data.metric]
    header = (
        ["optuna", "trial", "state", "epochs", "best epoch", data.metric]
        + metric_columns
        + ["seconds"]
        + varied
    )
    rows = []
    for t in data.trials:
        epochs = max((s for s, _ in t.curves.get(data.metric, [])), default=None)
        rows.append(
            [t.optuna_trial or "–", t.trial_id, t.state, _fmt(epochs), _fmt(t.best_epoch),
             _fmt(t.best_value)]
            + [_fmt(t.at_best_epoch(m)) for m in metric_columns]
            + [_fmt(t.seconds, 1)]
            + [_short(t.params.get(k)) for k in varied]
        )  # fmt: skip
    return header, rows


def _ui_link(data: SearchData, **page: Any) -> str:
    """A link to a page of the MLflow UI on this search's tracking store: the server itself
    where the search used one, else the address ``mlflow ui --backend-store-uri URI`` serves."""
    from leadtune.search.tracking import ui_url

    uri = data.tracking_uri
    base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return ui_url(base, **page)


def _ui_note(data: SearchData) -> list[str]:
    uri = data.tracking_uri
    if uri.startswith(("http://", "https://")):
        return []
    return [f"(MLflow links: open the UI first with `mlflow ui --backend-store-uri {uri}`.)", ""]


def _promotion_lines(data: SearchData) -> list[str]:
    """The champion decision recorded on the parent run by promotion, with the test figures of
    the promoted trial's run."""
    tags = data.parent_tags
    if not tags.get("leadtune.promoted"):
        return ["Not promoted (a search with --no-promote, or not finished): `leadtune promote`."]
    promoted = next(
        (t for t in data.trials if t.trial_id == tags.get("leadtune.promoted_trial")), None
    )
    tests = {
        k: v for k, v in (promoted.metrics if promoted else {}).items() if k.startswith("test_")
    }
    name, _, version = tags["leadtune.promoted"].partition("/")
    model_page = f"{name}/versions/{version}" if version else name
    run = promoted.run_id if promoted else None
    lines = [
        f"- registered: [`models:/{tags['leadtune.promoted']}`]({_ui_link(data, model=model_page)}) "
        f"(trial {tags.get('leadtune.promoted_trial')}, MLflow run "
        + (
            f"[`{run}`]({_ui_link(data, experiment_id=data.state['experiment_id'], run_id=run)})"
            if run
            else "`?`"
        )
        + ")",
        f"- champion alias: {tags.get('leadtune.champion_decision', '?')}",
        "- test (once): " + (", ".join(f"{k} {_fmt(v)}" for k, v in sorted(tests.items())) or "?"),
    ]
    if tags.get("leadtune.search_gain"):
        lines.append(f"- {tags['leadtune.search_gain']}")
    return lines


def _best_lines(data: SearchData) -> list[str]:
    best = data.best()
    if best is None:
        return ["No trial reported the search metric."]
    params = {k: v for k, v in best.params.items() if k not in HIDDEN_PARAMS}
    link = _ui_link(data, experiment_id=data.state["experiment_id"], run_id=best.run_id)
    return [
        *_ui_note(data),
        f"Trial **{best.trial_id}** (MLflow run [`{best.run_id}`]({link})): best {data.metric} "
        f"= {_fmt(best.best_value)} ({data.mode}imised), state {best.state}.",
        "",
        "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in sorted(params.items())),
    ]


def write_csv(data: SearchData, path: Path) -> Path:
    import csv

    header, rows = trials_table(data)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", *header])
        for trial, row in zip(data.trials, rows):
            writer.writerow([trial.run_id, *row])
    return path


# The report's plots in the order both formats show them.
PLOT_TITLES = {
    "importances": "Parameter importances",
    "history": "Optimisation history",
    "parallel": "Parallel coordinates",
    "intermediate": "Intermediate values (what ASHA compared)",
    "learning_curves": "Learning curves (validation, per epoch)",
    "pareto": "Pareto front",
}


def render_markdown(data: SearchData, plots: dict[str, str]) -> str:
    header, rows = trials_table(data)
    s = data.state
    states: dict[str, int] = {}
    for t in data.trials:
        states[t.state] = states.get(t.state, 0) + 1
    by_state = ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none"
    objective_lines: list[str] = []
    if s.get("objectives"):
        further = ", ".join(f"`{m}` ({mode})" for m, mode in s["objectives"])
        budgets = ", ".join(f"`{m}` {op} {v:g}" for m, op, v in s.get("budgets") or []) or "none"
        objective_lines = [
            "",
            "## Objectives",
            "",
            f"Multi-objective study: `{data.metric}` ({data.mode}), then {further}, each read at "
            "the trial's best epoch of the first. Pareto front (trials no other trial beats on "
            f"every objective): {', '.join(s.get('pareto_trials') or []) or 'none'}. Champion "
            f"rule: the best `{data.metric}` within the budgets ({budgets}).",
        ]
    lines = [
        f"# Search report: {s['study']}",
        "",
        f"- search folder: `{data.search_dir}`",
        f"- space `{s.get('space')}`, metric `{data.metric}` ({data.mode}), status "
        f"{s.get('status', '?')}",
        f"- trials: {len(data.trials)} in MLflow ({by_state}); "
        f"{len(data.optuna_trials)} in the Optuna study",
        f"- MLflow: `{data.tracking_uri}`, experiment {s['experiment_id']}, parent run "
        f"`{s['parent_run_id']}`",
        f"- data: `{s.get('data_source')}` (limit {s.get('data_limit')}), fingerprint "
        f"`{str(s.get('data_fingerprint'))[:16]}`",
        f"- written {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        "## Best trial",
        "",
        *_best_lines(data),
        "",
        "## Promotion",
        "",
        *_promotion_lines(data),
        "",
        "## Trials",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
        *objective_lines,
        "",
        "## Parameter importances",
        "",
        data.importance_note + ".",
    ]
    if data.importances:
        lines += ["", "| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in data.importances.items()]
    for key, title in PLOT_TITLES.items():
        if key in plots:
            if key != "importances":
                lines += ["", f"## {title}"]
            lines += ["", f"![{title}]({plots[key]})"]
    if data.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in data.notes]
    return "\n".join(lines) + "\n"


def render_html(data: SearchData, plots: dict[str, str]) -> str:
    """The same content as the Markdown, as one HTML page with the PNGs beside it."""
    esc = html.escape
    header, rows = trials_table(data)
    s = data.state
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Search report: {esc(s['study'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 6px;text-align:right}img{max-width:100%}</style></head><body>",
        f"<h1>Search report: {esc(s['study'])}</h1><ul>",
        f"<li>search folder: <code>{esc(str(data.search_dir))}</code></li>",
        f"<li>space <code>{esc(str(s.get('space')))}</code>, metric <code>{esc(data.metric)}"
        f"</code> ({esc(data.mode)}), status {esc(str(s.get('status', '?')))}</li>",
        f"<li>MLflow: <code>{esc(data.tracking_uri)}</code>, experiment "
        f"{esc(str(s['experiment_id']))}, parent run <code>{esc(s['parent_run_id'])}</code></li>",
        f"<li>data: <code>{esc(str(s.get('data_source')))}</code>, fingerprint "
        f"<code>{esc(str(s.get('data_fingerprint'))[:16])}</code></li></ul>",
        "<h2>Best trial</h2>",
    ]
    parts += [f"<p>{_markdown_inline(line)}</p>" for line in _best_lines(data) if line]
    parts.append("<h2>Promotion</h2>")
    parts += [f"<p>{_markdown_inline(line.lstrip('- '))}</p>" for line in _promotion_lines(data)]
    parts.append(
        "<h2>Trials</h2><div style='overflow-x:auto'><table><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in header)
    )
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>")
    parts.append("</table></div><h2>Parameter importances</h2>")
    parts.append(f"<p>{esc(data.importance_note)}.</p>")
    for key, title in PLOT_TITLES.items():
        if key in plots:
            if key != "importances":
                parts.append(f"<h2>{esc(title)}</h2>")
            # Embedded: the page renders wherever it is opened, MLflow's artifact view included.
            parts.append(f"<img src='{_data_uri(plots, key)}' alt='{esc(title)}'>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _markdown_inline(line: str) -> str:
    """A Markdown line with **bold**, [links](url) and `code` as HTML."""
    import re

    text = html.escape(line)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"\[(.+?)\]\((.+?)\)", r"<a href='\2'>\1</a>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _data_uri(plots: dict[str, str], key: str) -> str:
    import base64

    path = Path(plots[f"_path_{key}"])
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_report(
    data: SearchData, out_dir: Path, fmt: str = "md", log_to_mlflow: bool = True
) -> dict[str, Any]:
    """Write the report files; log them to the parent run. Returns {name: path, ...}."""
    if fmt not in ("md", "html"):
        raise ValueError(f"--format must be md or html, got {fmt!r}")
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    for key, draw in (
        ("importances", plot_importances),
        ("history", plot_history),
        ("parallel", plot_parallel),
        ("intermediate", plot_intermediate),
        ("learning_curves", plot_learning_curves),
        ("pareto", plot_pareto),
    ):
        written = draw(data, plot_dir / f"{key}.png")
        if written is not None:
            plots[key] = f"plots/{key}.png"
            plots[f"_path_{key}"] = str(written)
    report = out_dir / f"report.{fmt}"
    report.write_text(render_markdown(data, plots) if fmt == "md" else render_html(data, plots))
    # MLflow shows HTML artifacts in its UI: the attached copy always has the plots embedded.
    (out_dir / "report.html").write_text(render_html(data, plots))
    plots = {k: v for k, v in plots.items() if not k.startswith("_path_")}
    csv_path = write_csv(data, out_dir / "trials.csv")
    best = data.best()
    summary = {
        "study": data.state["study"],
        "search_dir": str(data.search_dir),
        "metric": data.metric,
        "mode": data.mode,
        "best_trial": best.trial_id if best else None,
        "best_value": best.best_value if best else None,
        "trials": [
            {
                "trial_id": t.trial_id,
                "run_id": t.run_id,
                "state": t.state,
                "best_value": t.best_value,
                "seconds": t.seconds,
                "params": t.params,
                "metrics": t.metrics,
                "curves": {k: [list(p) for p in v] for k, v in t.curves.items()},
            }
            for t in data.trials
        ],
        "importances": data.importances,
        "importance_note": data.importance_note,
        "plots": plots,
    }
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    files = {"report": str(report), "csv": str(csv_path), "json": str(out_dir / "report.json")}
    files.update({k: str(out_dir / v) for k, v in plots.items()})
    if log_to_mlflow:
        files["mlflow"] = _log_to_parent(data, out_dir)
    return files


def _log_to_parent(data: SearchData, out_dir: Path) -> str:
    """Attach the report to the search's parent run (artifact folder ``report/``)."""
    import shutil

    from leadtune.analysis.model_source import proxied_local_path
    from leadtune.search.tracking import mlflow_client

    client = mlflow_client(data.tracking_uri)
    run_id = data.state["parent_run_id"]
    run = client.get_run(run_id)
    artifact_uri = run.info.artifact_uri or ""
    local = proxied_local_path(artifact_uri, data.tracking_uri)
    if local is not None:
        # The search ran its own server with proxied artifacts: write straight into its store.
        shutil.copytree(out_dir, local / "report", dirs_exist_ok=True)
        return f"{artifact_uri}/report"
    client.log_artifacts(run_id, str(out_dir), artifact_path="report")
    return f"{artifact_uri}/report"

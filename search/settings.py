"""The settings of a search: one dataclass is the single source of its defaults, its command-line
flags and their help, and the checks that run before anything starts.

:func:`add_search_arguments` builds ``leadtune search``'s flags from :class:`SearchSettings`;
:func:`preflight` checks everything that can be checked without Ray (values, the space with the
fixed settings, the storage folder, the Optuna storage and the MLflow tracking URI), so a mistake
costs a one-line error, not a started search.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leadtune.spaces.registry import DEFAULT_SPACE, FIDELITIES, SCHEDULERS
from leadtune.trainables.runtime import check_writable
from leadtune.trainables.tasks import DataRequest


def _option(default: Any, help: str, flag: str | None = None, **argparse_kwargs: Any):
    return field(default=default, metadata={"help": help, "flag": flag, **argparse_kwargs})


@dataclass
class SearchSettings:
    space: str = _option(DEFAULT_SPACE, "search space name (`leadtune search --list-spaces`)")
    study: str | None = _option(None, "study name (default: the space's name)")
    trials: int = _option(20, "number of trials")
    epochs: int | None = _option(None, "epochs per trial (default: the space's, else the task's)")
    max_concurrent: int = _option(1, "trials running at once")
    cpus_per_trial: float = _option(1.0, "CPU cores per trial (also its torch threads)")
    gpus_per_trial: float = _option(0.0, "GPUs per trial; fractions share a GPU, e.g. 0.25")
    scheduler: str | None = _option(None, "asha stops weak trials early (hyperband: 3 brackets; "
                             "median: the median stopping rule); fifo runs all to the end "
                             "(default: the space's, else asha)",
                             choices=SCHEDULERS)  # fmt: skip
    fidelity: str | None = _option(None, "unit trials are compared in: schedule (percent of "
                            "the trial's own epochs) or epoch (default: the space's, else "
                            "schedule)", choices=FIDELITIES)  # fmt: skip
    grace_period: float | None = _option(None, "first point a trial may be stopped at, in the "
                                 "fidelity unit (default: the space's, else a quarter of the "
                                 "schedule)")  # fmt: skip
    reduction_factor: int | None = _option(None, "keep 1 in this many trials at each later "
                                    "point (default: the space's, else 2)")  # fmt: skip
    max_failures: int = _option(1, "retries of a crashed trial, from its last checkpoint")
    time_budget_s: float | None = _option(
        None, "seconds after which running trials are stopped and no new ones start",
        flag="--time-budget",
    )  # fmt: skip
    address: str | None = _option(None, "Ray address; 'auto' joins a running cluster")
    storage_path: str = _option(
        "runs/search", "folder for results, checkpoints and the default databases"
    )
    tracking_uri: str | None = _option(
        None, "MLflow server (http://host:5000) or database URI (default: the SQLite database "
        "mlflow.db under --storage-path, written directly by the search)",
    )  # fmt: skip
    mlflow_server: bool = _option(
        False, "without --tracking-uri: start a local MLflow server on that SQLite database for "
        "the search's lifetime and log through it (costs a process; the default writes the "
        "database directly)", action="store_true",
    )  # fmt: skip
    optuna_storage: str | None = _option(
        None, "SQLAlchemy URL of the Optuna study (default: sqlite under --storage-path)"
    )
    seed: int = _option(0, "seed of the sampler and of every trial's training")
    metric: str | None = _option(None, "validation metric to optimise (default: the space's)")
    mode: str | None = _option(None, "min or max (default: the space's)", choices=("min", "max"))
    objective: list[str] | None = _option(
        None, "a further objective, METRIC:min or METRIC:max (repeat for more; e.g. params:min "
        "or infer_ms_per_ecg:min): a multi-objective study with a Pareto front (default: the "
        "space's)", action="append", metavar="METRIC:MODE",
    )  # fmt: skip
    within: list[str] | None = _option(
        None, "a budget the champion must meet, METRIC<=VALUE or METRIC>=VALUE (repeat for "
        "more); the champion is the best --metric among the trials within all of them "
        "(default: none)", action="append", metavar="BUDGET",
    )  # fmt: skip
    keep_checkpoints: int = _option(2, "best checkpoints kept per trial")
    resume: bool = _option(
        False, "finish the study's newest interrupted search", action="store_true"
    )
    experiment: str | None = _option(
        None, "with --resume: the search folder to finish (default: the newest unfinished)"
    )
    warm_start: str | None = _option(
        None, "start from another study in the same Optuna storage: its best trials are copied "
        "in (same data and fixed settings) or queued to run again", metavar="STUDY",
    )  # fmt: skip
    warm_start_trials: int = _option(3, "with --warm-start: how many of its best trials")
    register_name: str | None = _option(None, "registered model name (default: the task's)")
    promote: bool = _option(
        True, "skip the test evaluation and registration", flag="--no-promote",
        action="store_false",
    )  # fmt: skip
    system_metrics: bool = _option(
        False, "log CPU, memory and GPU use to the search's parent run every 10 s (MLflow "
        "system metrics)", action="store_true",
    )  # fmt: skip
    overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "fix a training setting for every trial, e.g. --set leads=precordial",
                  "flag": "--set", "action": "append", "metavar": "KEY=VALUE"},
    )  # fmt: skip
    data: DataRequest = field(default_factory=lambda: DataRequest(source=Path(".")))

    def validate(self) -> None:
        """The checks on values alone (no files, no network)."""
        if self.trials < 1:
            raise ValueError(f"--trials must be at least 1, got {self.trials}")
        if self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be at least 1, got {self.max_concurrent}")
        if self.cpus_per_trial <= 0:
            raise ValueError("--cpus-per-trial must be positive")
        if self.gpus_per_trial < 0 or (self.gpus_per_trial > 1 and self.gpus_per_trial % 1):
            raise ValueError("--gpus-per-trial must be a fraction in (0, 1] or a whole number")
        if self.scheduler not in (None, *SCHEDULERS):
            raise ValueError(
                f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )
        if self.grace_period is not None and self.grace_period <= 0:
            raise ValueError("--grace-period must be positive")
        if self.reduction_factor is not None and self.reduction_factor < 2:
            raise ValueError("--reduction-factor must be at least 2")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("--epochs must be at least 1")
        if self.max_failures < 0:
            raise ValueError("--max-failures must be 0 or more")
        if self.keep_checkpoints < 1:
            raise ValueError("--keep-checkpoints must be at least 1")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError("--time-budget must be a positive number of seconds")
        if "://" in self.storage_path:
            raise ValueError(
                f"--storage-path {self.storage_path} is a URI; use a folder on a shared "
                "filesystem (NFS/EFS) mounted on every node"
            )
        if self.mode not in (None, "min", "max"):
            raise ValueError(f"--mode must be min or max, got {self.mode!r}")
        if self.warm_start_trials < 1:
            raise ValueError("--warm-start-trials must be at least 1")
        if self.warm_start and self.resume:
            raise ValueError("--warm-start starts a new study; a resumed search keeps its own")
        from leadtune.search.objectives import parse_objective, parse_within

        for text in self.objective or []:
            parse_objective(text)
        for text in self.within or []:
            parse_within(text)
        if self.resume and self.objective:
            raise ValueError("--objective is the study's; a resumed search keeps its own")
        if self.experiment and not self.resume:
            raise ValueError("--experiment names the search to finish: use it with --resume")


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`SearchSettings` field, with its default in the help."""
    for spec in dataclasses.fields(SearchSettings):
        if spec.name == "data":
            continue
        meta = dict(spec.metadata)
        flag = meta.pop("flag", None) or "--" + spec.name.replace("_", "-")
        help_text = meta.pop("help")
        default = spec.default if spec.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {"dest": spec.name, **meta}
        if meta.get("action") in ("store_true", "store_false"):
            kwargs["default"] = default
        elif meta.get("action") == "append":
            kwargs["default"] = None
        else:
            kwargs["default"] = default
            kwargs["type"] = _flag_type(str(spec.type))
            if default is not None:
                help_text += f" (default: {default})"
        parser.add_argument(flag, help=help_text, **kwargs)


def _flag_type(annotation: str):
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str


def parse_overrides(values: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs; values are JSON where they parse as JSON, else strings."""
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def settings_from_args(args: argparse.Namespace) -> SearchSettings:
    values = {
        spec.name: getattr(args, spec.name)
        for spec in dataclasses.fields(SearchSettings)
        if spec.name not in ("data", "overrides")
    }
    return SearchSettings(
        **values,
        overrides=parse_overrides(args.overrides),
        data=DataRequest(source=Path(args.source), cache_dir=args.cache_dir, limit=args.limit),
    )


# -- checks before anything starts ---------------------------------------------------------------


def check_optuna_storage(url: str) -> None:
    """A parseable SQLAlchemy URL whose database answers (SQLite: its folder exists)."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise ValueError(
            f"--optuna-storage {url!r} is not a database URL; use e.g. "
            "sqlite:////abs/path/optuna.db or postgresql://user:pw@host/optuna"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not Path(database).parent.is_dir():
            raise ValueError(
                f"--optuna-storage {url}: folder {Path(database).parent} does not exist"
            )
        return
    from leadtune.search.tracking import check_database_driver

    check_database_driver(parsed, "--optuna-storage")
    try:
        engine = sqlalchemy.create_engine(url, connect_args=_connect_timeout(parsed))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ValueError(
            f"--optuna-storage {parsed.render_as_string(hide_password=True)} does not answer "
            f"({reason}); start the database or fix the URL"
        ) from None


def _connect_timeout(parsed: Any) -> dict[str, Any]:
    backend = parsed.get_backend_name()
    if backend.startswith("postgres"):
        return {"connect_timeout": 10}
    if backend.startswith("mysql"):
        return {"connect_timeout": 10}
    return {}


def check_storage_and_urls(settings: SearchSettings, root: Path, optuna_storage: str) -> None:
    """The folders and services the search needs, each checked once, up front."""
    from leadtune.search.tracking import check_tracking_uri

    check_writable(root, "--storage-path")
    if settings.optuna_storage:  # the default lives under --storage-path, checked just above
        check_optuna_storage(optuna_storage)
    if settings.tracking_uri:
        check_tracking_uri(settings.tracking_uri, "--tracking-uri")

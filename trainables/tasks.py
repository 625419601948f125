"""Tasks by name: everything the rest of leadtune needs to know about one kind of model.

A task (lead identification, ...) is a package under ``trainables/`` whose ``spec`` module
registers a :class:`TaskSpec`. ``search`` and the delivery commands (``evaluate``, ``export``,
``promote``) know no task: they ask the spec for the training function, the data, the model, the
registered name, the columns of the trial table and the metrics of the summary. Checkpoints,
MLflow runs and registry versions record the task's name, so every command finds the spec again.

This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The packages whose spec modules register the built-in tasks.
BUILTIN_TASKS = ("leadtune.trainables.lead_id.spec", "leadtune.trainables.diagnosis.spec")
DEFAULT_TASK = "lead_id"
# More task modules to import, comma-separated (a user's own tasks). Trial workers inherit the
# variable, so they find the same tasks as the command that started the search.
TASKS_ENV = "LEADTUNE_TASKS"


@dataclass(frozen=True)
class DataRequest:
    """Which dataset a search or evaluation uses (the CLI's data flags)."""

    source: Path
    cache_dir: str | None = None
    limit: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class Column:
    """A metric shown in the trial table, the summary and the report: key and short label."""

    key: str
    label: str


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    # The run's settings: a dataclass with from_dict (unknown keys are errors), to_dict,
    # validate; its defaults reproduce the task's reference.
    config_class: type
    # (config dict, data, reporter=None, progress=False) -> last metrics; reports every epoch
    # through the reporter (Tune's in a trial) and shows a progress bar with ``progress``.
    train: Callable[..., dict[str, Any]]
    # DataRequest -> (what every trial gets through the object store, the prepared dataset).
    load_data: Callable[[DataRequest], tuple[Any, Any]]
    # (checkpoint folder, prepared dataset, split) -> metrics on that split, keys "<split>_...".
    evaluate: Callable[[Path, Any, str], dict[str, Any]]
    # config object -> torch module (untrained); weights come from a checkpoint or registry.
    build_model: Callable[[Any], Any]
    # (config object, sampling rate) -> a float32 input example for signatures and exports.
    example_input: Callable[[Any, int], Any]
    # The registered model's default name (``leadtune search --register-name`` overrides it).
    register_name: str
    # The validation metrics of the trial table (after the searched metric), and the test
    # metrics the summary reports after promotion.
    table_metrics: tuple[Column, ...] = ()
    test_metrics: tuple[Column, ...] = ()
    # Config fields shown in the trial table (those every trial of the task's spaces has).
    table_params: tuple[str, ...] = ()
    # The validation metric that picks a run's best epoch (spaces may search on another).
    metric: str = "val_loss"
    mode: str = "min"
    # Whether a model takes any number of leads K (lead identification) or exactly the leads of
    # its config (a diagnosis network's input channels): exports make the lead axis dynamic.
    variable_leads: bool = True
    # ``leadtune models``: (feature width D) -> one row per model part with keys kind, name,
    # parameters, published_parameters (None when unpublished), description; the note says
    # where the published counts come from. Tasks whose networks have no width knob ignore D.
    # Every validation metric an epoch reports beyond the table's (what --metric may name).
    val_metrics: tuple[str, ...] = ()
    # DataRequest -> None, raising a one-line ValueError when the source cannot be this task's
    # data (missing folder or tables); cheap, run before any search starts.
    check_data: Callable[[DataRequest], None] | None = None
    # (checkpoint A, checkpoint B, dataset, split) -> both models' test figure and a paired test
    # of their difference on the same records (promotion's search gain); None: not compared
    paired_test: Callable[[Path, Path, Any, str], dict[str, Any]] | None = None
    # (model, config, fs, signals (B, K, T) float32 mV, preprocessed) -> the task's outputs as
    # a float32 array, and what they are (the MLflow pyfunc model's predict; None: model(x))
    predict: Callable[[Any, Any, int, Any], Any] | None = None
    predict_output: str = "the model's outputs"
    # ``leadtune export``'s model card: what the exported network's raw outputs are, and how its
    # input is scaled before it (the network itself may standardise).
    export_output: str = "the network's raw outputs"
    input_scaling: str = "none"
    describe_models: Callable[[int], list[dict[str, Any]]] | None = None
    models_note: str = ""
    models_use_d_model: bool = False

    def config_from_dict(self, values: dict[str, Any]) -> Any:
        return self.config_class.from_dict(values)

    @property
    def searchable_metrics(self) -> list[str]:
        """The validation metrics every epoch reports, any of which a search may optimise."""
        names = [self.metric, "val_loss", *(c.key for c in self.table_metrics), *self.val_metrics]
        return list(dict.fromkeys(names))


def prepare_ptbxl(request: DataRequest) -> Any:
    """The prepared (cached) PTB-XL dataset a request names, for a task's ``load_data``."""
    from leadtune.trainables.data.cache import prepare_dataset

    return prepare_dataset(
        Path(request.source),
        cache_root=request.cache_dir,
        limit=request.limit,
        progress=request.progress,
    )


def ptbxl_loader(data_class: Any) -> Callable[[DataRequest], tuple[Any, Any]]:
    """A task's ``load_data`` for PTB-XL: the prepared dataset, and what its trials hold in
    memory (``data_class.from_prepared(dataset)``; torch-free, the driver builds it)."""

    def load_data(request: DataRequest) -> tuple[Any, Any]:
        dataset = prepare_ptbxl(request)
        return data_class.from_prepared(dataset), dataset

    return load_data


def deferred(load: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
    """A function whose implementation ``load()`` imports on first call: a task's spec names
    its training module's functions without importing torch."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return load()(*args, **kwargs)

    return call


def ptbxl_source_check(request: DataRequest) -> None:
    """``check_data`` of a task that reads a PTB-XL folder (both built-in tasks): the folder
    and its tables exist (imported on use: the reader pulls in wfdb and pandas)."""
    from leadtune.trainables.data.ptbxl import check_source

    check_source(request)


def checked_settings(config_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """A config's ``from_dict`` guard: unknown keys are an error naming them and the known
    ones, never silently ignored (a typo in ``--set`` or a YAML file must not vanish), and a
    value of the wrong kind (``lr: abc``, ``epochs: 2.5``) is an error naming the setting.
    Numbers written as text (YAML reads ``1e-3`` as a string) are converted."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    checked = {}
    for name, value in values.items():
        annotation = str(fields[name].type)
        value = _from_text(annotation, value)
        problem = _kind_problem(annotation, value)
        if problem:
            raise ValueError(f"setting {name} must be {problem}, got {value!r}")
        checked[name] = value
    return checked


def check_at_least_one(config: Any, names: tuple[str, ...]) -> None:
    """Optional whole-number settings (record caps, threads, patience): None or >= 1."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (or unset), got {value}")


def _from_text(annotation: str, value: Any) -> Any:
    kinds = {part.strip() for part in annotation.split("|")}
    if not isinstance(value, str) or not kinds & {"int", "float"}:
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if "float" not in kinds and number.is_integer() else number


def _kind_problem(annotation: str, value: Any) -> str | None:
    """What kind ``value`` should be for a field annotated ``annotation``, if it is not."""
    if value is None:
        return None if "None" in annotation else "given (not None)"
    kinds = {part.strip() for part in annotation.split("|")}
    if "bool" in kinds:
        return None if isinstance(value, bool) else "true or false"
    if kinds & {"float"}:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "a number"
    if kinds & {"int"}:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "a whole number"
    if kinds == {"str"}:
        return None if isinstance(value, str) else "a string"
    return None  # tuples of lead names and other composite settings check themselves


TASKS: dict[str, TaskSpec] = {}


def register_once(table: dict[str, Any], name: str, item: Any, what: str) -> Any:
    """Add ``item`` under ``name``; another item under the same name is an error (the same one
    again is not: a module imported twice registers twice)."""
    if name in table and table[name] is not item:
        raise ValueError(f"{what} {name!r} is already registered")
    table[name] = item
    return item


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task under its name (a second task of the same name is an error)."""
    return register_once(TASKS, spec.name, spec, "a task named")


def load_builtin_tasks() -> None:
    extra = [m.strip() for m in os.environ.get(TASKS_ENV, "").split(",") if m.strip()]
    for module in (*BUILTIN_TASKS, *extra):
        importlib.import_module(module)


def get_task(name: str | None) -> TaskSpec:
    """The spec of a task by name (None: the default, lead identification)."""
    load_builtin_tasks()
    name = name or DEFAULT_TASK
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None


def task_names() -> list[str]:
    load_builtin_tasks()
    return sorted(TASKS)


def build_trained(spec: TaskSpec, config_values: dict[str, Any], weights: dict) -> tuple[Any, Any]:
    """(model in eval mode, config object): the task's model built from a recorded config with
    its trained weights. Raises what the config check or ``load_state_dict`` raises."""
    import torch

    config = spec.config_from_dict(config_values)  # sizes within the task's bounds
    # The model's tensors, counted on the meta device (no memory) before it is built for real:
    # a config whose model does not match the weights is refused before any allocation.
    try:
        with torch.device("meta"):
            meta = spec.build_model(config).state_dict()
        shapes = {k: tuple(v.shape) for k, v in meta.items()}
    except (NotImplementedError, RuntimeError):  # a builder that needs real values: no check
        shapes = None
    given = {k: tuple(v.shape) for k, v in weights.items() if hasattr(v, "shape")}
    if shapes is not None and shapes != given:
        wanted = sum(math.prod(s) for s in shapes.values())
        held = sum(math.prod(s) for s in given.values())
        differ = sorted(set(shapes) ^ set(given)) or [k for k in shapes if shapes[k] != given[k]]
        raise ValueError(
            f"the config describes a model of {wanted:,} values in {len(shapes)} tensors, the "
            f"weights hold {held:,} in {len(given)} (first difference: {differ[0]})"
        )
    model = spec.build_model(config)
    model.load_state_dict(weights)
    return model.eval(), config


def load_trained_model(path: str | Path, map_location: str = "cpu") -> tuple[Any, Any, dict]:
    """(model in eval mode, config object, checkpoint dict) from a checkpoint folder or file,
    for whichever task wrote it. Loads tensors and plain data only (see ``training``)."""
    from leadtune.trainables.training import CheckpointError, load_checkpoint

    state = load_checkpoint(path, map_location=map_location)
    spec = get_task(state.get("task"))
    try:
        model, config = build_trained(spec, state["config"], state["model"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        message = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"{path}: a {spec.name} checkpoint that does not match its recorded config ({message})"
        ) from None
    return model, config, state

"""`leadtune train`: one training run of a task, without a search.

Settings come from the task's config dataclass (``--task``, default ``lead_id``): its defaults
reproduce the task's reference; a YAML file and then command-line flags override them, in that
order. One flag per config field, generated from the dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default once: appended as "(default: X)" unless the help
    already says it, and left out where there is none (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


def default_source() -> str:
    """The bundled PTB-XL sample (``leadtune.bundled``), in a checkout or an installed wheel."""
    from leadtune.bundled import sample_dir

    return str(sample_dir())


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)

    return parse


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_kind(name: str, default: Any, annotation: str) -> tuple[Any, str | None]:
    """(argparse type, help prefix) of one config field, from its default and annotation."""
    if name in ("leads", "loss_leads"):
        return str, "comma-separated lead names, or a named set (all, precordial, limb, ...)"
    if isinstance(default, bool):
        return _parse_bool, "true or false"
    optional = "None" in annotation
    if isinstance(default, int) or "int" in annotation:
        return (_parse_optional(int) if optional else int), None
    if isinstance(default, float) or "float" in annotation:
        return (_parse_optional(float) if optional else float), None
    return str, None


def _shown(name: str, default: Any) -> str:
    if isinstance(default, tuple):
        return ",".join(default) if default else "none"
    if default is None:
        return "all seen leads" if name in ("leads", "loss_leads") else "none"
    return str(default)


def field_comments(config_class: type) -> dict[str, str]:
    """Each field's trailing comment in the config class's source, used as its flag's help (the
    dataclass stays the one place a setting is described)."""
    import inspect
    import re

    try:
        source = inspect.getsource(config_class)
    except (OSError, TypeError):
        return {}
    found = {}
    for line in source.splitlines():
        match = re.match(r"\s+(\w+):[^#]*=[^#]*#\s*(.+)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field of every task (``--d-model``, ``--lr`` ...), grouped by the
    first task that has it (the default task first), with each task's default where they
    differ (``--lr``: lead_id 0.0007, diagnosis 0.01). Unset flags leave the task's default."""
    from leadtune.trainables.tasks import DEFAULT_TASK, get_task, task_names

    tasks = sorted(task_names(), key=lambda name: name != DEFAULT_TASK)
    owners: dict[str, list[tuple[str, Any]]] = {}
    fields: dict[str, list[dataclasses.Field]] = {task: [] for task in tasks}
    comments: dict[str, list[tuple[str, str]]] = {}
    for task in tasks:
        config_class = get_task(task).config_class
        defaults = config_class()
        for name, comment in field_comments(config_class).items():
            comments.setdefault(name, []).append((task, comment))
        for field in dataclasses.fields(config_class):
            if field.name not in owners:
                fields[task].append(field)
            owners.setdefault(field.name, []).append((task, getattr(defaults, field.name)))
    for task in tasks:
        group = parser.add_argument_group(
            f"{task} settings (defaults reproduce the task's reference)"
        )
        for field in fields[task]:
            per_task = owners[field.name]
            kind, help_text = _flag_kind(field.name, per_task[0][1], str(field.type))
            said = comments.get(field.name, [])
            if len(per_task) == 1 or len({c for _, c in said}) == 1:
                described = said[0][1] if said else None
            else:
                described = "; ".join(f"{task}: {comment}" for task, comment in said)
            help_text = "; ".join(t for t in (described, help_text) if t)
            if len({_shown(field.name, default) for _, default in per_task}) == 1:
                shown = _shown(field.name, per_task[0][1])  # the same for every task
            else:
                shown = ", ".join(
                    f"{_shown(field.name, default)} for {name}" for name, default in per_task
                )
            group.add_argument(
                "--" + field.name.replace("_", "-"),
                dest=f"cfg_{field.name}",
                type=kind,
                default=None,
                metavar=field.name.upper(),
                help=f"{help_text + ' ' if help_text else ''}(default: {shown})",
            )


def config_from_args(args: argparse.Namespace, task: str | None = None) -> dict[str, Any]:
    """Defaults < YAML file (--config) < command-line flags, as a flat dict. A flag of another
    task's setting is an error that says whose it is."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(_read_config_file(Path(args.config)))
    given = {key[4:]: value for key, value in vars(args).items()
             if key.startswith("cfg_") and value is not None}  # fmt: skip
    if task is not None and given:
        from leadtune.trainables.tasks import get_task, task_names

        own = {f.name for f in dataclasses.fields(get_task(task).config_class)}
        for name in given:
            if name not in own:
                owners = [t for t in task_names()
                          if name in {f.name for f in dataclasses.fields(get_task(t).config_class)}]  # fmt: skip
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{flag} is a setting of the {' and '.join(owners)} task, not of {task}; "
                    f"drop it or pass --task {owners[0]}"
                )
    values.update(given)
    return values


def _read_config_file(path: Path) -> dict[str, Any]:
    """A YAML file of settings: flat, or all under one ``train:`` key."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file; pass a YAML file of settings")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise ValueError(f"--config {path}: not a readable YAML file ({reason})") from None
    if isinstance(loaded, dict) and "train" in loaded:
        beside = sorted(set(loaded) - {"train"})
        if beside:
            raise ValueError(
                f"--config {path}: top-level key(s) {', '.join(map(str, beside))} beside 'train:'; "
                "put every setting under train: (or all of them at the top level)"
            )
        loaded = loaded["train"] or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of setting: value")
    return loaded


def _parsed(text: str, convert: Any, kind: str) -> Any:
    """``convert(text)``, or argparse's one-line error naming the ``kind`` expected."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = _parsed(text, float, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    value = _parsed(text, float, "a number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = _parsed(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--source",
        default=default_source(),
        help="PTB-XL folder in PhysioNet layout (default: the bundled sample)",
    )
    group.add_argument(
        "--cache-dir", default=None, help="dataset cache root (default: ~/.cache/leadtune)"
    )
    group.add_argument(
        "--limit", type=positive_int, default=None,
        help="use only the first N records (default: all)",
    )  # fmt: skip


def data_request(args: argparse.Namespace, progress: bool = True):
    from leadtune.trainables.tasks import DataRequest

    return DataRequest(
        source=Path(args.source), cache_dir=args.cache_dir, limit=args.limit, progress=progress
    )


def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from leadtune.trainables.model_package import is_package
    from leadtune.trainables.runtime import check_writable
    from leadtune.trainables.tasks import get_task
    from leadtune.trainables.training import LocalReporter, checkpoint_file

    spec = get_task(args.task)
    config = spec.config_from_dict(config_from_args(args, spec.name))  # fails before any work
    out = Path(args.out)
    check_writable(out, "--out")
    resume = Path(args.resume) if args.resume else None
    if resume is not None:
        checkpoint_file(resume)  # one line if it is not a checkpoint
    if getattr(config, "init_from", None) and not is_package(config.init_from):
        checkpoint_file(Path(config.init_from))  # a checkpoint folder, or a model package
    data, _ = spec.load_data(data_request(args))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    print(f"training {spec.name}: {describe_config(config)} from {args.source}", file=sys.stderr)

    bar = tqdm(  # a bar on a terminal; in a log file the JSON line per epoch below is the record
        total=config.epochs, desc="epochs", unit="epoch", file=sys.stderr,
        disable=not sys.stderr.isatty(),
    )  # fmt: skip
    if resume is not None:
        bar.update(_checkpoint_epoch(resume))
    shown = [("train_loss", "loss"), ("val_loss", "val_loss")] + [
        (column.key, column.label) for column in spec.table_metrics
    ]

    def on_report(m: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix({label: f"{m[key]:.4f}" for key, label in shown if key in m})
        tqdm.write(json.dumps({k: _round(v) for k, v in m.items()}), file=sys.stderr)

    reporter = LocalReporter(out_dir=out, resume_from=resume, on_report=on_report)
    started = time.perf_counter()
    last = spec.train(config.to_dict(), data, reporter=reporter, progress=True)
    bar.close()
    (out / "history.json").write_text(json.dumps(reporter.history, indent=2))
    pick = min if spec.mode == "min" else max
    best = pick(reporter.history, key=lambda m: m[spec.metric]) if reporter.history else last
    figures = ", ".join(f"{label} {last[key]:.4f}" for key, label in shown if key in last)
    print(
        "\n".join(
            [
                "",
                f"finished {len(reporter.history)} epoch(s) in {time.perf_counter() - started:.1f} s",
                f"last epoch: {figures}",
                f"best epoch by {spec.metric}: {best['epoch']} ({best.get('checkpoint_dir', out)})",
                f"data fingerprint: {data.fingerprint}",
                f"outputs: {out}/ (config.json, history.json, epoch_NNN/checkpoint.pt)",
                f"evaluate once on the test fold: leadtune evaluate {best.get('checkpoint_dir', out)}"
                f" --source {args.source}",
            ]
        )
    )
    return 0


def describe_config(config: Any) -> str:
    """A one-line description of what is trained (the model and the data limits)."""
    fields = ("encoder", "context", "model", "d_model", "leads", "epochs", "batch_size", "lr")
    parts = []
    for name in fields:
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(value) if len(value) < 12 else "12 leads"
        parts.append(f"{name}={value}")
    return " ".join(parts)


def _round(value: Any) -> Any:
    return round(value, 5) if isinstance(value, float) else value


def _checkpoint_epoch(path: Path) -> int:
    metrics_file = Path(path) / "metrics.json"
    return json.loads(metrics_file.read_text())["epoch"] if metrics_file.exists() else 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from leadtune.trainables.tasks import DEFAULT_TASK, task_names

    train = subparsers.add_parser(
        "train",
        help="train one model of a task (no search)",
        description="Train one model. Settings: the task's defaults (its reference), then "
        "--config YAML, then flags.",
        formatter_class=DefaultsHelpFormatter,
    )
    train.add_argument(
        "--task",
        default=DEFAULT_TASK,
        choices=task_names(),
        help=f"what to train (default: {DEFAULT_TASK})",
    )
    train.add_argument("--config", help="YAML file of training settings (flat, or under 'train:')")
    train.add_argument(
        "--out",
        default="runs/train",
        help="folder for checkpoints and history (default: runs/train)",
    )
    train.add_argument(
        "--resume", default=None, help="checkpoint folder (epoch_NNN) to continue from"
    )
    add_data_arguments(train)
    add_config_arguments(train)
    train.set_defaults(func=run_train)

"""`leadtune train` (one run, no search) and `leadtune bench` (speed figures).

Training settings come from :class:`trainables.lead_id.LeadIdConfig`: its defaults reproduce
the reference; a YAML file and then command-line flags override them, in that order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_SAMPLE = REPO_ROOT / "data" / "ptbxl-sample"


def default_source() -> str:
    return str(BUNDLED_SAMPLE)


def _config_fields():
    from trainables.lead_id_config import LeadIdConfig

    hints = typing.get_type_hints(LeadIdConfig)
    return LeadIdConfig, [(f, hints[f.name]) for f in dataclasses.fields(LeadIdConfig)]


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


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per LeadIdConfig field (``--d-model``, ``--lr`` ...), defaults shown in --help."""
    from trainables.lead_id_config import LeadIdConfig

    defaults = LeadIdConfig()
    group = parser.add_argument_group("training settings (defaults reproduce the reference)")
    for field in dataclasses.fields(LeadIdConfig):
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if field.name in ("leads", "loss_leads"):
            kind, shown = str, ",".join(default) if default else "all seen leads"
            help_text = "comma-separated lead names, or all / precordial / limb"
        elif isinstance(default, bool):
            kind, shown, help_text = _parse_bool, default, "true or false"
        elif isinstance(default, int) or field.name.startswith("max_"):
            kind, shown, help_text = _parse_optional(int), default, None
        elif isinstance(default, float):
            kind, shown, help_text = float, default, None
        elif field.name.endswith("patience") or field.name == "num_threads":
            kind, shown, help_text = _parse_optional(int), default, None
        else:
            kind, shown, help_text = str, default, None
        group.add_argument(
            flag,
            dest=f"cfg_{field.name}",
            type=kind,
            default=None,
            metavar=field.name.upper(),
            help=f"{help_text + '; ' if help_text else ''}default: {shown}",
        )


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < YAML file (--config) < command-line flags, as a flat dict."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of setting: value at the top level")
        values.update(loaded.get("train", loaded))
    for key, value in vars(args).items():
        if key.startswith("cfg_") and value is not None:
            values[key[4:]] = value
    return values


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
    group.add_argument("--limit", type=int, default=None, help="use only the first N records")


def load_lead_id_data(args: argparse.Namespace, progress: bool = True):
    """Prepare (or load from cache) the dataset named by --source, as LeadIdData."""
    from trainables.data.cache import prepare_dataset
    from trainables.lead_id import LeadIdData

    dataset = prepare_dataset(
        Path(args.source), cache_root=args.cache_dir, limit=args.limit, progress=progress
    )
    return LeadIdData.from_prepared(dataset), dataset


def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from trainables.lead_id import LeadIdConfig, LocalReporter, train_lead_id

    values = config_from_args(args)
    config = LeadIdConfig.from_dict(values)
    data, dataset = load_lead_id_data(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    print(
        f"training {config.encoder}+{config.context} (D={config.d_model}) on "
        f"{min(len(data.train), config.max_train_records or len(data.train))} train / "
        f"{min(len(data.val), config.max_val_records or len(data.val))} val ECGs from {args.source}",
        file=sys.stderr,
    )

    bar = tqdm(total=config.epochs, desc="epochs", unit="epoch", file=sys.stderr)
    resume = Path(args.resume) if args.resume else None
    if resume is not None:
        bar.update(_checkpoint_epoch(resume))

    def on_report(m: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(
            loss=f"{m['train_loss']:.3f}",
            val_loss=f"{m['val_loss']:.3f}",
            lead_acc=f"{m['val_lead_accuracy']:.4f}",
            set_acc=f"{m['val_set_accuracy']:.3f}",
        )
        tqdm.write(json.dumps({k: _round(v) for k, v in m.items()}), file=sys.stderr)

    reporter = LocalReporter(out_dir=out, resume_from=resume, on_report=on_report)
    started = time.perf_counter()
    last = train_lead_id(config.to_dict(), data=data, reporter=reporter, progress=True)
    bar.close()
    (out / "history.json").write_text(json.dumps(reporter.history, indent=2))
    best = min(reporter.history, key=lambda m: m["val_loss"]) if reporter.history else last
    print(
        "\n".join(
            [
                "",
                f"finished {len(reporter.history)} epoch(s) in {time.perf_counter() - started:.1f} s",
                f"last epoch: val lead accuracy {last['val_lead_accuracy']:.4f} "
                f"(Hungarian {last['val_lead_accuracy_hungarian']:.4f}), "
                f"set accuracy {last['val_set_accuracy']:.4f} "
                f"(Hungarian {last['val_set_accuracy_hungarian']:.4f})",
                f"best epoch by val loss: {best['epoch']} ({best.get('checkpoint_dir', out)})",
                f"data fingerprint: {data.fingerprint}",
                f"outputs: {out}/ (config.json, history.json, epoch_NNN/checkpoint.pt)",
            ]
        )
    )
    return 0


def _round(value: Any) -> Any:
    return round(value, 5) if isinstance(value, float) else value


def _checkpoint_epoch(path: Path) -> int:
    metrics_file = Path(path) / "metrics.json"
    return json.loads(metrics_file.read_text())["epoch"] if metrics_file.exists() else 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train one lead-identification model (no search)",
        description="Train one lead-identification model. Settings: defaults (the reference), "
        "then --config YAML, then flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--config", help="YAML file of training settings (flat, or under 'train:')")
    train.add_argument("--out", default="runs/train", help="folder for checkpoints and history")
    train.add_argument(
        "--resume", default=None, help="checkpoint folder (epoch_NNN) to continue from"
    )
    add_data_arguments(train)
    add_config_arguments(train)
    train.set_defaults(func=run_train)

"""The `leadtune` command: one sub-command per job, each defined next to the code it drives.

Every sub-command module exposes ``add_parser(subparsers)``; this file only collects them,
so ``leadtune --help`` stays fast (heavy imports happen inside the commands).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from leadtune import __version__
from leadtune.search.faults import Interrupted

# The built-in tasks' delivery (evaluate suites, report sections): imported here, on top of
# everything, as timm's models/__init__.py imports every model (leadtune.analysis.delivery).
from leadtune.trainables.diagnosis import delivery as _diagnosis_delivery  # noqa: F401
from leadtune.trainables.lead_id import delivery as _lead_id_delivery  # noqa: F401

# Order is the order shown in --help: the path the data takes.
COMMAND_MODULES = (
    "leadtune.trainables.data.commands",  # leadtune data prepare|summary
    "leadtune.trainables.catalogue",  # leadtune models
    "leadtune.trainables.lead_id.published",  # leadtune import
    "leadtune.trainables.commands",  # leadtune train
    "leadtune.bench",  # leadtune bench
    "leadtune.search.commands",  # leadtune search, leadtune promote
    "leadtune.analysis.commands",  # leadtune report, evaluate, export, explain
    "leadtune.trainables.lead_id.delivery.commands",  # leadtune label
)


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors: what was wrong and where the help is, no usage block.
    Sub-command parsers are made of the same class (``add_subparsers`` uses the parent's)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="leadtune",
        description="Hyperparameter search for ECG deep learning (Ray Tune + Optuna + MLflow).",
    )
    parser.add_argument("--version", action="version", version=f"leadtune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


# Third-party output a leadtune user cannot act on: MLflow's "View run at http://..." links (they
# point at a server leadtune stops when the command ends; the summary names the durable URI),
# its INFO lines about table creation and registry waits (MLflow sets its loggers' level from
# MLFLOW_LOGGING_LEVEL when it is imported, in this process, the server and every Ray worker),
# and Tune's hint about how often it snapshots the experiment state (short demo trials trigger
# it; nothing to change). Each is a default: a user's own setting wins.
QUIET_ENV = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


def quiet_third_party_output() -> None:
    import logging

    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for logger in ("mlflow", "alembic"):
        logging.getLogger(logger).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        from leadtune.trainables import runtime

        # glibc reads its allocator settings at start-up: heavy commands restart once with them,
        # before the parser imports every command's module (that would be paid twice).
        words = sys.argv[1:]
        command = next((word for word in words if not word.startswith("-")), None)
        if runtime.should_reexec(command) and not {"-h", "--help"} & set(words):
            runtime.reexec_with_allocator_settings(words)
    quiet_third_party_output()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.print_help()
        return 2
    if extra:  # reported like argparse's own errors, with the sub-command's help
        print(
            f"leadtune {args.command}: error: unrecognized arguments: {' '.join(extra)} "
            f"(see leadtune {args.command} --help)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        return int(args.func(args) or 0)
    except Interrupted as exc:
        print(f"leadtune: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("leadtune: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Our own errors (DatasetError, RecordError, config errors) are ValueErrors with a
        # message that says what was wrong and how to fix it: no traceback for those.
        if getattr(args, "debug", False):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        print(f"leadtune: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

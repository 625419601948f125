"""The `leadtune` command: one sub-command per job, each defined next to the code it drives.

Every sub-command module exposes ``add_parser(subparsers)``; this file only collects them,
so ``leadtune --help`` stays fast (heavy imports happen inside the commands).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from leadtune import __version__
from leadtune.search.faults import Interrupted

# The built-in tasks' delivery (evaluate suites, report sections): imported here, on top of
# everything, as timm's models/__init__.py imports every model (leadtune.analysis.delivery).
from leadtune.trainables.diagnosis import delivery as _diagnosis_delivery  # noqa: F401
from leadtune.trainables.lead_id import delivery as _lead_id_delivery  # noqa: F401


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
    for module in command_modules():
        module.add_parser(subparsers)
    return parser


def command_modules() -> tuple[Any, ...]:
    """The modules that add the sub-commands, in the order ``--help`` shows them (the path the
    data takes). Imported here, when the parser is built, not when this module is: a heavy
    command re-executes itself first (trainables.runtime), and would pay for them twice."""
    from leadtune import bench  # leadtune bench
    from leadtune.analysis import commands as delivery_commands  # report, evaluate, export, explain
    from leadtune.search import commands as search_commands  # search, promote
    from leadtune.trainables import catalogue  # models
    from leadtune.trainables import commands as train_commands  # train
    from leadtune.trainables.data import commands as data_commands  # data prepare|summary
    from leadtune.trainables.lead_id import published  # import
    from leadtune.trainables.lead_id.delivery import commands as label_commands  # label

    return (data_commands, catalogue, published, train_commands, bench, search_commands,
            delivery_commands, label_commands)  # fmt: skip


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
        if command == "search":  # its driver runs for hours after a set-up of imports
            runtime.defer_full_collections()
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

"""`leadtune data`: build and inspect the cached PTB-XL arrays from the command line.

Imports only the standard library at module level so that `leadtune --help` stays fast;
numpy, wfdb and pandas load when a sub-command runs.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from leadtune.trainables.commands import non_negative_float, positive_int

_DEFAULT_FOLDS = {"train": tuple(range(1, 9)), "val": (9,), "test": (10,)}


def parse_folds(text: str) -> tuple[int, ...]:
    """ "1-8" -> (1, ..., 8); "1,2,5" -> (1, 2, 5); "1-3,7" -> (1, 2, 3, 7); "none" -> ()."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return ()
    folds: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                if last < first:
                    raise ValueError(part)
                folds.extend(range(first, last + 1))
            else:
                folds.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid folds {text!r}; write a range like 1-8, a list like 1,2,3, or none"
        ) from None
    if any(not 1 <= fold <= 10 for fold in folds):
        raise argparse.ArgumentTypeError(f"invalid folds {text!r}: PTB-XL's strat_folds are 1-10")
    return tuple(dict.fromkeys(folds))


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {value}")
    return value


def _add_dataset_options(parser: argparse.ArgumentParser, require_source: bool) -> None:
    parser.add_argument(
        "--source",
        type=Path,
        required=require_source,
        metavar="DIR",
        help="PTB-XL folder in PhysioNet layout (ptbxl_database.csv, records100/, ...)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (None: $LEADTUNE_CACHE, else ~/.cache/leadtune)",
    )
    parser.add_argument(
        "--fs", type=positive_int, default=100, help="sampling rate of the cache, Hz"
    )
    parser.add_argument(
        "--highpass-hz",
        type=non_negative_float,
        default=0.5,
        help="Butterworth high-pass cut-off in Hz; 0 disables it",
    )
    parser.add_argument(
        "--zero-phase",
        action="store_true",
        help="filter forwards and backwards instead of causally like the reference",
    )
    parser.add_argument(
        "--clip-mv",
        type=non_negative_float,
        default=0.0,
        help="clip the filtered signals to +-this many mV (0: no clipping, as the reference)",
    )
    parser.add_argument(
        "--max-bad-fraction",
        type=_fraction,
        default=0.02,
        help="fail if more than this fraction of records cannot be read",
    )
    # String defaults go through parse_folds too, and read well in --help.
    parser.add_argument("--train-folds", type=parse_folds, default="1-8", help="strat_folds")
    parser.add_argument("--val-folds", type=parse_folds, default="9", help="strat_folds")
    parser.add_argument(
        "--test-folds",
        type=parse_folds,
        default="10",
        help="strat_folds (kept for the final evaluation only)",
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="only the first N records of the chosen folds, by ecg_id (for quick trials)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from leadtune.trainables.commands import DefaultsHelpFormatter

    """Add `data` (with `prepare` and `summary`) to the leadtune CLI."""
    formatter = DefaultsHelpFormatter
    data = subparsers.add_parser(
        "data",
        help="prepare and inspect the cached PTB-XL arrays",
        description="Read a PTB-XL folder once into a cache of preprocessed signals.",
        formatter_class=formatter,
    )
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    prepare = commands.add_parser(
        "prepare",
        help="read, preprocess and cache a PTB-XL folder (a no-op when already cached)",
        description="Read every record of the chosen folds, preprocess it and cache the arrays.",
        formatter_class=formatter,
    )
    _add_dataset_options(prepare, require_source=True)
    prepare.add_argument("--workers", type=positive_int, default=1, help="reader processes")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    prepare.set_defaults(func=run_prepare)

    summary = commands.add_parser(
        "summary",
        help="show what an existing cache holds",
        description="Print the summary of the cache built with these options.",
        formatter_class=formatter,
    )
    _add_dataset_options(summary, require_source=True)
    summary.set_defaults(func=run_summary)


def _settings(args: argparse.Namespace):
    from leadtune.trainables.data.preprocess import PreprocessConfig
    from leadtune.trainables.data.ptbxl import DatasetError, SplitConfig

    try:
        preprocess = PreprocessConfig(
            fs=args.fs,
            highpass_hz=args.highpass_hz or None,
            zero_phase=args.zero_phase,
            clip_mv=args.clip_mv or None,
        )
        splits = SplitConfig(args.train_folds, args.val_folds, args.test_folds)
    except ValueError as exc:
        # Raised as DatasetError so that the CLI entry prints it as one error line.
        raise DatasetError(f"invalid data options: {exc}") from exc
    return preprocess, splits


def prepare_command(args: argparse.Namespace) -> str:
    """The `leadtune data prepare` line that builds the cache these options describe."""
    words = ["leadtune", "data", "prepare", "--source", str(args.source)]
    if args.cache_dir is not None:
        words += ["--cache-dir", str(args.cache_dir)]
    if args.fs != 100:
        words += ["--fs", str(args.fs)]
    if args.highpass_hz != 0.5:
        words += ["--highpass-hz", str(args.highpass_hz)]
    if args.zero_phase:
        words.append("--zero-phase")
    if args.clip_mv:
        words += ["--clip-mv", str(args.clip_mv)]
    if args.max_bad_fraction != 0.02:
        words += ["--max-bad-fraction", str(args.max_bad_fraction)]
    for option, folds, default in (
        ("--train-folds", args.train_folds, _DEFAULT_FOLDS["train"]),
        ("--val-folds", args.val_folds, _DEFAULT_FOLDS["val"]),
        ("--test-folds", args.test_folds, _DEFAULT_FOLDS["test"]),
    ):
        if tuple(folds) != default:
            words += [option, ",".join(map(str, folds)) or "none"]
    if args.limit is not None:
        words += ["--limit", str(args.limit)]
    return shlex.join(words)


def run_prepare(args: argparse.Namespace) -> int:
    from leadtune.trainables.data.cache import prepare_dataset

    preprocess, splits = _settings(args)
    dataset = prepare_dataset(
        args.source,
        cache_root=args.cache_dir,
        preprocess=preprocess,
        splits=splits,
        max_bad_fraction=args.max_bad_fraction,
        limit=args.limit,
        progress=not args.quiet,
        workers=args.workers,
    )
    if not args.quiet:
        print(dataset.summary())
    return 0


def run_summary(args: argparse.Namespace) -> int:
    from leadtune.trainables.data.cache import MANIFEST_FILE, PreparedDataset, dataset_cache_dir

    preprocess, splits = _settings(args)
    path = dataset_cache_dir(
        args.source, args.cache_dir, preprocess, splits, args.limit, args.max_bad_fraction
    )
    if not (path / MANIFEST_FILE).is_file():
        print(
            f"no cache for these settings (expected at {path}); build it with:\n"
            f"  {prepare_command(args)}"
        )
        return 1
    dataset = PreparedDataset.load(path)
    print(dataset.summary())
    return 0

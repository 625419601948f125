"""`leadtune report`, `evaluate`, `export` and `explain`: reading what searches and training wrote
(each task's own parts come from its delivery package, :mod:`leadtune.analysis.delivery`).

Only argparse at import time: torch, MLflow and Optuna load inside the commands, so
``leadtune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

MODEL_HELP = (
    "models:/NAME@ALIAS or models:/NAME/VERSION (registry), an MLflow run id, a checkpoint "
    "folder or file, or a folder written by `leadtune export`"
)


def _mlflow_errors_as_one_line(func):
    """MLflow's own exceptions become the CLI's one-line errors (no traceback)."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except Exception as exc:
            if type(exc).__name__ != "MlflowException":
                raise
            message = " ".join(str(exc).split())[:300]
            raise ValueError(f"MLflow: {message}; check --tracking-uri and the model name") from exc

    return wrapped


@_mlflow_errors_as_one_line
def run_report(args: argparse.Namespace) -> int:
    from leadtune.analysis.delivery import delivery_of
    from leadtune.analysis.report import collect, write_report
    from leadtune.search.promote import task_of
    from leadtune.search.state import find_search

    search_dir = find_search(Path(args.storage_path), args.study, args.experiment)
    data = collect(search_dir, args.tracking_uri)
    out = Path(args.out) if args.out else search_dir / "report"
    files = write_report(data, out, fmt=args.format, log_to_mlflow=not args.no_mlflow)
    best = data.best()
    print(f"report of {data.state['study']} ({len(data.trials)} trials): {files['report']}")
    if best:
        print(f"  best trial {best.trial_id}: {data.metric} = {best.best_value:.5f}")
    print(f"  importances: {data.importance_note}")
    if "mlflow" in files:
        print(f"  attached to MLflow parent run {data.state['parent_run_id']}: {files['mlflow']}")
    for section in delivery_of(task_of(data.state)).report_sections:
        section(data, out)
    return 0


def _record_exists(record: str) -> bool:
    path = Path(record)
    return path.exists() or path.with_name(path.name + ".hea").is_file()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model a command reads: ``--model`` as in ``leadtune label``, or positional."""
    parser.add_argument(
        "model", nargs="?", default=None,
        help=MODEL_HELP + " (the same as --model; default: the bundled model)",
    )  # fmt: skip
    parser.add_argument(
        "--model", dest="model_option", default=None, metavar="MODEL",
        help="the model, as for leadtune label (default: the bundled model)",
    )  # fmt: skip


def chosen_model(args: argparse.Namespace) -> None:
    """Settle ``args.model`` from the positional and ``--model`` (one of them, or both equal)."""
    given = getattr(args, "model_option", None)
    if given is not None:
        if args.model is not None and args.model != given:
            raise ValueError(
                f"two models given ({args.model} and --model {given}): give one of them"
            )
        args.model = given


@_mlflow_errors_as_one_line
def run_evaluate(args: argparse.Namespace) -> int:
    """Load the model (and the --compare one), then run the suite its task's delivery names."""
    from leadtune.analysis.delivery import choose_suite
    from leadtune.analysis.model_source import load_model
    from leadtune.trainables.runtime import check_writable

    chosen_model(args)
    if args.out:
        check_writable(Path(args.out), "--out")
    loaded = load_model(args.model, args.tracking_uri, args.cache_dir)
    suite = choose_suite(loaded.task, args.suite, compare=bool(args.compare))  # before any data
    other = load_model(args.compare, args.tracking_uri, args.cache_dir) if args.compare else None
    return suite(args, loaded, other)


@_mlflow_errors_as_one_line
def run_export(args: argparse.Namespace) -> int:
    from leadtune.analysis.export import CARD_MARKDOWN, export_model
    from leadtune.analysis.model_source import load_model
    from leadtune.trainables.runtime import check_writable

    chosen_model(args)
    check_writable(Path(args.out), "--out")
    loaded = load_model(args.model, args.tracking_uri, args.cache_dir)
    card = export_model(loaded, Path(args.out), tolerance=args.tolerance, onnx=not args.no_onnx)
    print(f"exported {loaded.source} to {args.out}")
    for name, entry in card["verification"]["formats"].items():
        if entry.get("file"):
            diff = entry.get("max_abs_diff")
            extra = entry.get("not_verified") or ""
            if entry.get("unsupported_shapes"):
                extra += f" fails on input shape(s) {entry['unsupported_shapes']}"
            shown = "not verified" if diff is None else f"max abs diff {diff:.2e}"
            print(f"  {name:<13} {entry['file']:<22} {shown}  {extra}".rstrip())
        else:
            print(f"  {name:<13} skipped: {entry.get('skipped')}")
    print(
        f"  verification passed (tolerance {args.tolerance:g}); model card: "
        f"{Path(args.out) / CARD_MARKDOWN}"
    )
    return 0


def run_explain(args: argparse.Namespace) -> int:
    """Checks every input (Captum, method, record or folder, output folder, model) before any
    attribution is computed; then one record or a split."""
    from leadtune.analysis.explain import (
        Settings,
        explain_record,
        explain_split,
        format_summary,
        require_captum,
    )
    from leadtune.trainables.runtime import check_writable

    require_captum()
    if bool(args.record) == bool(args.source):
        raise ValueError("pass one RECORD, or --source DIR (with --split) for a split")
    if args.record and not _record_exists(args.record):
        raise FileNotFoundError(
            f"no such record: {args.record}; pass a WFDB record (NAME or NAME.hea)"
        )
    if args.source:
        from leadtune.trainables.data.ptbxl import database_files

        database_files(Path(args.source))  # a wrong folder is one line, before any work
    settings = Settings(args.method, args.n_samples, args.steps, args.baseline, args.seed)
    settings.check(None)  # the task-independent checks, before the model loads
    if args.out:
        check_writable(Path(args.out), "--out")
    loaded = _load_for_explain(args)
    settings.check(loaded.task)
    from leadtune.analysis.suites import slug

    where = Path(args.record).name if args.record else args.split
    out = (
        Path(args.out)
        if args.out
        else Path("runs/explain") / f"{slug(str(args.model or 'bundled'))}-{slug(where)}"
    )
    if args.record:
        summary = explain_record(loaded, args.record, settings, out, _exclusions(args.exclude))
    else:
        print(
            f"[leadtune] explaining {loaded.source} on the {args.split} split of {args.source}",
            file=sys.stderr,
        )
        from leadtune.analysis.suites import ptbxl_for_model

        dataset = ptbxl_for_model(args.source, args.cache_dir, None, loaded)
        summary = explain_split(loaded, dataset, args.split, args.limit, settings, out, args.source)
    print(format_summary(summary))
    return 0


def _exclusions(values: list[str] | None) -> tuple[int | str, ...]:
    return tuple(int(x) if x.isdigit() else x for x in (values or []))


@_mlflow_errors_as_one_line
def _load_for_explain(args: argparse.Namespace) -> Any:
    from leadtune.analysis.model_source import load_model

    loaded = load_model(args.model, args.tracking_uri, args.cache_dir)
    for parameter in loaded.model.parameters():  # gradients for the input only
        parameter.requires_grad_(False)
    return loaded


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from leadtune.trainables.commands import (
        DefaultsHelpFormatter,
        non_negative_float,
        positive_float,
        positive_int,
    )

    fmt = DefaultsHelpFormatter

    report = subparsers.add_parser(
        "report",
        help="write a search report (trials, best trial, importances, plots) and attach it in MLflow",
        description="A readable report of a search: trials table, best trial, Optuna parameter "
        "importances, optimisation history, parallel coordinates, intermediate values (Optuna's "
        "own plots) and learning curves (PNG), with links to the MLflow runs and version; "
        "also logged to the search's MLflow parent run under report/.",
        formatter_class=fmt,
    )
    report.add_argument(
        "--study", default=None, help="study name (default: the only one under --storage-path)"
    )
    report.add_argument("--storage-path", default="runs/search", help="the search's --storage-path")
    report.add_argument(
        "--experiment", default=None, help="a search folder (default: the study's newest)"
    )
    report.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow URI (default: the search's, else <storage>/mlflow.db)",
    )
    report.add_argument(
        "--out", default=None, help="output folder (default: <search folder>/report)"
    )
    report.add_argument(
        "--format", choices=("md", "html"), default="md", help="report.md or report.html"
    )
    report.add_argument(
        "--no-mlflow", action="store_true", help="do not attach the report to the parent run"
    )
    report.set_defaults(func=run_report)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="a model's statistics on a split, with intervals (its task's suite)",
        description="Statistics of one model on one split, by a suite of its task. Lead "
        "identification's paper suite: lead and set accuracy (argmax and Hungarian) with "
        "bootstrap and Wilson intervals, per-lead recall overall and per diagnostic superclass, "
        "confusion matrices, and with --compare McNemar's test against another model on the "
        "same ECGs; its labelling suite: accuracy by number of leads, reversal detection. The "
        "superclass classifiers' suite: macro and per-class AUROC and F1 with ECG-level "
        "intervals. A task of one's own: its own evaluation.",
        formatter_class=fmt,
    )
    add_model_arguments(evaluate)
    evaluate.add_argument(
        "--split", choices=("train", "val", "test"), default="test", help="the split to score"
    )
    evaluate.add_argument(
        "--source",
        default=None,
        help="PTB-XL folder, or the data a task of one's own reads (default: for PTB-XL models, "
        "the model's training data if present, else the bundled sample)",
    )
    evaluate.add_argument(
        "--cache-dir", default=None, help="dataset cache root (default: ~/.cache/leadtune)"
    )
    evaluate.add_argument("--limit", type=int, default=None, help="use only the first N records")
    evaluate.add_argument(
        "--out", default=None, help="output folder (default: runs/evaluate/<model>-<split>)"
    )
    evaluate.add_argument(
        "--compare",
        default=None,
        metavar="OTHER",
        help="second model for McNemar's test (lead identification's paper suite)",
    )
    evaluate.add_argument(
        "--tracking-uri", default=None, help="MLflow URI for models:/ and run ids"
    )
    evaluate.add_argument("--n-boot", type=positive_int, default=10_000, help="bootstrap resamples")
    evaluate.add_argument(
        "--seed", type=int, default=0, help="bootstrap and permutation-check seed"
    )
    from leadtune.analysis.delivery import DELIVERIES

    known = "; ".join(f"{task}: {', '.join(d.suites)}" for task, d in sorted(DELIVERIES.items()))
    evaluate.add_argument(
        "--suite", default=None,
        help=f"the suite of the model's task (default: its first; {known}; a task without a "
        "delivery of its own: task, its own evaluation on --source)",
    )  # fmt: skip
    evaluate.add_argument(
        "--swap-threshold", type=non_negative_float, default=None,
        help="with --suite labelling: one threshold in nats for every hypothesis (default: the "
        "model's, one per hypothesis)",
    )  # fmt: skip
    evaluate.set_defaults(func=run_evaluate)

    export = subparsers.add_parser(
        "export",
        help="write a torch-only model (torch.export .pt2; TorchScript, ONNX extras) with a model card",
        description="Export a model to a folder that loads with torch alone, with a model card "
        "(JSON + Markdown) and a check that the export reproduces the original's outputs.",
        formatter_class=fmt,
    )
    add_model_arguments(export)
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--tracking-uri", default=None, help="MLflow URI for models:/ and run ids")
    export.add_argument(
        "--cache-dir", default=None, help="dataset cache root holding the training data's manifest"
    )
    export.add_argument(
        "--tolerance", type=positive_float, default=1e-4, help="max abs logit difference allowed"
    )
    export.add_argument("--no-onnx", action="store_true", help="skip the ONNX file")
    export.set_defaults(func=run_export)

    explain = subparsers.add_parser(
        "explain",
        help="attributions (Captum) of a model's outputs over the ECG: figures and arrays",
        description="What in the signal made the model say it: attributions of each channel's "
        "predicted lead (lead identification) or of each diagnostic superclass over every "
        "lead and time sample, with Captum, drawn as colour on the 12 traces, and saved as "
        "arrays (attributions.npz) with the method, baselines, samples and seed. Over a split "
        "of a PTB-XL folder (--source): for lead identification, heartbeat-aligned global and "
        "local attribution maps, the share of attribution near the R peaks and on each "
        "target's own trace, and the PCA of each set-attention block; for a superclass "
        "classifier, each lead's share of each class' attribution. Needs Captum (pip install captum).",
        formatter_class=fmt,
    )
    explain.add_argument(
        "record", nargs="?", default=None, metavar="RECORD",
        help="a WFDB record (NAME or NAME.hea); or use --source for a split",
    )  # fmt: skip
    explain.add_argument("--model", default=None, help=MODEL_HELP + " (default: the bundled model)")
    explain.add_argument(
        "--source", default=None, help="a PTB-XL folder: explain a split of it instead of a record"
    )
    explain.add_argument(
        "--split", choices=("train", "val", "test"), default="val",
        help="with --source: the split whose records are explained",
    )  # fmt: skip
    explain.add_argument(
        "--limit", type=positive_int, default=None,
        help="with --source: only the first N records of the split (a superclass "
        "classifier: of its labelled records)",
    )  # fmt: skip
    explain.add_argument(
        "--method", choices=("gradient_shap", "integrated_gradients", "saliency", "grad_cam"),
        default="gradient_shap",
        help="Captum method; grad_cam (LayerGradCam on the last convolution) for the "
        "convolutional superclass classifiers only",
    )  # fmt: skip
    explain.add_argument(
        "--n-samples", type=positive_int, default=16, help="GradientShap: random points per input"
    )
    explain.add_argument(
        "--steps", type=positive_int, default=64, help="Integrated Gradients: points on the path"
    )
    explain.add_argument(
        "--baseline", choices=("zero", "noise"), default="zero",
        help="zero: a flat line at 0 mV; noise: 8 seeded draws of 0.05 mV Gaussian noise",
    )  # fmt: skip
    explain.add_argument("--seed", type=int, default=0, help="GradientShap's and the noise's seed")
    explain.add_argument(
        "--out", default=None, help="output folder (default: runs/explain/<model>-<record|split>)"
    )
    explain.add_argument("--tracking-uri", default=None, help="MLflow URI for models:/ and run ids")
    explain.add_argument("--cache-dir", default=None, help="dataset cache root")
    explain.add_argument(
        "--exclude", action="append", metavar="NAME|INDEX",
        help="leave out a non-ECG channel of RECORD (lead identification)",
    )  # fmt: skip
    explain.set_defaults(func=run_explain)

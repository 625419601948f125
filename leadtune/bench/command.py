"""The `leadtune bench` command: its arguments, the run, and the printed figures."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from leadtune.bench.accuracy import ACCURACY_CONFIG, compare_training
from leadtune.bench.search import measure_search
from leadtune.bench.settings import SHARED_SUBSET, VARIANT_NAMES, BenchSettings
from leadtune.bench.speed import (
    estimate_epochs,
    load_bench_data,
    measure_data_pipeline,
    measure_epochs,
    measure_model,
)
from leadtune.bundled import sample_dir

# --- the command ---------------------------------------------------------------------------------


def command_line(settings: BenchSettings, extra: list[str]) -> str:
    """The command that reproduces these figures."""
    parts = ["leadtune", "bench", "--model", ",".join(settings.models)]
    if settings.quick:
        parts.append("--quick")
    defaults = BenchSettings()
    for name in ("batch_size", "leads", "samples", "warmup", "rounds", "threads", "limit"):
        value = getattr(settings, name)
        if value != getattr(defaults, name) and not settings.quick:
            parts += [f"--{name.replace('_', '-')}", str(value)]
    if not settings.default_allocator and not settings.quick:
        parts.append("--no-default-allocator")
    parts += ["--source", settings.source or "none"]
    for name, value in settings.model_overrides.items():
        parts += [f"--{name.replace('_', '-')}", str(value)]
    return " ".join(parts + extra)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    models = ("reference", "d64") if args.model == "all" else tuple(args.model.split(","))
    source = args.source
    if source is None:
        source = str(SHARED_SUBSET if SHARED_SUBSET.is_dir() else sample_dir())
    overrides = {
        name: getattr(args, name)
        for name in ("width", "depth", "heads", "d_model")
        if getattr(args, name) is not None
    }
    settings = BenchSettings(
        models=models,
        batch_size=args.batch_size,
        leads=args.leads,
        samples=args.samples,
        warmup=args.warmup,
        rounds=args.rounds,
        threads=args.threads,
        default_allocator=not args.no_default_allocator,
        source=None if source.lower() == "none" else source,
        cache_dir=args.cache_dir,
        limit=args.limit,
        measure_epoch=args.measure_epoch,
        quick=args.quick,
        model_overrides=overrides,
    )
    if args.quick:
        # A smoke run: one warm-up step and three rounds (a median that one outlier cannot
        # move) of a small batch, reference size only.
        settings = dataclasses.replace(
            settings,
            models=settings.models[:1],
            batch_size=min(settings.batch_size, 8),
            warmup=min(settings.warmup, 1),
            rounds=min(settings.rounds, 3),
            measure_epoch=False,
        )
    return settings.validate()


def run_bench(args: argparse.Namespace) -> int:
    """With --json the readable figures go to stderr and stdout carries one JSON object."""
    import contextlib

    if not args.json:
        return _run_bench(args)
    with contextlib.redirect_stdout(sys.stderr):
        report: dict = {}
        code = _run_bench(args, report)
    print(json.dumps(report, indent=2, default=str))
    return code


def _run_bench(args: argparse.Namespace, report_out: dict | None = None) -> int:
    settings = settings_from_args(args)
    if settings.source:  # a wrong folder is one line, before any other output
        from leadtune.trainables.data.ptbxl import database_files

        database_files(Path(settings.source))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    extra = [flag for flag, on in (("--accuracy", args.accuracy), ("--search", args.search)) if on]
    print(f"command: {command_line(settings, extra)}")
    from leadtune.trainables.runtime import describe_runtime

    environment = describe_runtime()
    print("environment: " + ", ".join(f"{key}={value}" for key, value in environment.items()))
    if settings.quick:
        print(
            f"quick run: batch {settings.batch_size}, figures are a smoke test, not the reference"
        )

    data, batch_file = load_bench_data(settings, log)
    report: dict[str, Any] = {"command": command_line(settings, extra), "environment": environment}
    try:
        report["models"] = []
        for name in settings.models:
            log(f"measuring {name}")
            measured = measure_model(name, settings, batch_file, log)
            report["models"].append(measured)
            print_model(measured, settings)
        if data is not None:
            pipeline = measure_data_pipeline(data, settings, repeats=1 if settings.quick else 3)
            report["data_pipeline"] = pipeline
            print(
                f"data pipeline (batch cutting + lead shuffle + jitter, {pipeline['records']} "
                f"records): host path {pipeline['host_ecg_per_second']:,.0f} ECG/s, "
                f"on-device path (CPU) {pipeline['on_device_ecg_per_second']:,.0f} ECG/s"
            )
            first = report["models"][0]
            report["epoch_estimates"] = estimate_epochs(first, data, pipeline)
            print(
                f"epoch on {settings.source} ({len(data.train)} train + {len(data.val)} val ECGs, "
                f"{first['model']}), estimated from the medians:"
            )
            for row in report["epoch_estimates"]:
                name = VARIANT_NAMES[(row["variant"], row["allocator"])]
                print(f"  {name:<30} {_duration(row['epoch_seconds'])}")
            if settings.measure_epoch:
                report["epochs"] = measure_epochs(data, settings, log)
                for row in report["epochs"]:
                    print(
                        f"  measured, {row['variant']} ({row['allocator']} malloc): "
                        f"{_duration(row['epoch_seconds'])}"
                    )
        if args.accuracy:
            if data is None:
                raise ValueError("--accuracy needs data: pass --source PTB-XL-FOLDER")
            config = {**ACCURACY_CONFIG, "epochs": args.accuracy_epochs}
            report["accuracy"] = compare_training(data, config, log)
            print_accuracy(report["accuracy"])
        if args.search:
            report["search"] = measure_search(settings, log)
            print_search(report["search"])
    finally:
        if batch_file:
            os.unlink(batch_file)
    report["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average at the end: {report['load_average_end']}")
    if report_out is not None:
        report_out.update(report)
    fast = next(r for r in report["models"][0]["rows"] if r["variant"] == "fast")
    print(f"train: {fast['train_ecg_per_second']:.1f} ECG/s")
    print(f"infer: {fast['infer_ecg_per_second']:.1f} ECG/s")
    return 0


def print_model(measured: dict[str, Any], settings: BenchSettings) -> None:
    config = measured["config"]
    rows = measured["rows"]
    counts = ", ".join(f"{row['parameters']:,}" for row in rows)
    print(
        f"\nmodel {measured['model']}: inception_gru + sab, D={config['d_model']}, "
        f"{settings.leads} leads x {settings.samples} samples, batch {settings.batch_size}, fp32, "
        f"{rows[0]['parameters']:,} parameters (all variants: {counts}), "
        f"{rows[0]['threads']} threads; "
        f"medians of {settings.rounds} steps after {settings.warmup} warm-up"
    )
    print(
        f"  {'ECG/s (median | best step)':<30} {'train':>15} {'infer':>15} "
        f"{'train peak':>10} {'infer peak':>10}"
    )
    for row in rows:
        print(
            f"  {VARIANT_NAMES[(row['variant'], row['allocator'])]:<30} "
            f"{row['train_ecg_per_second']:>7.2f} | {row['train_best_ecg_per_second']:>5.2f} "
            f"{row['infer_ecg_per_second']:>7.2f} | {row['infer_best_ecg_per_second']:>5.2f} "
            f"{_megabytes(row['train_peak_bytes']):>10} {_megabytes(row['infer_peak_bytes']):>10}"
        )
    for label, key in (("medians", "ratios"), ("best steps", "best_ratios")):
        text = ", ".join(
            f"{name.replace('_', ' ')} {value:.2f}x" for name, value in measured[key].items()
        )
        print(f"  fast path speed-up ({label}): {text}")


def _duration(seconds: float) -> str:
    return f"{seconds:7.1f} s ({seconds / 60:.1f} min)"


def _megabytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MB"


def print_accuracy(result: dict[str, Any]) -> None:
    print(f"\ntraining fast vs plain, same seed and batches: {json.dumps(result['config'])}")
    print(f"  on real training records with artefacts: {json.dumps(result['training_records'])}")
    for variant in ("fast", "plain"):
        last = result[variant][-1]
        print(
            f"  {variant:<6} epoch {last['epoch']}: train loss {last['train_loss']:.4f}, "
            f"val loss {last['val_loss']:.4f}, val lead accuracy {last['val_lead_accuracy']:.4f}, "
            f"val set accuracy {last['val_set_accuracy']:.4f}, "
            f"{last['epoch_seconds']:.0f} s/epoch"
        )


def print_search(results: list[dict[str, Any]]) -> None:
    print("\nsmall search (2 trials, 1 epoch, tiny inception_gru + sab):")
    for row in results:
        fit = row["wall_seconds"] or 0.0
        print(
            f"  {row['max_concurrent']} concurrent: command {row['command_seconds']:.0f} s "
            f"(Tuner.fit {fit:.0f} s), trials {row['trial_seconds_sum']:.0f} s summed; "
            f"peak memory (PSS of driver + Ray + workers) "
            f"{_megabytes(row['peak_tree_pss_bytes'])}"
        )
        if row.get("cpu_outside_share") is not None:
            outside = {k: round(v, 1) for k, v in row["cpu_seconds"].items() if k != "trials"}
            print(
                f"    CPU outside trials {100 * row['cpu_outside_share']:.1f} % "
                f"(trials {row['cpu_seconds'].get('trials', 0):.1f} CPU s; outside {outside})"
            )
        kept = row.get("state_keeping")
        if kept:
            print(
                f"    keeping Tune's last whole save: {kept['save_ms']:.2f} ms CPU per save "
                f"({kept['bytes'] / 1024:.0f} KB), {kept['step_ms']:.3f} ms per step without one"
            )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from leadtune.trainables.commands import DefaultsHelpFormatter

    bench = subparsers.add_parser(
        "bench",
        help="training and inference speed of the reference model, fast path vs plain PyTorch",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    bench.add_argument(
        "--model",
        default="all",
        help="reference (D=128), d64, or all; comma-separated for several",
    )
    bench.add_argument("--quick", action="store_true", help="a smoke run of under a minute")
    bench.add_argument("--batch-size", type=int, default=38, help="ECGs per measured step")
    bench.add_argument("--leads", type=int, default=12, help="leads per ECG in the measured batch")
    bench.add_argument("--samples", type=int, default=1000, help="samples per lead")
    bench.add_argument("--warmup", type=int, default=2, help="unmeasured steps per variant")
    bench.add_argument("--rounds", type=int, default=5, help="measured steps per variant")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    bench.add_argument(
        "--no-default-allocator",
        action="store_true",
        help="skip the plain model under glibc's default malloc settings",
    )
    bench.add_argument(
        "--source",
        default=None,
        help="PTB-XL folder for the batch, data-pipeline and epoch figures (default: the shared "
        "subset beside the checkout, else the bundled sample; 'none' for a random batch)",
    )
    bench.add_argument("--cache-dir", default=None, help="dataset cache root")
    bench.add_argument("--limit", type=int, default=None, help="use only the first N records")
    bench.add_argument(
        "--measure-epoch", action="store_true", help="run one real epoch of fast and plain"
    )
    bench.add_argument(
        "--accuracy", action="store_true", help="train fast and plain side by side (minutes)"
    )
    bench.add_argument(
        "--accuracy-epochs",
        type=int,
        default=ACCURACY_CONFIG["epochs"],
        help="epochs of each side of --accuracy",
    )
    bench.add_argument(
        "--search", action="store_true", help="time a small search with 1 and 2 trials at once"
    )
    bench.add_argument(
        "--json", action="store_true",
        help="print every figure as JSON on standard output (the readable lines go to stderr)",
    )  # fmt: skip
    group = bench.add_argument_group("model overrides (smoke tests)")
    group.add_argument("--d-model", type=int, default=None, help="feature width D")
    group.add_argument("--width", type=float, default=None, help="encoder channel multiplier")
    group.add_argument("--depth", type=int, default=None, help="set attention blocks")
    group.add_argument("--heads", type=int, default=None, help="attention heads")
    bench.set_defaults(func=run_bench)

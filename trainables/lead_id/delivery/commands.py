"""``leadtune label``: which lead each channel of a WFDB record is, and whether its header names
them as recorded (lead identification's own command; see :mod:`.label`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from leadtune.analysis.commands import MODEL_HELP, _mlflow_errors_as_one_line, _record_exists


@_mlflow_errors_as_one_line
def run_label(args: argparse.Namespace) -> int:
    from leadtune.analysis.model_source import load_model
    from leadtune.trainables.lead_id.delivery.label import SCHEMA, label_paths
    from leadtune.trainables.runtime import check_writable

    if args.csv:
        check_writable(Path(args.csv), "--csv", file=True)
    if not any(_record_exists(r) for r in args.records):
        raise FileNotFoundError(
            f"no such record: {', '.join(args.records)}; pass a WFDB record (NAME, NAME.hea) or "
            "a folder of them"
        )
    loaded = load_model(args.model, args.tracking_uri, args.cache_dir)
    if loaded.task != "lead_id":
        raise ValueError(f"{args.model} is a {loaded.task} model; label needs a lead_id model")
    several = len(args.records) > 1 or any(Path(r).is_dir() for r in args.records)
    exclude = tuple(int(x) if x.isdigit() else x for x in (args.exclude or []))
    results, summary = label_paths(
        args.records, loaded, out=sys.stdout, as_json=args.json, exclude=exclude,
        csv_path=Path(args.csv) if args.csv else None,
    )  # fmt: skip
    explanations = _explain_verdicts(results, loaded, exclude) if args.explain else {}
    if args.json:
        objects = [
            {**r.to_json(), **({"explanation": explanations[r.record]}
                               if r.record in explanations else {})}
            for r in results
        ]  # fmt: skip
        objects += [
            {"schema": SCHEMA, "record": name, "error": why} for name, why in summary.failed
        ]
        print(json.dumps(objects if several else objects[0], indent=2))
    if explanations and not args.json:
        from leadtune.trainables.lead_id.delivery.explain import format_evidence

        for record, evidence in explanations.items():
            print(format_evidence(record, evidence))
    if several:
        print(summary.format(), file=sys.stderr if args.json else sys.stdout)
    return summary.exit_code


def _explain_verdicts(results: list, loaded: Any, exclude: tuple) -> dict[str, Any]:
    """``label --explain``: for each record with a suspected swap, each channel's share of the
    verdict's margin (printed unless --json, where it joins the record's object)."""
    from leadtune.analysis.explain import require_captum
    from leadtune.trainables.data.preprocess import PreprocessConfig
    from leadtune.trainables.data.records import read_record
    from leadtune.trainables.lead_id.delivery.explain import verdict_evidence

    flagged = [r for r in results if r.verdict.status == "swap_suspected"]
    if not flagged:
        return {}
    require_captum()
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(False)
    found = {}
    for result in flagged:
        record = read_record(result.record, PreprocessConfig(**loaded.preprocess),
                             require_leads=False, exclude=exclude)  # fmt: skip
        header_leads = [c.header_lead for c in result.channels]
        found[result.record] = verdict_evidence(loaded, record.signal, header_leads, result)
    return found


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    label = subparsers.add_parser(
        "label",
        help="label the leads of WFDB records from their signals; name suspected electrode swaps",
        description="Predict each channel's lead from the waveforms alone (channel names are "
        "never needed), assign leads injectively (Hungarian), and where the header names "
        "leads, test it against the named electrode reversals (LA/RA, LA/LL, RA/LL, precordial "
        "neighbours). A folder is searched recursively for *.hea. Exit status: 0 labelled, no "
        "swap; 1 a swap suspected; 2 a record could not be read; 4 a record could not be "
        "judged (fewer than 3 channels or under 2.5 s of signal: labelled, header not "
        "compared).",
    )
    label.add_argument(
        "records", nargs="+", metavar="RECORD",
        help="WFDB record (.hea/.dat/.mat or name) or folder",
    )  # fmt: skip
    label.add_argument(
        "--model", default=None,
        help=MODEL_HELP + " (default: the bundled model, else models:/lead-id@champion)",
    )  # fmt: skip
    label.add_argument(
        "--exclude", action="append", metavar="NAME|INDEX",
        help="leave out a non-ECG channel (respiration, Frank leads ...), by header name or "
        "0-based index; repeat for several",
    )  # fmt: skip
    label.add_argument(
        "--tracking-uri", default=None,
        help="MLflow URI for models:/ and run ids (default: $MLFLOW_TRACKING_URI, else "
        "runs/search/mlflow.db)",
    )  # fmt: skip
    label.add_argument(
        "--cache-dir", default=None, help="dataset cache root holding the training data's manifest"
    )
    label.add_argument(
        "--json", action="store_true",
        help="JSON on stdout (schema leadtune.label/3): one object per record, a list for several",
    )  # fmt: skip
    label.add_argument("--csv", default=None, metavar="FILE", help="one CSV row per record")
    label.add_argument(
        "--explain", action="store_true",
        help="for each record with a suspected swap, how many nats of the verdict's margin each "
        "channel's signal gave (Integrated Gradients with Captum; JSON: 'explanation')",
    )  # fmt: skip
    label.set_defaults(func=run_label)

"""Diagnosis's part in the delivery commands: ``leadtune evaluate``'s AUROC suite, its
``leadtune explain`` attributions (:mod:`.explain`, Grad-CAM included) and the lead-subsets table
of ``leadtune report``. It sits on top of leadtune (it uses
:mod:`leadtune.analysis` and the search's results), so only the ``leadtune`` command imports it
(see :mod:`leadtune.analysis.delivery`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from leadtune.analysis.delivery import Delivery, Explainer, register_delivery
from leadtune.analysis.suites import evaluation_out, prepared_ptbxl
from leadtune.trainables.tasks import deferred


def auroc_suite(args: argparse.Namespace, loaded: Any, other: Any) -> int:
    """Macro and per-class AUROC and F1 with ECG-level bootstrap intervals, and the Brier score."""
    from leadtune.trainables.diagnosis.delivery.evaluation import (
        evaluate_diagnosis,
        format_markdown,
        write,
    )

    dataset = prepared_ptbxl(args, loaded)
    result = evaluate_diagnosis(loaded, dataset, args.split, min(args.n_boot, 2000), args.seed)
    files = write(result, evaluation_out(args, "model"))
    print(format_markdown(result))
    print(f"written: {files['markdown']}, {files['json']}")
    return 0


def lead_subsets_section(data: Any, out: Path) -> None:
    """A ``lead_subsets`` study's table: every trial's best checkpoint once on the test split."""
    if data.state.get("space") != "lead_subsets":
        return
    from leadtune.search.tracking import mlflow_client
    from leadtune.trainables.diagnosis.delivery import lead_subsets

    print("  evaluating each configuration's models once on the test split ...", file=sys.stderr)
    table = lead_subsets.lead_subsets_table(
        data.search_dir, data.state, mlflow_client(data.tracking_uri)
    )
    records = f"{data.state.get('data_source')}, labelled test ECGs"
    files = lead_subsets.write(table, out / "lead_subsets", records)
    print(lead_subsets.format_markdown(table, records))
    print(f"  lead-subsets table: {files['markdown']}, {files['csv']}, plot {files['plot']}")


def _explain() -> Any:
    """The explainer's module (Captum, figures), on first use."""
    from leadtune.trainables.diagnosis.delivery import explain

    return explain


DELIVERY = register_delivery(
    Delivery(
        "diagnosis",
        suites={"auroc": auroc_suite},
        report_sections=(lead_subsets_section,),
        explainer=Explainer(
            methods=("gradient_shap", "integrated_gradients", "saliency", "grad_cam"),
            record=deferred(lambda: _explain().explain_record),
            split=deferred(lambda: _explain().explain_split),
            keep_rows=deferred(lambda: _explain().with_labels),
        ),
    )
)

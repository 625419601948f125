"""Lead identification's part in the delivery commands: ``leadtune evaluate``'s paper and
labelling suites, ``leadtune label`` (:mod:`.commands`), its ``leadtune explain`` attributions
(:mod:`.explain`), and the bundled model's maker (:mod:`.bundle`). It sits on top of leadtune (it uses :mod:`leadtune.analysis`), so only the
``leadtune`` command imports it (see :mod:`leadtune.analysis.delivery`)."""

from __future__ import annotations

import argparse
from typing import Any

from leadtune.analysis.delivery import Delivery, Explainer, register_delivery
from leadtune.analysis.suites import evaluation_out, prepared_ptbxl
from leadtune.trainables.tasks import deferred


def paper_suite(args: argparse.Namespace, loaded: Any, other: Any) -> int:
    """The paper's statistics (lead and set accuracy, per-lead recall, McNemar with --compare)."""
    from leadtune.trainables.lead_id.delivery.evaluation import (
        evaluate_model,
        format_summary,
        write_evaluation,
    )

    dataset = prepared_ptbxl(args, loaded)
    result, arrays = evaluate_model(
        loaded, dataset, split=args.split, n_boot=args.n_boot, seed=args.seed, compare=other
    )
    files = write_evaluation(result, arrays, evaluation_out(args, "bundled"))
    print(format_summary(result))
    print(f"written: {files['markdown']}, {files['json']} (+ confusion PNGs, predictions.npz)")
    return 0


def labelling_suite(args: argparse.Namespace, loaded: Any, other: Any) -> int:
    """Accuracy by number of leads shown, reversal detection and false alarms, other recorders."""
    from leadtune.trainables.lead_id.delivery.labelling_study import (
        format_markdown,
        run_labelling_study,
        write_study,
    )

    dataset = prepared_ptbxl(args, loaded)
    result = run_labelling_study(
        loaded, dataset, args.split, n_boot=min(args.n_boot, 2000), seed=args.seed,
        threshold=args.swap_threshold,
    )  # fmt: skip
    files = write_study(result, evaluation_out(args, "bundled", "labelling"))
    print(format_markdown(result))
    print(f"written: {files['markdown']}, {files['json']}")
    return 0


def _explain() -> Any:
    """The explainer's module (Captum, figures), on first use."""
    from leadtune.trainables.lead_id.delivery import explain

    return explain


DELIVERY = register_delivery(
    Delivery(
        "lead_id",
        suites={"paper": paper_suite, "labelling": labelling_suite},
        compare=("paper",),
        explainer=Explainer(
            methods=("gradient_shap", "integrated_gradients", "saliency"),
            record=deferred(lambda: _explain().explain_record),
            split=deferred(lambda: _explain().explain_split),
        ),
    )
)

"""Make the model that ships with leadtune: ``python -m leadtune.trainables.lead_id.delivery.bundle CHECKPOINT``.

From a trained lead-identification checkpoint and the data it was trained on, this writes a model
package (``leadtune-model.json`` + float16 ``weights.pt``, no code) and its model card to
``data/models/lead-id/`` (``leadtune.bundled``), after measuring everything the card states:

1. the swap-verdict thresholds, one per hypothesis (each named reversal, "pair" and "other"),
   chosen on the validation split for an expected 1 % false alarms on new untouched records
   (``labelling_study.choose_thresholds``), with the detection they give there;
2. on the test split, once: the paper's statistics (lead and set accuracy, argmax and Hungarian,
   with intervals; per-lead recall) and the labelling study (accuracy by number of leads shown,
   reversal detection and false alarms at those thresholds, other recorders);
3. that the float16 weights label the test split as the trained float32 weights do.

Every figure in the card comes from this run; the command is printed in the card.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from leadtune.trainables.lead_id.delivery.labelling_study import FALSE_ALARM_TARGET

LICENCE_FROM_RELEASE = (
    "MIT (fine-tuned from the reference paper's released model, copyright Nathan Macdonald "
    "2025; LICENSE in this folder) and CC BY 4.0 (PTB-XL 1.0.3, Wagner et al. 2020)"
)


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def _ci(values: list[float]) -> str:
    return f"[{100 * values[0]:.2f}-{100 * values[1]:.2f}]"


def model_card(card: dict[str, Any]) -> str:
    """The bundled model's card (Markdown)."""
    from leadtune.trainables.lead_id.delivery.labelling_study import format_markdown

    test, cfg, paper = card["test"], card["config"], card["test"]["paper"]
    lines = [
        "# leadtune's bundled lead-identification model",
        "",
        "Given the unordered waveforms of an ECG, it says which lead each one is (I, II, III, "
        "aVR, aVL, aVF, V1-V6). It is the default model of `leadtune label`, `evaluate` and "
        "`export`.",
        "",
        "## Data and licence",
        "",
        f"Trained on the {card['data']['train_records']:,} training ECGs (folds 1-8) of the "
        f"shared PTB-XL subset ({card['data']['source_name']}), selected on its "
        f"{card['data']['val_records']} validation ECGs (fold 9), evaluated once on its "
        f"{card['data']['test_records']} test ECGs (fold 10). PTB-XL 1.0.3: Wagner et al., "
        "*PTB-XL, a large publicly available electrocardiography dataset*, Scientific Data 7, "
        "154 (2020), PhysioNet; licensed CC BY 4.0.",
        "",
        *_origin_lines(card),
        f"Licence: {card.get('licence', 'CC BY 4.0 (derived from PTB-XL 1.0.3)')}.",
        "",
        f"Input: 10 s at {card['fs']} Hz in mV, high-passed as in training "
        f"({card['preprocessing_text']}); any K <= 12 channels in any order.",
        "",
        "## Model and training",
        "",
        f"`{cfg['encoder']}` encoder + `{cfg['context']}` context x{cfg['depth']} "
        f"({cfg['heads']} heads, D = {cfg['d_model']}), {card['parameters']:,} parameters; "
        f"{cfg['epochs']} epochs, AdamW lr {cfg['lr']:g}, weight decay {cfg['weight_decay']:g}, "
        f"batch {cfg['batch_size']}, dropout {cfg['dropout']:g}. Augmentation: lead order "
        f"shuffled, jitter (p {cfg['jitter_prob']:g}, sigma <= {cfg['jitter_sigma_max']:g} mV), "
        f"gain up to x{1 + cfg['gain_max']:g}, time shift up to {cfg['roll_max']} samples, "
        f"low-pass 15-45 Hz on {100 * cfg['lowpass_prob']:g} % of ECGs, random lead subsets "
        f"(>= {cfg['subset_min_leads']} leads) on {100 * cfg['subset_prob']:g} % of ECGs. "
        f"Checkpoint: epoch {card['epoch']} (best validation loss "
        f"{card['validation']['val_loss']:.4f}). Weights stored as float16 "
        f"({card['weights_check']}).",
        "",
        f"## Test split (fold 10, {test['records']} ECGs)",
        "",
        "| | lead accuracy [95 % CI] | set accuracy [95 % CI] |",
        "|---|---|---|",
    ]
    for method in ("argmax", "hungarian"):
        row = paper[method]
        lines.append(
            f"| {method} | {_pct(row['lead_accuracy'])} {_ci(row['lead_accuracy_ci'])} | "
            f"{_pct(row['set_accuracy'])} {_ci(row['set_accuracy_ci'])} |"
        )
    recall = paper["hungarian"]["per_lead_recall"]
    lines += [
        "",
        "Per-lead recall (Hungarian): "
        + ", ".join(f"{lead} {100 * r:.1f}" for lead, r in zip(paper["labels"], recall)),
        "",
        "Lead-accuracy intervals: ECG-level bootstrap (10,000 resamples); set accuracy: Wilson.",
        "",
        format_markdown(test["labelling"]).split("\n", 2)[2],
        *_baseline_lines(card),
        "## What it was not validated on",
        "",
        "- Recordings from other hospitals and devices: only simulated here (gains, noise, "
        "filters, resampling of PTB-XL records); the figures above are PTB-XL's.",
        "- Paediatric ECGs, pacemaker rhythms beyond those in the subset, and records with "
        "several simultaneous reversals.",
        "- Leads other than the standard 12 (Frank leads, EASI, Mason-Likar placement): exclude "
        "such channels with `leadtune label --exclude`.",
        "- The swap thresholds (per hypothesis, in the reversal table above) were chosen on the "
        f"validation split for an expected {100 * card.get('false_alarm_target', 0.01):g} % "
        "false alarms on new records (false alarms there "
        f"{_pct(card['validation_labelling']['untouched']['false_alarms'])}); other populations "
        "may need others.",
        "",
        "## Reproduce",
        "",
        "```bash",
        card["train_command"],
        card["command"],
        "```",
        "",
        f"Made {card['made']} with leadtune {card['versions']['leadtune']}, torch "
        f"{card['versions']['torch']}.",
    ]
    return "\n".join(lines) + "\n"


def twelve_lead_correct(loaded: Any, signals: np.ndarray) -> dict[str, np.ndarray]:
    """(N, 12) correctness of each lead's label, argmax and Hungarian, 12 leads in order."""
    from leadtune.trainables.lead_id import metrics
    from leadtune.trainables.lead_id.delivery.evaluation import predict

    log_probs = predict(loaded.model, signals)
    true = np.broadcast_to(np.arange(log_probs.shape[1]), log_probs.shape[:2])
    return {
        "argmax": metrics.correct_leads(metrics.argmax_assign(log_probs), true),
        "hungarian": metrics.correct_leads(metrics.hungarian_assign(log_probs), true),
    }


def paired_comparison(model: Any, baseline: Any, signals: np.ndarray) -> dict[str, Any]:
    """Lead accuracy of both models at 12 leads and McNemar's exact test on lead-level
    correctness (b: leads only the model gets right, c: only the baseline)."""
    from leadtune.trainables.lead_id import metrics

    ours, theirs = twelve_lead_correct(model, signals), twelve_lead_correct(baseline, signals)
    found = {}
    for method in ("argmax", "hungarian"):
        test = metrics.mcnemar_exact(ours[method], theirs[method])
        found[method] = {
            "model": float(ours[method].mean()),
            "baseline": float(theirs[method].mean()),
            "only_model_right": test.b,
            "only_baseline_right": test.c,
            "p_exact": test.p_value,
        }
    return found


def baseline_results(reference: Any, name: str, dataset: Any, false_alarm_target: float,
                     n_boot: int) -> dict[str, Any]:  # fmt: skip
    """The baseline's own side of the comparison (its swap thresholds chosen on validation, the
    paper's statistics and the labelling study on the test split), kept in the dataset's cache
    folder: it does not depend on the model being bundled, so a second bundle run reuses it
    (and it can be computed ahead, ``--baseline-only``)."""
    import hashlib

    from leadtune.trainables.lead_id.delivery.evaluation import evaluate_model
    from leadtune.trainables.lead_id.delivery.labelling_study import (
        choose_thresholds,
        run_labelling_study,
        score_reversals,
    )

    weights = Path(name) / "weights.pt"
    key = json.dumps(
        [str(Path(name).resolve()), weights.stat().st_mtime_ns if weights.is_file() else 0,
         dataset.fingerprint, false_alarm_target, n_boot],
    )  # fmt: skip
    cache = Path(dataset.path) / f"baseline-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.is_file():
        print(f"[bundle] the baseline's figures from {cache}", file=sys.stderr)
        return json.loads(cache.read_text())
    print(f"[bundle] the baseline {name}: thresholds on validation, test split ...",
          file=sys.stderr)  # fmt: skip
    val = np.ascontiguousarray(dataset.signals[dataset.indices("val")], dtype=np.float32)
    threshold = choose_thresholds(score_reversals(reference, val), target=false_alarm_target)
    found = {
        "swap_thresholds_nats": threshold,
        "test_paper": evaluate_model(reference, dataset, split="test", n_boot=n_boot, seed=0)[0][
            "statistics"
        ],  # fmt: skip
        "test_labelling": run_labelling_study(
            reference, dataset, "test", n_boot=n_boot, threshold=threshold
        ),
    }
    cache.write_text(json.dumps(found, default=str))
    return found


def worse_than_baseline(comparison: dict[str, Any], alpha: float = 0.05) -> bool:
    """The shipping rule: the model is worse only where it is less accurate (Hungarian, 12
    leads) and McNemar's exact test says so at ``alpha``."""
    row = comparison["hungarian"]
    return row["model"] < row["baseline"] and row["p_exact"] < alpha


def _origin_lines(card: dict[str, Any]) -> list[str]:
    origin = card.get("origin") or {}
    if not origin.get("study"):
        return []
    return [
        f"Where the weights come from: the reference paper's released model (`leadtune import "
        f"thesis-siglabv2`, MIT), fine-tuned by the leadtune search `{origin['study']}`, trial "
        f"`{origin.get('trial')}`, whose settings are those below; the trial was chosen on the "
        "validation split only, and the test split was used once, for the figures here.",
        "",
    ]


def _side_by_side(label: str, mine: dict, base: dict, key: str) -> str:
    """One table row: a figure with its interval for this model and for the baseline."""
    return (
        f"| {label} | {_pct(mine[key])} {_ci(mine[key + '_ci'])} | {_pct(base[key])} "
        f"{_ci(base[key + '_ci'])} |"
    )


def _baseline_lines(card: dict[str, Any]) -> list[str]:
    """This model and the baseline side by side on the test split."""
    versus = card.get("baseline")
    if not versus:
        return []
    ours, theirs = card["test"]["labelling"], versus["test_labelling"]
    lines = [
        f"## Side by side with {versus['model']} (test split, once)",
        "",
        "| | this model | baseline |",
        "|---|---|---|",
    ]
    for method in ("hungarian", "argmax"):
        mine, base = card["test"]["paper"][method], versus["test_paper"][method]
        for stat in ("lead", "set"):
            lines.append(_side_by_side(f"12 leads, {stat} accuracy ({method})", mine, base,
                                       f"{stat}_accuracy"))  # fmt: skip
    for section, label in (("by_lead_set", "{} leads shown (Hungarian)"),
                           ("other_recorders", "{} (12 leads)")):  # fmt: skip
        for name, row in ours[section].items():
            lines.append(_side_by_side(label.format(name), row, theirs[section][name],
                                       "lead_accuracy"))  # fmt: skip
    a, b = ours["reversals"], theirs["reversals"]
    lines.append(
        f"| false alarms on untouched records | {_pct(a['untouched']['false_alarms'])} | "
        f"{_pct(b['untouched']['false_alarms'])} |"
    )
    for key, row in a["reversals"].items():
        lines.append(
            f"| {row['name']} detected | {_pct(row['detected'])} | "
            f"{_pct(b['reversals'][key]['detected'])} |"
        )
    lines.append("")
    for split in ("validation_12_leads", "test_12_leads"):
        row = versus[split]["hungarian"]
        lines.append(
            f"- {split.split('_')[0]}, 12 leads (Hungarian): exact McNemar p = "
            f"{row['p_exact']:.3g} ({row['only_model_right']} leads only this model labels "
            f"right, {row['only_baseline_right']} only the baseline)."
        )
    lines += [
        f"- Swap thresholds of each model chosen on validation for an expected "
        f"{100 * card.get('false_alarm_target', 0.01):g} % false alarms.",
        "",
    ]
    return lines


def bundle(checkpoint: Path, source: Path, out: Path, train_command: str, n_boot: int,
           false_alarm_target: float = FALSE_ALARM_TARGET, baseline: str | None = None,
           origin: dict[str, Any] | None = None, force: bool = False) -> dict:  # fmt: skip
    import shutil

    import torch

    from leadtune.analysis.model_source import find_preprocess, load_model
    from leadtune.trainables.data.cache import prepare_dataset
    from leadtune.trainables.data.preprocess import PreprocessConfig
    from leadtune.trainables.lead_id.delivery.evaluation import evaluate_model
    from leadtune.trainables.lead_id.delivery.labelling_study import (
        choose_thresholds,
        detection,
        run_labelling_study,
        score_reversals,
    )
    from leadtune.trainables.lead_id.models import count_parameters
    from leadtune.trainables.model_package import load_package, portable_paths, write_package

    loaded = load_model(str(checkpoint))
    preprocess, _ = find_preprocess(loaded.fingerprint, loaded.fs)
    dataset = prepare_dataset(source, preprocess=PreprocessConfig(**preprocess), progress=False)
    if dataset.fingerprint != loaded.fingerprint:
        raise ValueError(f"{source} is not the data {checkpoint} was trained on")

    val_rows = dataset.indices("val")
    val = np.ascontiguousarray(dataset.signals[val_rows], dtype=np.float32)
    reference = load_model(baseline) if baseline else None
    gate = None
    if reference is not None:
        print(f"[bundle] 12 leads on validation against {baseline} ...", file=sys.stderr)
        gate = paired_comparison(loaded, reference, val)
        row = gate["hungarian"]
        verdict = (
            f"validation 12-lead accuracy (Hungarian) {_pct(row['model'])} against "
            f"{_pct(row['baseline'])}, exact McNemar p = {row['p_exact']:.3g} "
            f"({row['only_model_right']} leads only it gets right, "
            f"{row['only_baseline_right']} only the baseline)"
        )
        print(f"[bundle] {verdict}", file=sys.stderr)
        if worse_than_baseline(gate) and not force:
            raise ValueError(f"not shipped: worse than the baseline at 12 leads: {verdict}")

    print("[bundle] choosing the swap thresholds on the validation split ...", file=sys.stderr)
    val_scored = score_reversals(loaded, val)
    threshold = choose_thresholds(val_scored, target=false_alarm_target)
    on_val = detection(val_scored, threshold)
    loaded.card["labelling"] = {"swap_thresholds_nats": threshold}

    print("[bundle] evaluating once on the test split ...", file=sys.stderr)
    paper = evaluate_model(loaded, dataset, split="test", n_boot=n_boot, seed=0)[0]["statistics"]
    labelling = run_labelling_study(loaded, dataset, "test", n_boot=n_boot, threshold=threshold)
    versus = None
    if reference is not None:
        test_rows = dataset.indices("test")
        test_signals = np.ascontiguousarray(dataset.signals[test_rows], dtype=np.float32)
        versus = {
            "model": baseline,
            "validation_12_leads": gate,
            "test_12_leads": paired_comparison(loaded, reference, test_signals),
            **baseline_results(reference, baseline, dataset, false_alarm_target, n_boot),
        }

    pre = loaded.preprocess
    card = {
        "made": time.strftime("%Y-%m-%d"),
        "fs": loaded.fs,
        "preprocessing_text": (
            f"Butterworth high-pass {pre['highpass_hz']} Hz order {pre['highpass_order']}, "
            + ("zero-phase" if pre.get("zero_phase") else "causal")
            if pre.get("highpass_hz")
            else "no high-pass"
        ),
        "config": loaded.config_dict(),
        "parameters": count_parameters(loaded.model),
        "epoch": loaded.card.get("epoch"),
        "validation": loaded.card.get("validation_metrics", {}),
        "data": {
            "source_name": "PTB-XL 1.0.3 subset of 2,992 records",
            "train_records": int(len(dataset.indices("train"))),
            "val_records": int(len(val_rows)),
            "test_records": int(len(dataset.indices("test"))),
            "fingerprint": dataset.fingerprint,
        },
        "swap_thresholds_nats": threshold,
        "false_alarm_target": false_alarm_target,
        "validation_labelling": on_val,
        "test": {"records": paper["n_ecgs"], "paper": paper, "labelling": labelling},
        "baseline": versus,
        "origin": origin or {},
    }
    facts = {
        "data": {"fingerprint": loaded.fingerprint, "fs": loaded.fs, "source": "PTB-XL subset"},
        "preprocessing": dict(pre),
        "epoch": card["epoch"],
        "validation_metrics": card["validation"],
        "test_metrics": {
            f"test_{key}": paper[method][stat]
            for method, key, stat in (
                ("argmax", "lead_accuracy", "lead_accuracy"),
                ("argmax", "set_accuracy", "set_accuracy"),
                ("hungarian", "lead_accuracy_hungarian", "lead_accuracy"),
                ("hungarian", "set_accuracy_hungarian", "set_accuracy"),
            )
        },
        "labelling": {
            "swap_thresholds_nats": threshold,
            "chosen_on": f"validation split, an expected {100 * false_alarm_target:g} % false "
            "alarms on untouched records",
        },  # fmt: skip
        "licence": LICENCE_FROM_RELEASE
        if reference is not None and (Path(baseline) / "LICENSE").is_file()
        else "CC BY 4.0 (derived from PTB-XL 1.0.3, Wagner et al. 2020)",
        "origin": origin or {},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_package(out, "lead_id", loaded.config_dict(), loaded.model.state_dict(), facts,
                  half=True)  # fmt: skip
    if reference is not None and (Path(baseline) / "LICENSE").is_file():
        shutil.copyfile(Path(baseline) / "LICENSE", out / "LICENSE")
    card["licence"] = facts["licence"]
    half_model, _, _ = load_package(out)
    card["weights_check"] = _compare(loaded.model, half_model, dataset)
    from leadtune import __version__

    card["versions"] = {"leadtune": __version__, "torch": torch.__version__.split("+")[0]}
    card["train_command"] = train_command
    card["command"] = shlex.join(
        ["python", "-m", "leadtune.trainables.lead_id.delivery.bundle", *sys.argv[1:]]
    )
    card = portable_paths(card)
    (out / "MODEL_CARD.md").write_text(model_card(card))
    (out / "card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    return card


def _compare(full: Any, half: Any, dataset: Any) -> str:
    """How the float16 weights label the test split against the trained float32 weights."""
    from leadtune.trainables.lead_id import metrics
    from leadtune.trainables.lead_id.delivery.evaluation import predict

    rows = dataset.indices("test")
    signals = np.ascontiguousarray(dataset.signals[rows], dtype=np.float32)
    a, b = predict(full, signals), predict(half, signals)
    same = float((metrics.hungarian_assign(a) == metrics.hungarian_assign(b)).mean())
    return (
        f"test-split labels identical to the float32 weights' for {100 * same:.2f} % of leads; "
        f"largest log-probability difference {float(np.abs(a - b).max()):.1e}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m leadtune.trainables.lead_id.delivery.bundle",
        description="Write the bundled lead-identification model and its card from a checkpoint.",
    )
    parser.add_argument("checkpoint", type=Path, help="the trained model's checkpoint folder")
    parser.add_argument("--source", type=Path, required=True, help="the PTB-XL folder it used")
    parser.add_argument("--train-command", required=True, help="how the checkpoint was trained")
    parser.add_argument("--n-boot", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None, help="default: leadtune.bundled")
    parser.add_argument("--false-alarm-target", type=float, default=FALSE_ALARM_TARGET,
                        help="expected false alarms on untouched records the swap thresholds "
                        "are chosen for on validation (default: %(default)s)")  # fmt: skip
    parser.add_argument("--baseline", default=None, help="a model to compare with side by side "
                        "(e.g. data/models/thesis-siglabv2); the checkpoint is written only if "
                        "it is not worse at 12 leads on validation (exact McNemar)")  # fmt: skip
    parser.add_argument("--study", default=None, help="the search the checkpoint came from")
    parser.add_argument("--trial", default=None, help="its trial id in that search")
    parser.add_argument("--force", action="store_true", help="write even if worse than --baseline")
    parser.add_argument("--baseline-only", action="store_true",
                        help="only measure --baseline's side now (kept for the bundle run)")  # fmt: skip
    args = parser.parse_args()
    from leadtune.analysis.model_source import bundled_model_dir
    from leadtune.trainables import runtime

    # Thousands of forward passes: the same allocator settings as `leadtune evaluate` (without
    # them this machine spent most of the time in page faults, about 10x slower).
    if runtime.should_reexec("evaluate"):
        runtime.reexec_with_allocator_settings(
            sys.argv[1:], module="leadtune.trainables.lead_id.delivery.bundle"
        )

    if args.baseline_only:
        from leadtune.analysis.model_source import load_model
        from leadtune.trainables.data.cache import prepare_dataset

        if not args.baseline:
            parser.error("--baseline-only needs --baseline")
        dataset = prepare_dataset(args.source, progress=False)
        baseline_results(load_model(args.baseline), args.baseline, dataset,
                         args.false_alarm_target, args.n_boot)  # fmt: skip
        return 0
    origin = {"study": args.study, "trial": args.trial} if args.study else None
    try:
        bundle(
            args.checkpoint, args.source, args.out or bundled_model_dir(), args.train_command,
            args.n_boot, args.false_alarm_target, args.baseline, origin, args.force,
        )  # fmt: skip
    except ValueError as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return 3
    print(f"written: {args.out or bundled_model_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

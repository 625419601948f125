"""`leadtune evaluate`: the paper's statistics for one model on one split, optionally against another.

Leads are fed in a fixed order (the model's own lead order, i.e. the identity permutation). That is
valid because every layer of the model is permutation-equivariant; :func:`permutation_check`
measures it on a few ECGs and the result is stored with the statistics.

Outputs (in ``--out``): ``evaluation.json`` (every number), ``evaluation.md`` (readable, with the
paper's Table I layout: per-lead recall overall and per diagnostic superclass), confusion-matrix
PNGs, and ``predictions.npz`` (log-probabilities and labels per ECG, to recompute anything).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from leadtune.trainables.lead_id import metrics

METHODS = ("argmax", "hungarian")
LEAD_ORDER_NOTE = (
    "Leads were fed in the model's own lead order (identity permutation). The model is "
    "permutation-equivariant (no positional encoding across leads), so this order does not change "
    "its predictions; the permutation check below measures it."
)


def predict(model: Any, signals: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Log-probabilities (N, K, M) on CPU, in fp32."""
    import torch

    from leadtune.trainables.lead_id.train import predict_log_probs

    return predict_log_probs(model, signals, torch.device("cpu"), batch_size=batch_size)


def permutation_check(model: Any, signals: np.ndarray, seed: int = 0, n: int = 16) -> float:
    """Max |f(P x) - P f(x)| over the log-probabilities of up to n ECGs, one random P per ECG."""
    if len(signals) == 0:
        return 0.0
    x = np.ascontiguousarray(signals[:n])
    rng = np.random.default_rng(seed)
    order = np.stack([rng.permutation(x.shape[1]) for _ in range(len(x))])
    shuffled = np.take_along_axis(x, order[:, :, None], axis=1)
    direct = predict(model, x)
    permuted = predict(model, np.ascontiguousarray(shuffled))
    expected = np.take_along_axis(direct, order[:, :, None], axis=1)
    return float(np.max(np.abs(permuted - expected)))


def _recall_cell(successes: int, total: int, z: float) -> dict[str, Any]:
    lower, upper = metrics.wilson_interval(successes, total, z)
    return {
        "recall": None if total == 0 else successes / total,
        "ci": None if total == 0 else [lower, upper],
        "correct": int(successes),
        "total": int(total),
    }


def superclass_table(
    pred: np.ndarray,
    true: np.ndarray,
    leads: tuple[str, ...],
    superclasses: np.ndarray,
    labelled: np.ndarray,
    classes: tuple[str, ...],
    z: float = 1.96,
) -> dict[str, Any]:
    """Per-lead recall with Wilson intervals: overall, then per diagnostic superclass.

    The paper's Table I layout: rows are leads, columns "overall" (every ECG of the split) and
    one per superclass (the labelled ECGs carrying it; an ECG may count in several).
    """
    columns = {"overall": np.ones(len(true), dtype=bool)}
    for j, name in enumerate(classes):
        columns[name] = labelled & superclasses[:, j]
    table: dict[str, Any] = {"columns": list(columns), "n_ecgs": {}, "rows": {}}
    for column, rows in columns.items():
        table["n_ecgs"][column] = int(rows.sum())
        successes, totals = metrics.per_lead_counts(pred[rows], true[rows], len(leads))
        for k, lead in enumerate(leads):
            table["rows"].setdefault(lead, {})[column] = _recall_cell(successes[k], totals[k], z)
    return table


def _columns_for(leads: tuple[str, ...], data_leads: tuple[str, ...], source: str) -> np.ndarray:
    missing = [lead for lead in leads if lead not in data_leads]
    if missing:
        raise ValueError(
            f"{source}: the model expects lead(s) {', '.join(missing)} that the dataset lacks; "
            "evaluate on a dataset with all of the model's leads"
        )
    return np.array([data_leads.index(lead) for lead in leads])


def _check_inputs(loaded: Any, dataset: Any) -> list[str]:
    """Refuse data at another rate; note other preprocessing or other training data."""
    if int(dataset.fs) != int(loaded.fs):
        raise ValueError(
            f"{dataset.path}: data at {dataset.fs} Hz but the model {loaded.source} expects "
            f"{loaded.fs} Hz; prepare the data at the model's rate"
        )
    notes = []
    data_pre = dataset.manifest.get("settings", {}).get("preprocess", {})
    model_pre = {k: loaded.preprocess.get(k) for k in data_pre}
    if data_pre and model_pre != data_pre:
        notes.append(
            f"preprocessing differs from the model's ({loaded.preprocess_origin}): data "
            f"{data_pre}, model {model_pre}"
        )
    if loaded.fingerprint not in ("unknown", str(dataset.fingerprint)):
        notes.append(
            f"the model was trained on other data (fingerprint {loaded.fingerprint[:12]}, this "
            f"dataset {str(dataset.fingerprint)[:12]}); the split still follows the official folds"
        )
    return notes


def evaluate_model(
    loaded: Any,
    dataset: Any,
    split: str = "test",
    n_boot: int = 10_000,
    seed: int = 0,
    compare: Any | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(statistics as a JSON-ready dict, prediction arrays) of a loaded model on one split."""
    from leadtune.trainables.data.ptbxl import SUPERCLASSES

    started = time.perf_counter()
    notes = _check_inputs(loaded, dataset)
    rows = dataset.indices(split)
    if len(rows) == 0:
        raise ValueError(f"{dataset.path}: the {split!r} split holds no records")
    data_leads = tuple(dataset.leads)
    leads = tuple(loaded.leads)
    signals = np.ascontiguousarray(
        dataset.signals[rows][:, _columns_for(leads, data_leads, str(dataset.path))]
    )
    log_probs = predict(loaded.model, signals)
    true = np.broadcast_to(np.arange(len(leads)), log_probs.shape[:2]).copy()
    summary = metrics.summarize(log_probs, true, n_boot=n_boot, seed=seed, label_names=leads)
    preds = {
        "argmax": metrics.argmax_assign(log_probs),
        "hungarian": metrics.hungarian_assign(log_probs),
    }
    labelled = np.asarray(dataset.labelled)[rows]
    superclasses = np.asarray(dataset.superclasses)[rows]
    tables = {
        method: superclass_table(
            preds[method], true, leads, superclasses, labelled, SUPERCLASSES, summary["z"]
        )
        for method in METHODS
    }
    result: dict[str, Any] = {
        "model": {
            "source": loaded.source,
            "kind": loaded.kind,
            "leads": list(leads),
            "fs": loaded.fs,
            "fingerprint": loaded.fingerprint,
            "config": loaded.config_dict(),
        },
        "data": {
            "source": str(dataset.manifest.get("source", "")),
            "cache": str(dataset.path),
            "fingerprint": str(dataset.fingerprint),
            "split": split,
            "n_ecgs": int(len(rows)),
            "n_labelled": int(labelled.sum()),
            "preprocess": dataset.manifest.get("settings", {}).get("preprocess", {}),
        },
        "lead_order": LEAD_ORDER_NOTE,
        "permutation_check": {
            "max_abs_diff_log_prob": permutation_check(loaded.model, signals, seed),
            "n_ecgs": int(min(16, len(signals))),
        },
        "statistics": summary,
        "table1": tables,
        "compare": None,
        "notes": notes + list(loaded.notes),
    }
    arrays = {
        "ecg_ids": np.asarray(dataset.ecg_ids)[rows],
        "log_probs": log_probs.astype(np.float32),
        "true": true,
        "pred_argmax": preds["argmax"],
        "pred_hungarian": preds["hungarian"],
        "leads": np.array(leads),
    }
    if compare is not None:
        result["compare"], other_arrays = compare_models(
            leads, preds, compare, dataset, rows, data_leads
        )
        arrays.update(other_arrays)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result, arrays


def _correct_by_lead(pred: np.ndarray, leads: tuple[str, ...], common: list[str]) -> np.ndarray:
    """(N, len(common)) bool: the lead in slot `lead` got its own label (slot order = leads)."""
    columns = [leads.index(lead) for lead in common]
    return pred[:, columns] == np.array(columns)[None, :]


def compare_models(
    leads: tuple[str, ...],
    preds: dict[str, np.ndarray],
    other: Any,
    dataset: Any,
    rows: np.ndarray,
    data_leads: tuple[str, ...],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """McNemar's test (A = the evaluated model, B = other) on paired lead-level correctness.

    Both models see the same ECGs; the pairs are (ECG, lead) for the leads both models know.
    """
    if int(other.fs) != int(dataset.fs):
        raise ValueError(
            f"--compare {other.source} expects {other.fs} Hz but the data is at {dataset.fs} Hz; "
            "compare models trained at the same sampling rate"
        )
    other_leads = tuple(other.leads)
    common = [lead for lead in leads if lead in other_leads]
    if not common:
        raise ValueError(f"--compare {other.source} shares no lead with the evaluated model")
    signals = np.ascontiguousarray(
        dataset.signals[rows][:, _columns_for(other_leads, data_leads, str(dataset.path))]
    )
    log_probs = predict(other.model, signals)
    other_preds = {
        "argmax": metrics.argmax_assign(log_probs),
        "hungarian": metrics.hungarian_assign(log_probs),
    }
    out: dict[str, Any] = {
        "other": {"source": other.source, "kind": other.kind, "leads": list(other_leads)},
        "leads_compared": common,
        "pairs": int(len(rows) * len(common)),
    }
    arrays = {"other_log_probs": log_probs.astype(np.float32)}
    for method in METHODS:
        mine = _correct_by_lead(preds[method], leads, common)
        theirs = _correct_by_lead(other_preds[method], other_leads, common)
        test = metrics.mcnemar(mine, theirs)
        out[method] = {
            "lead_accuracy_model": float(mine.mean()),
            "lead_accuracy_other": float(theirs.mean()),
            "b_only_model_correct": test.b,
            "c_only_other_correct": test.c,
            "statistic": test.statistic,
            "p_value": test.p_value,
        }
        arrays[f"other_pred_{method}"] = other_preds[method]
    return out, arrays


# -- output --------------------------------------------------------------------------------------


def _pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def _pct_ci(value: float | None, ci: list[float | None] | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if not ci or ci[0] is None:
        return _pct(value, digits)
    return f"{_pct(value, digits)} [{_pct(ci[0], digits)}–{_pct(ci[1], digits)}]"


def format_markdown(result: dict[str, Any], files: dict[str, str] | None = None) -> str:
    stats = result["statistics"]
    data = result["data"]
    model = result["model"]
    lines = [
        f"# Evaluation of {model['source']}",
        "",
        f"- data: {data['source']} (cache {data['cache']}), split **{data['split']}**, "
        f"{data['n_ecgs']} ECGs ({data['n_labelled']} with SCP labels)",
        f"- model: {model['kind']}, leads {', '.join(model['leads'])}, {model['fs']} Hz, "
        f"trained on data {model['fingerprint'][:12]}",
        f"- lead order: {result['lead_order']}",
        f"- permutation check: max |Δ log-probability| = "
        f"{result['permutation_check']['max_abs_diff_log_prob']:.2e} over "
        f"{result['permutation_check']['n_ecgs']} ECGs with shuffled leads",
        f"- intervals: lead accuracy ECG-level bootstrap ({stats['n_boot']} resamples, "
        f"percentile {100 * (1 - stats['alpha']):.0f} %); set accuracy and recall Wilson "
        f"(z = {stats['z']})",
        "",
        "| labelling | lead accuracy % [95 % CI] | set accuracy % [95 % CI] | leads | sets |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        s = stats[method]
        lines.append(
            f"| {method} | {_pct_ci(s['lead_accuracy'], s['lead_accuracy_ci'])} | "
            f"{_pct_ci(s['set_accuracy'], s['set_accuracy_ci'])} | "
            f"{s['leads_correct']}/{s['leads_present']} | {s['sets_correct']}/{s['sets_total']} |"
        )
    h = stats["hungarian_vs_argmax"]
    lines += [
        "",
        f"Hungarian vs argmax (McNemar, same model): b = {h['b']}, c = {h['c']}, "
        f"χ² = {h['statistic']:.3f}, p = {h['p_value']:.3g}",
    ]
    for method in METHODS:
        table = result["table1"][method]
        columns = table["columns"]
        lines += [
            "",
            f"## Per-lead recall % [95 % Wilson CI], {method} (Table I layout)",
            "",
            "| lead | " + " | ".join(f"{c} (n={table['n_ecgs'][c]})" for c in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for lead, cells in table["rows"].items():
            lines.append(
                f"| {lead} | "
                + " | ".join(_pct_ci(cells[c]["recall"], cells[c]["ci"], 1) for c in columns)
                + " |"
            )
    compare = result.get("compare")
    if compare:
        lines += [
            "",
            f"## Comparison with {compare['other']['source']} (McNemar, paired lead-level)",
            "",
            f"{compare['pairs']} (ECG, lead) pairs over leads {', '.join(compare['leads_compared'])}; "
            "b = only this model correct, c = only the other correct; χ² with continuity "
            "correction.",
            "",
            "| labelling | lead acc. this % | lead acc. other % | b | c | χ² | p |",
            "|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            c = compare[method]
            lines.append(
                f"| {method} | {_pct(c['lead_accuracy_model'])} | {_pct(c['lead_accuracy_other'])}"
                f" | {c['b_only_model_correct']} | {c['c_only_other_correct']} | "
                f"{c['statistic']:.3f} | {c['p_value']:.3g} |"
            )
    if files:
        lines += ["", "## Files", ""]
        for name, path in files.items():
            lines.append(f"- {name}: {Path(path).name}")
        for method in METHODS:
            key = f"confusion_{method}"
            if key in files:
                lines += ["", f"![confusion matrix, {method}]({Path(files[key]).name})"]
    if result["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def plot_confusion(matrix: np.ndarray, labels: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (rows true, columns predicted) with counts, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, np.maximum(totals, 1))
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted lead")
    ax.set_ylabel("true lead")
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if counts[i, j]:
                colour = "white" if share[i, j] > 0.6 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, label="share of the true lead")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_evaluation(
    result: dict[str, Any], arrays: dict[str, np.ndarray], out_dir: Path
) -> dict[str, str]:
    """Write JSON, Markdown, PNGs and predictions; returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    labels = result["model"]["leads"]
    for method in METHODS:
        path = out_dir / f"confusion_{method}.png"
        plot_confusion(
            np.array(result["statistics"][method]["confusion_matrix"]),
            labels,
            path,
            f"{result['data']['split']} split, {method} ({result['data']['n_ecgs']} ECGs)",
        )
        files[f"confusion_{method}"] = str(path)
    predictions = out_dir / "predictions.npz"
    np.savez_compressed(predictions, **arrays)
    files["predictions"] = str(predictions)
    json_path = out_dir / "evaluation.json"
    md_path = out_dir / "evaluation.md"
    files["json"] = str(json_path)
    files["markdown"] = str(md_path)
    result["files"] = dict(files)
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(format_markdown(result, files))
    return files


def format_summary(result: dict[str, Any]) -> str:
    """The few lines printed to the terminal."""
    stats = result["statistics"]
    data = result["data"]
    lines = [
        f"{result['model']['source']} on {data['split']} ({data['n_ecgs']} ECGs, {data['source']})",
    ]
    for method in METHODS:
        s = stats[method]
        lines.append(
            f"  {method:<9} lead accuracy {_pct_ci(s['lead_accuracy'], s['lead_accuracy_ci'])} %"
            f"   set accuracy {_pct_ci(s['set_accuracy'], s['set_accuracy_ci'])} %"
        )
    compare = result.get("compare")
    if compare:
        for method in METHODS:
            c = compare[method]
            lines.append(
                f"  vs {compare['other']['source']} ({method}): b={c['b_only_model_correct']} "
                f"c={c['c_only_other_correct']} chi2={c['statistic']:.3f} p={c['p_value']:.3g}"
            )
    lines.append(f"  {result['lead_order'].split('.')[0]} (model is permutation-equivariant)")
    for note in result["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)

"""The "how few leads do you need?" table from a ``lead_subsets`` study (``leadtune report``).

Each trial of the study trained one fixed recipe on one lead configuration with one seed; its
best checkpoint (chosen on validation) is evaluated here once on the test split. Per
configuration: macro AUROC, macro F1 (validation thresholds), Brier, AUROC retention against the
12-lead models, and the Lead-Robustness Score in the form of Lead-Minimal's main table,

    LRS = 0.7 (AUROC_subset / AUROC_12) + 0.3 (1 - (Brier_subset - Brier_12) / 0.25),

each as the mean over the seeds; the AUROC interval spans the seeds' 95 % ECG-level bootstrap
intervals (lowest lower bound to highest upper bound). Lead-Minimal's code holds four other
versions of the score (its stored results use 0.7 r + 0.3; HEAD's lrs_metric.py
0.5 r + 0.3 CR + 0.2 (1 - n/12); metrics.py (0.7 r + 0.3 CR)(1 + 0.1 (1 - n/12)); its multi-seed
table r alone); the table here is the one its README's main table prints.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np


def lead_subsets_table(search_dir: Path, saved: dict[str, Any], client: Any,
                       n_boot: int = 1000) -> list[dict[str, Any]]:  # fmt: skip
    from leadtune.search import state as search_state
    from leadtune.search.results import load_results, summarise_trials, trial_runs
    from leadtune.trainables.data.cache import prepare_dataset
    from leadtune.trainables.diagnosis.config import resolve_leads
    from leadtune.trainables.diagnosis.metrics import lead_robustness_score
    from leadtune.trainables.diagnosis.train import evaluate_checkpoint
    from leadtune.trainables.tasks import get_task

    rows = summarise_trials(
        load_results(search_dir), saved["metric"], saved["mode"], get_task("diagnosis"),
        saved.get("trials", {}), False,
        trial_runs(client, saved["experiment_id"], saved["parent_run_id"]),
    )  # fmt: skip
    dataset = prepare_dataset(Path(saved["data_source"]), limit=saved.get("data_limit"),
                              progress=False)  # fmt: skip
    by_config: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["state"] not in search_state.SUCCESSFUL_TRIAL_STATES or not row["best_checkpoint"]:
            continue
        leads = row["config"]["leads"]
        name = leads if isinstance(leads, str) else ",".join(leads)
        found = evaluate_checkpoint(row["best_checkpoint"], dataset, "test", n_boot=n_boot)
        by_config.setdefault(name, []).append({"seed": row["config"].get("seed"), **found})
    table = []
    for name, seeds in by_config.items():
        auroc = [s["test_macro_auroc"] for s in seeds]
        table.append({
            "leads": name,
            "n_leads": len(resolve_leads(name)),
            "seeds": len(seeds),
            "auroc": float(np.mean(auroc)),
            "auroc_ci": [min(s["test_macro_auroc_ci_low"] for s in seeds),
                         max(s["test_macro_auroc_ci_high"] for s in seeds)],
            "auroc_seed_range": [min(auroc), max(auroc)],
            "f1": float(np.mean([s["test_macro_f1"] for s in seeds])),
            "brier": float(np.mean([s["test_brier"] for s in seeds])),
        })  # fmt: skip
    twelve = next((r for r in table if r["n_leads"] == 12), None)
    for row in table:
        if twelve is not None:
            row["retention"] = row["auroc"] / twelve["auroc"]
            row["lrs"] = lead_robustness_score(row["auroc"], row["brier"], twelve["auroc"],
                                               twelve["brier"])  # fmt: skip
    return sorted(table, key=lambda r: (-r["n_leads"], -r["auroc"]))


def format_markdown(table: list[dict[str, Any]], records: str) -> str:
    lines = [
        f"Test split ({records}); each row: the mean over the seeds of one recipe trained on "
        "those leads.",
        "",
        "| leads | n | macro AUROC [95 % CI over seeds' CIs] | macro F1 | Brier | retention | "
        "LRS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['leads']} | {r['n_leads']} | {r['auroc']:.3f} [{r['auroc_ci'][0]:.3f}-"
            f"{r['auroc_ci'][1]:.3f}] | {r['f1']:.3f} | {r['brier']:.4f} | "
            f"{100 * r.get('retention', float('nan')):.1f} % | {r.get('lrs', float('nan')):.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    for r in table:
        ax.errorbar(r["n_leads"], r["auroc"],
                    yerr=[[r["auroc"] - r["auroc_ci"][0]], [r["auroc_ci"][1] - r["auroc"]]],
                    fmt="o", capsize=3, color="C0")  # fmt: skip
        ax.annotate(r["leads"], (r["n_leads"], r["auroc"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)  # fmt: skip
    ax.set_xlabel("number of leads")
    ax.set_ylabel("test macro AUROC")
    ax.set_title("How few leads does a diagnosis need?")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write(table: list[dict[str, Any]], out: Path, records: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out / "lead_subsets.md",
        "csv": out / "lead_subsets.csv",
        "json": out / "lead_subsets.json",
        "plot": out / "lead_subsets.png",
    }
    files["markdown"].write_text(format_markdown(table, records))
    files["json"].write_text(json.dumps(table, indent=2) + "\n")
    with open(files["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["leads", "n_leads", "seeds", "auroc", "auroc_ci_low", "auroc_ci_high",
                         "f1", "brier", "retention", "lrs"])  # fmt: skip
        for r in table:
            writer.writerow([r["leads"], r["n_leads"], r["seeds"], r["auroc"], *r["auroc_ci"],
                             r["f1"], r["brier"], r.get("retention"), r.get("lrs")])  # fmt: skip
    plot(table, files["plot"])
    return files

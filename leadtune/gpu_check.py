"""The GPU check: ``make gpu-check`` (``python -m leadtune.gpu_check``), a few minutes on one
CUDA GPU.

1. Trains the reference model (inception_gru + sab x5, D = 128) for ``--steps`` steps on the
   bundled sample with the data held on the device, in bf16 autocast and again in float32 from
   the same seed and batches; prints training ECG/s, peak GPU memory, and how far the bf16
   losses are from the float32 ones.
2. Runs a 4-trial smoke search with ``--gpus-per-trial 0.25`` (four trials sharing the GPU),
   and checks that every trial finished.

Writes ``gpu-check.json`` to ``--out`` and prints the figures the README quotes. Exit status 0
when every check passed, 1 when one failed, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bf16 rounds every product to 8 mantissa bits: per-epoch losses of a few hundred steps drift
# by a few percent from float32; more than this means something is wrong.
LOSS_TOLERANCE = 0.10


def train_run(data: Any, steps: int, amp: bool) -> dict[str, Any]:
    import torch

    from leadtune.trainables.lead_id.train import train_lead_id
    from leadtune.trainables.training import LocalReporter

    per_epoch = math.ceil(len(data.train) / 38)
    epochs = max(1, steps // per_epoch)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        reporter = LocalReporter(Path(tmp))
        train_lead_id(
            {"epochs": epochs, "amp": amp, "device": "cuda", "seed": 0},
            data,
            reporter,
            data_on_device=True,
        )
    history = reporter.history
    return {
        "amp": amp,
        "steps": epochs * per_epoch,
        "seconds": round(time.perf_counter() - started, 1),
        "train_ecg_per_second": sorted(m["train_ecg_per_second"] for m in history)[
            len(history) // 2
        ],
        "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20),
        "train_loss": [m["train_loss"] for m in history],
        "val_loss": [m["val_loss"] for m in history],
        "val_lead_accuracy_hungarian": history[-1]["val_lead_accuracy_hungarian"],
    }


def search_run(out: Path, source: str) -> dict[str, Any]:
    from leadtune.search.settings import SearchSettings
    from leadtune.search.tuner import run_search
    from leadtune.trainables.tasks import DataRequest

    started = time.perf_counter()
    outcome = run_search(
        SearchSettings(
            space="smoke",
            trials=4,
            epochs=2,
            max_concurrent=4,
            gpus_per_trial=0.25,
            cpus_per_trial=1,
            storage_path=str(out / "search"),
            data=DataRequest(source=Path(source), progress=False),
        )
    )
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "status": outcome.status,
        "trial_states": [t["state"] for t in outcome.trials],
        "champion": (outcome.promotion or {}).get("model_uri"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m leadtune.gpu_check", description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--source", default=None, help="PTB-XL folder (default: bundled sample)")
    parser.add_argument("--skip-search", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch; nothing to check", file=sys.stderr)
        return 2
    from leadtune.bundled import sample_dir
    from leadtune.trainables.data.cache import prepare_dataset
    from leadtune.trainables.lead_id.train import LeadIdData

    source = args.source or str(sample_dir())
    args.out.mkdir(parents=True, exist_ok=True)
    data = LeadIdData.from_prepared(prepare_dataset(Path(source), progress=False))
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "source": source,
    }
    report["bf16"] = train_run(data, args.steps, amp=True)
    report["float32"] = train_run(data, args.steps, amp=False)
    pairs = zip(report["bf16"]["train_loss"], report["float32"]["train_loss"])
    worst = max(abs(a - b) / max(abs(b), 1e-9) for a, b in pairs)
    report["loss_check"] = {"max_relative_difference": worst, "tolerance": LOSS_TOLERANCE,
                            "passed": worst <= LOSS_TOLERANCE}  # fmt: skip
    if not args.skip_search:
        report["search"] = search_run(args.out, source)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    b, f = report["bf16"], report["float32"]
    print(f"device: {report['device']}, torch {report['torch']}")
    print(f"train bf16: {b['train_ecg_per_second']:.0f} ECG/s, peak {b['peak_memory_mb']} MB")
    print(f"train fp32: {f['train_ecg_per_second']:.0f} ECG/s, peak {f['peak_memory_mb']} MB")
    print(f"bf16 vs fp32 train loss: max relative difference {worst:.3f} "
          f"({'ok' if worst <= LOSS_TOLERANCE else 'TOO LARGE'})")  # fmt: skip
    passed = report["loss_check"]["passed"]
    if "search" in report:
        s = report["search"]
        print(f"search (4 trials, 0.25 GPU each): {s['status']} in {s['seconds']} s, "
              f"states {s['trial_states']}")  # fmt: skip
        passed = passed and s["status"] == "finished"
    print(f"written: {args.out / 'gpu-check.json'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

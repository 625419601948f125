"""`leadtune bench`: how fast the reference lead-ID model trains and predicts, and against what.

For the reference architecture (inception_gru + sab x 5, 12 leads, batch 38, fp32) at D = 128
(``--model reference``) and at D = 64 (``--model d64``) it measures, in one run:

- training-step throughput (forward, backward, AdamW step) and inference throughput of the
  project's model ("fast": fused channels-last encoder, allocator settings of
  :mod:`trainables.runtime`) and of :mod:`trainables.lead_id.models.plain_reference` (the direct
  PyTorch rendering, same parameter count) with glibc's default allocator and with the tuned one;
- peak resident memory of each (one process per variant, so the peaks do not mix);
- data-pipeline throughput (batch cutting, lead shuffling, jitter) of the training loop;
- epoch time on the shared PTB-XL subset, estimated from the medians (``--measure-epoch`` runs
  one epoch of each instead).

Every variant runs in its own worker process; the parent lets one worker compute at a time and
rotates their order every round, so a machine whose load changes treats all variants alike.
Figures are medians over ``--rounds`` after ``--warmup`` steps. ``--accuracy`` trains the fast
and the plain model side by side (same seed, same batches) and reports both validation
accuracies; ``--search`` times a small search against the sum of its trials and samples its
memory with 1 and 2 concurrent trials.

The last two lines printed are always ``train: <N> ECG/s`` and ``infer: <N> ECG/s``: the fast
path on the first model measured.
"""

from __future__ import annotations

from leadtune.bench.command import add_parser

__all__ = ["add_parser"]

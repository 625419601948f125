"""Diagnosis: multi-label PTB-XL diagnostic superclasses (NORM, MI, STTC, CD, HYP) from any set
of leads.

- ``config``: :class:`DiagnosisConfig` (defaults: the PTB-XL benchmark's recipe) and the named
  lead configurations (Lead-Minimal's eleven, PhysioNet/CinC 2021's);
- ``models``: the seeds' and the benchmark's networks, built by name;
- ``train``: the training function (crops, standardisation fitted on the training split, BCE,
  AdamW with one-cycle or cosine, label smoothing, mixup) on leadtune's training plumbing;
- ``metrics``: AUROC, F1 at validation-chosen thresholds, Brier, bootstrap intervals, and the
  Lead-Robustness Score;
- ``spec``: the task's spec, registered as ``diagnosis`` (registered model ``ecg-diagnosis``).

Importing this package loads no torch.
"""

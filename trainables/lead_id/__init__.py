"""Lead identification: which lead is each of an ECG's unordered waveforms.

- ``config``: :class:`LeadIdConfig`, the settings of one run (defaults: the reference model);
- ``models``: the model family (per-lead encoders, set contexts, head), built by name;
- ``train``: the training function a Tune trial, ``leadtune train`` and the tests run;
- ``metrics``: the paper's statistics (lead and set accuracy, Hungarian matching, intervals);
- ``spec``: the task's :class:`~leadtune.trainables.tasks.TaskSpec`, registered as ``lead_id``.

Importing this package loads no torch.
"""

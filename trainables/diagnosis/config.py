"""The settings of one diagnosis run (no torch import: the CLI builds its flags from it).

Defaults follow the PTB-XL benchmark where the sources disagree (see ../shared/DIAGNOSIS_NOTES.md
and the README): ``resnet1d_wang``, random 2.5 s crops with sliding-window aggregation (maximum)
at evaluation, one global mean and standard deviation fitted on the training split, AdamW
(betas 0.9/0.99, decoupled weight decay 0.01) with a one-cycle schedule peaking at 0.01, batch
128, 50 epochs, diagnostic codes at any likelihood, records without a superclass left out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from leadtune.trainables.data.leads import LEADS
from leadtune.trainables.data.ptbxl import SUPERCLASSES
from leadtune.trainables.tasks import check_at_least_one, checked_settings

LIMB = ("I", "II", "III", "aVR", "aVL", "aVF")
# Named lead configurations: Lead-Minimal's eleven and the PhysioNet/CinC Challenge 2021 sets.
LEAD_CONFIGS: dict[str, tuple[str, ...]] = {
    "12": LEADS,
    "limb6": LIMB,
    "I-II-V2": ("I", "II", "V2"),
    "I-II-III": ("I", "II", "III"),
    "II-V2-V5": ("II", "V2", "V5"),
    "I-II": ("I", "II"),
    "II-V2": ("II", "V2"),
    "II": ("II",),
    "V5": ("V5",),
    "I": ("I",),
    "V2": ("V2",),
    "cinc6": LIMB,
    "cinc4": ("I", "II", "III", "V2"),
    "cinc3": ("I", "II", "V2"),
    "cinc2": ("I", "II"),
}
LEAD_MINIMAL_CONFIGS = ("12", "limb6", "I-II-V2", "I-II-III", "II-V2-V5", "I-II", "II-V2", "II",
                        "V2", "I", "V5")  # fmt: skip
MODELS = ("resnet1d_wang", "inception1d", "xresnet1d", "lead_minimal", "resnet34_1d", "ecg_xplaim")


def resolve_leads(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A lead configuration by name, or a comma-separated list of lead names."""
    if isinstance(value, str):
        if value in LEAD_CONFIGS:
            return LEAD_CONFIGS[value]
        value = [part.strip() for part in value.split(",") if part.strip()]
    return tuple(value)


@dataclass
class DiagnosisConfig:
    """One diagnosis run. Defaults: the PTB-XL benchmark's recipe with ``resnet1d_wang``."""

    # model
    model: str = "resnet1d_wang"  # resnet1d_wang | inception1d | xresnet1d | lead_minimal | resnet34_1d | ecg_xplaim
    depth: int = 101  # xresnet1d only: 18, 34, 50 or 101
    width: float = 1.0  # channel multiplier (1.0 = the published sizes)
    dropout: float | None = None  # None: the model's own (benchmark head .25/.5, ...)
    stochastic_depth: float | None = None  # None: the model's own (lead_minimal .1, else 0)
    leads: tuple[str, ...] | str = "12"  # a named configuration or lead names
    # data and training recipe
    window_s: float | None = 2.5  # random crops of this length; None: the whole 10 s
    eval_stride_s: float = 1.25  # sliding windows at evaluation (benchmark: 7 windows)
    aggregate: str = "max"  # how window outputs combine at evaluation: max | mean
    standardise: str = "global"  # global | per_lead | none (fitted on the training split)
    lr: float = 1e-2
    weight_decay: float = 1e-2
    schedule: str = "onecycle"  # onecycle | cosine
    batch_size: int = 128
    epochs: int = 50
    label_smoothing: float = 0.0  # targets y(1 - e) + e/2 (Lead-Minimal: 0.1)
    mixup_alpha: float = 0.0  # Beta(a, a) mixing of inputs and targets; 0 = off
    max_train_records: int | None = None
    max_val_records: int | None = None
    # run
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    num_threads: int | None = None
    early_stopping_patience: int | None = None  # epochs without val AUROC improvement
    skip_nonfinite_steps: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DiagnosisConfig:
        values = checked_settings(cls, values)
        if "leads" in values:
            values["leads"] = resolve_leads(values["leads"])
        config = cls(**values)
        config.leads = resolve_leads(config.leads)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def classes(self) -> tuple[str, ...]:
        return SUPERCLASSES

    def validate(self) -> None:
        leads = resolve_leads(self.leads)
        if not leads or len(set(leads)) != len(leads) or set(leads) - set(LEADS):
            raise ValueError(
                f"leads must be distinct names from {', '.join(LEADS)} or a configuration "
                f"({', '.join(LEAD_CONFIGS)}); got {self.leads!r}"
            )
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(MODELS)}")
        if self.model == "xresnet1d" and self.depth not in (18, 34, 50, 101):
            raise ValueError(f"xresnet1d depth must be 18, 34, 50 or 101, got {self.depth}")
        for name in ("lr", "batch_size", "epochs", "eval_stride_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.window_s is not None and not 0 < self.window_s <= 10:
            raise ValueError(f"window_s must be in (0, 10] seconds or None, got {self.window_s}")
        if self.aggregate not in ("max", "mean"):
            raise ValueError(f"aggregate must be max or mean, got {self.aggregate!r}")
        if self.standardise not in ("global", "per_lead", "none"):
            raise ValueError(
                f"standardise must be global, per_lead or none, got {self.standardise!r}"
            )
        if self.schedule not in ("onecycle", "cosine"):
            raise ValueError(f"schedule must be onecycle or cosine, got {self.schedule!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 = off), got {self.mixup_alpha}")
        check_at_least_one(
            self, ("max_train_records", "max_val_records", "num_threads", "early_stopping_patience")
        )
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.stochastic_depth is not None and not 0 <= self.stochastic_depth < 1:
            raise ValueError(f"stochastic_depth must be in [0, 1), got {self.stochastic_depth}")
        if not 0 < self.width <= 4:
            raise ValueError(f"width must be in (0, 4], got {self.width}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

"""The settings of one lead-identification run (no torch import: the CLI builds its flags from it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from leadtune.trainables.data.leads import LEADS
from leadtune.trainables.lead_id.models.registry import ModelConfig
from leadtune.trainables.tasks import check_at_least_one, checked_settings

PRECORDIAL = ("V1", "V2", "V3", "V4", "V5", "V6")
LIMB = ("I", "II", "III", "aVR", "aVL", "aVF")
LEAD_SETS = {"all": LEADS, "precordial": PRECORDIAL, "limb": LIMB}
# which modules learn in train_parts (the others keep their weights and BatchNorm statistics)
TRAIN_PARTS = ("all", "context_head", "head")


SIZE_BOUNDS = {
    "d_model": (1, 2048),
    "depth": (0, 48),
    "heads": (1, 64),
    "ffn_mult": (1, 16),
    "inducing_points": (1, 1024),
    "width": (0.01, 8),
}


@dataclass
class LeadIdConfig:
    """One lead-identification run. Defaults reproduce the reference model and its training."""

    # model
    encoder: str = "inception_gru"  # per-lead encoder (`leadtune models` lists them)
    context: str = "sab"  # across-lead context: none | deepsets | sab | isab
    d_model: int = 128  # feature width D (a multiple of heads)
    depth: int = 5  # set attention blocks
    heads: int = 8  # attention heads
    ffn_mult: int = 4  # feed-forward width as a multiple of D
    inducing_points: int = 16  # ISAB only
    dropout: float = 0.0  # in the set attention blocks and head
    width: float = 1.0  # encoder channel multiplier; < 1 for fast smoke runs
    # optimisation
    lr: float = 7e-4  # peak learning rate (AdamW)
    lr_min: float = 1e-7  # cosine schedule floor
    lr_schedule: str = "cosine"  # cosine (to lr_min over all epochs) | constant
    weight_decay: float = 1e-4  # AdamW, decoupled
    batch_size: int = 38
    epochs: int = 30
    # augmentation (training batches only) and leads. The reference uses jitter and shuffled
    # lead order; the others are off by default and can be searched over.
    jitter_prob: float = 0.5  # share of ECGs given Gaussian noise
    jitter_sigma_min: float = 0.001  # noise sigma range, mV
    jitter_sigma_max: float = 0.015
    shuffle_leads: bool = True  # present leads in a random order
    gain_max: float = 0.0  # per-ECG gain drawn log-uniformly in [1/(1+g), 1+g] (other devices)
    roll_max: int = 0  # circular time shift of up to this many samples, per ECG
    lowpass_prob: float = 0.0  # share of ECGs low-passed at 15-45 Hz (other front-end filters)
    subset_prob: float = 0.0  # share of ECGs that show only a random subset of their leads
    subset_min_leads: int = 3  # smallest subset shown (the model then labels K < 12 leads)
    leads: tuple[str, ...] = LEADS  # waveforms the model sees
    loss_leads: tuple[str, ...] | None = None  # restrict the loss to these (None = all seen leads)
    # data size (None = the whole split); small values make smoke runs fast
    max_train_records: int | None = None  # use the first N of the training split
    max_val_records: int | None = None  # use the first N of the validation split
    # run
    seed: int = 0  # initialisation, batches, augmentation
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    num_threads: int | None = None  # torch threads (None: all cores; a trial: its CPUs)
    early_stopping_patience: int | None = None  # epochs without val-loss improvement
    skip_nonfinite_steps: bool = False  # skip (and count) a step with a non-finite loss/gradient
    init_from: str | None = None  # warm start from a checkpoint's or package's weights
    # which parts learn: all | context_head (encoder frozen, its BatchNorm statistics too) | head
    train_parts: str = "all"
    # pull toward the init_from weights while fine-tuning (L2-SP, Li et al. 2018): adds
    # anchor_l2 * (w - w_init) to each learning tensor's gradient; 0 = off
    anchor_l2: float = 0.0
    # validate also with fewer leads (8, 6 limb, 6 precordial, 3) and under 0.05 / 0.1 mV noise
    # (val_robust_accuracy), and with init_from the fine-tuning score val_finetune_score
    robust_validation: bool = False
    # val_finetune_score: how much the 12-lead validation loss may exceed the start's (nats)
    finetune_loss_tolerance: float = 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LeadIdConfig:
        """Build from a flat dict (Tune config, YAML); unknown keys are an error, not ignored."""
        values = checked_settings(cls, values)
        for key in ("leads", "loss_leads"):
            if isinstance(values.get(key), str):
                values[key] = LEAD_SETS.get(values[key]) or tuple(values[key].split(","))
            elif values.get(key) is not None:
                values[key] = tuple(values[key])
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            encoder=self.encoder,
            context=self.context,
            d_model=self.d_model,
            depth=self.depth,
            heads=self.heads,
            ffn_mult=self.ffn_mult,
            inducing_points=self.inducing_points,
            n_classes=len(self.leads),
            dropout=self.dropout,
            width=self.width,
        )

    def validate(self) -> None:
        unknown = [lead for lead in self.leads if lead not in LEADS]
        if unknown or len(set(self.leads)) != len(self.leads) or not self.leads:
            raise ValueError(
                f"leads must be distinct names from {', '.join(LEADS)} (or 'all', 'precordial', "
                f"'limb'); got {', '.join(self.leads) or 'none'}"
            )
        if self.loss_leads is not None and not set(self.loss_leads) <= set(self.leads):
            raise ValueError("loss_leads must be a subset of leads")
        for name in ("lr", "batch_size", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.jitter_sigma_min <= self.jitter_sigma_max:
            raise ValueError("need 0 <= jitter_sigma_min <= jitter_sigma_max")
        for name in ("jitter_prob", "lowpass_prob", "subset_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"{name} must be a probability in [0, 1], got {getattr(self, name)}"
                )
        if not 0 <= self.gain_max <= 10:
            raise ValueError(f"gain_max must be in [0, 10], got {self.gain_max}")
        if self.roll_max < 0:
            raise ValueError(f"roll_max must be >= 0 samples, got {self.roll_max}")
        if not 1 <= self.subset_min_leads <= len(self.leads):
            raise ValueError(
                f"subset_min_leads must be between 1 and the {len(self.leads)} leads seen, "
                f"got {self.subset_min_leads}"
            )
        check_at_least_one(
            self, ("max_train_records", "max_val_records", "num_threads", "early_stopping_patience")
        )
        # Sizes a config may declare: well beyond any model in the notes or the spaces (the
        # reference is D 128, 5 blocks; the search tops out at D 256, 6 blocks), small enough
        # that a crafted package cannot make the builder allocate without limit.
        for name, (low, high) in SIZE_BOUNDS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value:g}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        if self.train_parts not in TRAIN_PARTS:
            raise ValueError(
                f"train_parts must be one of {', '.join(TRAIN_PARTS)}, got {self.train_parts!r}"
            )
        if self.robust_validation and tuple(self.leads) != LEADS:
            raise ValueError("robust_validation needs all 12 leads (leads=all)")
        if not 0 <= self.anchor_l2 <= 1e3:
            raise ValueError(f"anchor_l2 must be in [0, 1000], got {self.anchor_l2:g}")
        if self.anchor_l2 > 0 and not self.init_from:
            raise ValueError(
                "anchor_l2 pulls toward the weights a fine-tune starts from: set init_from too, "
                "or anchor_l2=0"
            )
        if self.finetune_loss_tolerance < 0:
            raise ValueError("finetune_loss_tolerance must be >= 0 nats")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU: use auto")
        self.model_config().validate()

"""What `leadtune bench` measures and with which settings (:class:`BenchSettings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The shared 2,992-record subset beside a development checkout, where there is one.
SHARED_SUBSET = Path(__file__).resolve().parents[3] / "shared" / "data" / "ptbxl-subset"
MODEL_SIZES = {"reference": 128, "d64": 64}
VARIANTS = (
    ("plain", "default"),  # the reference implementation as it runs out of the box
    ("plain", "tuned"),  # the same with the allocator settings
    ("fast", "tuned"),  # the project's model as leadtune runs it
)
VARIANT_NAMES = {
    ("plain", "default"): "plain, glibc malloc defaults",
    ("plain", "tuned"): "plain, tuned malloc",
    ("fast", "tuned"): "fast (leadtune)",
}


@dataclass
class BenchSettings:
    """What to measure. Defaults: the reference batch, full figures for both model sizes."""

    models: tuple[str, ...] = ("reference", "d64")
    batch_size: int = 38
    leads: int = 12
    samples: int = 1000
    warmup: int = 2
    rounds: int = 5
    threads: int | None = None  # torch threads per worker (None: torch's default)
    default_allocator: bool = True  # also measure the plain model with glibc's defaults
    source: str | None = None  # PTB-XL folder; None: no data figures, random batch
    cache_dir: str | None = None
    limit: int | None = None
    measure_epoch: bool = False
    quick: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)  # width, depth ... (tests)

    def validate(self) -> BenchSettings:
        unknown = [name for name in self.models if name not in MODEL_SIZES]
        if unknown:
            raise ValueError(f"unknown --model {unknown[0]!r}; choose reference, d64 or all")
        for name in ("batch_size", "leads", "samples", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.leads > 12:
            raise ValueError("--leads must be at most 12")
        if self.warmup < 0:
            raise ValueError("--warmup must be at least 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        from leadtune.trainables.lead_id.models.registry import ModelConfig

        for name in self.models:  # the model each worker will build, checked here
            model = {"d_model": MODEL_SIZES[name], "n_classes": 12, **self.model_overrides}
            try:
                ModelConfig(**model).validate()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"model {name} with {self.model_overrides}: {exc}") from None
        return self

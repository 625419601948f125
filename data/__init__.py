"""leadtune.bundled: what ships with leadtune: the PTB-XL sample (``ptbxl-sample/``) and the
trained lead-identification model (``models/lead-id/``, a model package with its model card),
and the reference paper's released model imported as a package (``models/thesis-siglabv2/``,
MIT), the starting point of the ``lead_id_finetune`` search.

Found with :func:`sample_dir` and :func:`model_dir`, which work from the repository and from an
installed wheel.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def sample_dir() -> Path:
    """The bundled 500-record PTB-XL sample (PhysioNet layout, CC BY 4.0)."""
    return Path(str(resources.files(__name__) / "ptbxl-sample"))


def model_dir() -> Path:
    """The bundled lead-identification model package (see ``MODEL_CARD.md`` there)."""
    return Path(str(resources.files(__name__) / "models" / "lead-id"))


def released_model_dir() -> Path:
    """The reference paper's released model as a leadtune package (``leadtune import
    thesis-siglabv2``; MIT, see ``LICENSE`` there)."""
    return Path(str(resources.files(__name__) / "models" / "thesis-siglabv2"))

"""Shared test fixtures: the real PTB-XL data the tests read."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ptbxl_sample() -> Path:
    """The bundled 500-record PTB-XL sample (always present: it ships with the repository)."""
    return REPO / "data" / "ptbxl-sample"


@pytest.fixture(scope="session")
def ptbxl_subset() -> Path:
    """The shared 2,992-record PTB-XL subset beside the checkout; skips where it is absent."""
    path = REPO.parent / "shared" / "data" / "ptbxl-subset"
    if not (path / "ptbxl_database.csv").is_file():
        pytest.skip(f"shared PTB-XL subset not found at {path}")
    return path

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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with LEADTUNE_SLOW_TESTS=1 (``make test-faults`` sets it
    for the fault-injection suite)."""
    import os

    if os.environ.get("LEADTUNE_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set LEADTUNE_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

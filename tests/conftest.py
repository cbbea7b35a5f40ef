"""Shared fixtures. Tests use data they make, the simulator, or ../shared/data — never the network."""

import os
from pathlib import Path

import numpy as np
import pytest


def pytest_configure(config):
    """One BLAS/OpenMP thread for the suite and the processes it starts: its tensors are small, and
    on two cores shared with other jobs, spinning OpenMP threads made steps 10-30x slower."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)

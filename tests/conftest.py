"""Shared fixtures. Tests use data they make, the simulator, or ../shared/data — never the network."""

import os

# One BLAS/OpenMP thread for the suite and the processes it starts, set before numpy or torch load
# their thread pools: the suite's tensors are small, and on two cores shared with other jobs
# spinning OpenMP threads made steps 10-30x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)

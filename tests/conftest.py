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


@pytest.fixture(scope="session")
def stage2_run(tmp_path_factory) -> Path:
    """A tiny stage-2 run on test_diffusion_stage2's stores (root/clips, root/latents, root/run), trained
    once per session for test_diffusion_stage2 and test_virtual. Shared: read it; a test that needs
    other stores beside the run copies the root (test_virtual does)."""
    from test_diffusion_stage2 import train_tiny

    root = tmp_path_factory.mktemp("stage2")
    train_tiny(root)
    return root

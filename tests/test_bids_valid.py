"""What `simulate --events` and `sample` write is valid BIDS, by the reference validator
(bids-validator-deno, a dev dependency), on tiny datasets (issue 20, item 8)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmrisynth.cli import main
from fmrisynth.data.sim_events import pe_direction
from test_diffusion_stage2 import fake_vqgan, run  # noqa: F401  (fixtures: a 3-step stage-2 run, a stand-in decoder)

pytestmark = pytest.mark.slow  # seconds or more per test: `make test` runs it, `make test-fast` does not

VALIDATOR = shutil.which("bids-validator-deno", path=str(Path(sys.executable).parent)) or shutil.which("bids-validator-deno")


def bids_errors(root: Path) -> list[tuple[str, str]]:
    """(code, location) of every error the validator finds in ``root``; skips where it cannot run."""
    if VALIDATOR is None:
        pytest.skip("bids-validator-deno is not installed (pip install -c constraints.txt -e '.[dev]')")
    try:
        done = subprocess.run([VALIDATOR, str(root), "--format", "json"], capture_output=True, text=True, timeout=120)
        issues = json.loads(done.stdout)["issues"]["issues"]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
        pytest.skip(f"bids-validator-deno cannot run here ({e})")
    return [(i["code"], i.get("location", "")) for i in issues if i.get("severity") == "error"]


def test_simulate_events_is_valid_bids(tmp_path):
    design = tmp_path / "motor.tsv"
    design.write_text("onset\tduration\ttrial_type\n2\t8\tMOTOR:rh\n16\t8\tMOTOR:lf\n")
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--events", str(design), "--tr", "1", "--frames", "26", "--subjects", "1",
                 "--grid", "6mm:16x20x16"]) == 0  # fmt: skip
    assert bids_errors(out) == []
    directions = [json.loads(f.read_text())["PhaseEncodingDirection"] for f in sorted(out.rglob("*_bold.json"))]
    assert directions == ["i", "i-"]  # run-1 LR, run-2 RL on the model grid (x to the right)


def test_phase_encoding_follows_the_first_axis():
    assert [pe_direction(pe, np.diag([2.0, 2, 2, 1])) for pe in ("LR", "RL")] == ["i", "i-"]
    assert [pe_direction(pe, np.diag([-2.0, 2, 2, 1])) for pe in ("LR", "RL")] == ["i-", "i"]  # HCP's LAS images


def test_sample_is_valid_bids(run, tmp_path):  # noqa: F811
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(run / "run"), "--condition", "MOTOR:rh", "--n", "2", "--out", str(out)]) == 0
    assert (out / "config.yaml").is_file() and bids_errors(out) == []

"""The GPU check runs end to end before a GPU is ever seen: its dry run on the CPU, and its OOM fallback."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # seconds or more per test: `make test` runs it, `make test-fast` does not

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _numbers(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_dry_run_writes_every_figure_finite_and_a_failed_size_as_an_error(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(tmp_path / "work"),
           "--sizes", "tiny,no-such-size,monai-tiny"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["device"]["dry_run"] and result["device"]["peak_flops"] > 0
    assert result["latent"]["shape"] == [20, 4, 4, 5, 4]  # 16x20x16 grid, 4x downsampling, 4 latent channels
    tiny, failed, monai = result["speed"]
    assert failed["arm"] == "no-such-size" and "unknown preset" in failed["error"]
    for row in (tiny, monai):
        assert "error" not in row
        for key in ("s_per_step", "clips_per_s", "model_tflop_per_step", "mfu", "s_per_clip_sampled", "peak_gib", "params"):
            assert row[key] > 0, key
    pure = result["pure_training"]
    assert "error" not in pure, pure
    assert pure["response"] == "none" and pure["train_clips"] > 0 and len(pure["curve"]) >= 1
    assert pure["loss_over_ref"] == pytest.approx(pure["loss_last_tenth"] / pure["ref_loss_gaussian"])
    for key, value in _numbers(result):
        assert math.isfinite(value), key


def test_a_size_out_of_memory_is_retried_at_half_the_batch(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        gpu_check = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpu_check)
    finally:
        sys.path.remove(str(SCRIPT.parent))

    def measure(arm, shape, batch, steps, device, sample_steps=None):
        if batch > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"arm": arm, "batch": batch, "gflops": 2.0, "s_per_step": 0.5}

    monkeypatch.setattr(gpu_check, "measure", measure)
    row = gpu_check.speed("s463m", (20, 4, 24, 28, 24), 4, 3, 10, torch.device("cpu"), peak=1e12)
    assert row["batch"] == 1 and row["oom_batches"] == [4, 2]
    assert row["mfu"] == pytest.approx(3 * 2e9 / 0.5 / 1e12) and row["clips_per_s"] == 2.0

"""benchmarks/compare.py: its arms build the models they are named after; its timing and table helpers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fmrisynth.config import Config, load_config, save_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("benchmarks_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_every_arm_builds_at_its_profiles_latent_size(compare, profile):
    import torch

    from fmrisynth.models.presets import LATENT_SHAPES, build_denoiser

    shape = LATENT_SHAPES[compare.profile_config(profile).data.grid]
    arms = compare.PROFILES[profile].arms
    for name, arm in arms.items():
        with torch.device("meta"):  # nothing allocated, even at 463M
            model = build_denoiser(arm.model, shape, n_classes=7)
        if name in compare.ABLATIONS:
            assert model.variant == name
        assert arm.response == ("none" if name.endswith("-none") else "hrf")
    assert {"ours", "monai-unet", "monai-unet-none", *compare.ABLATIONS} <= set(arms)


def test_step_seconds_is_the_median_after_the_warmup_window(compare, tmp_path):
    rows = [{"step": 10 * i, "clips_per_s": cps} for i, cps in enumerate([0.1, 8.0, 4.0, 2.0], 1)]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config()  # batch_size 8, grad_accum 1: seconds per step = 8 / clips_per_s
    assert compare.step_seconds(tmp_path, cfg) == pytest.approx(2.0)


def test_table_has_one_line_per_arm_and_the_ceiling_last(compare):
    row = {k: 0.5 for k in compare.COLUMNS} | {"params": 2.5e6, "steps": 930}
    ceiling = {"map_corr_mean": 0.9, "rsa": 0.95, "top1_map": 1.0, "hrf_corr_mean": 0.8}
    gaussian = {"arm": "gaussian", "params": 0, "map_corr_mean": 0.7, "c2st_accuracy": 0.6}  # no timing, no loss
    rows = [row | {"arm": "ours", "ceiling": ceiling}, row | {"arm": "monai-unet", "ceiling": ceiling}, gaussian]
    lines = compare.table(rows).splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["ours", "monai-unet", "gaussian"]
    assert lines[-1].startswith("noise ceiling") and "2.50M" in lines[1] and " 930 " in lines[1]
    from_end = len(compare.COLUMNS) - list(compare.COLUMNS).index("hrf_corr_mean")
    assert lines[-1].split()[-from_end] == "0.800" and "0.950" in lines[-1]  # HRF r, then the realism columns
    cells = lines[3].split()
    assert cells[-from_end - 4] == "0.700" and cells[-from_end + 1] == "0.600" and cells.count("-") >= 5


def test_a_run_directory_of_another_config_is_not_silently_reused(compare, tmp_path):
    cfg = compare.profile_config("cpu", ["train.steps=5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg  # the same config would be reused
    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path), "--set", "train.steps=6"])


@pytest.mark.slow
def test_sampling_time_is_measured_on_a_trained_run(compare, stage2_run):
    """The timing helper drives the run's denoiser through its real sampling call (it once fell behind a
    change of Denoiser.generate's arguments and crashed after the first arm had trained)."""
    from fmrisynth.checkpoint import load_checkpoint

    cfg = load_checkpoint(stage2_run / "run").config
    seconds = compare.sampling_seconds_per_clip(stage2_run / "run", cfg, n=2)
    assert seconds > 0 and seconds != float("inf")

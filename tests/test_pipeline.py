"""The main job end to end on a tiny grid (a few steps per stage), and the scaling helpers."""

import json

import pytest

from fmrisynth.config import load_config, packaged_config
from fmrisynth.errors import FmrisynthError
from fmrisynth.pipeline import _steps_for, demo, metric_table

TINY = [
    "sim.subjects=5", "sim.grid=12mm:16x20x16", "data.grid=12mm:16x20x16",
    "vae_train.steps=4", "vae_train.ckpt_every=2", "train.steps=4", "train.batch_size=4", "diffusion.sample_steps=3",
]  # fmt: skip


@pytest.mark.slow
def test_demo_chain_end_to_end_then_reuses_finished_stages(tmp_path):
    cfg = load_config(None, TINY, base=packaged_config("demo"))
    lines: list[str] = []
    metrics = demo(cfg, tmp_path, minutes=5, log=lines.append)
    saved = json.loads((tmp_path / "results" / "eval" / "metrics.json").read_text())
    assert saved["conditions"] == metrics["conditions"] and len(saved["conditions"]) == 7  # hcp7
    for key in ("map_corr_mean", "rsa", "top1_map", "top1_clip", "hrf_corr_mean", "ceiling", "memorisation"):
        assert key in saved
    assert saved["n_generated"] == saved["n_real"] > 0  # as many generated clips as held-out real ones
    html = (tmp_path / "results" / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html and 'src="http' not in html  # self-contained
    assert any("map_corr_mean" in line for line in lines) and any("report:" in line for line in lines)
    assert (tmp_path / "config.yaml").is_file()

    again: list[str] = []
    demo(cfg, tmp_path, minutes=5, log=again.append)
    assert sum("reusing" in line for line in again) == 5  # simulate, prepare, train-vae, train, evaluate


def test_metric_table_shows_undefined_metrics_as_dashes():
    table = metric_table({"map_corr_mean": 0.5, "rsa": None, "ceiling": {"map_corr_mean": 0.9}})
    assert "0.500" in table and "0.900" in table and table.splitlines()[2].split()[1:] == ["-", "-"]


def test_budget_in_steps_or_flops():
    assert _steps_for("1500", gflops=1.0, batch_size=8) == 1500
    assert _steps_for("2.4e12flops", gflops=1.0, batch_size=8) == 100  # 3 forward-equivalents per sample
    with pytest.raises(FmrisynthError, match="budget"):
        _steps_for("a lot", 1.0, 8)

"""The main job end to end on a tiny grid (a few steps per stage), and the scaling helpers."""

import json
import math

import pytest

from fmrisynth.config import load_config, packaged_config
from fmrisynth.errors import FmrisynthError
from fmrisynth.pipeline import _steps_for, demo, metric_table

TINY = [
    "sim.subjects=5", "sim.grid=12mm:16x20x16", "data.grid=12mm:16x20x16",
    "vae_train.steps=4", "vae_train.ckpt_every=2", "train.steps=4", "train.batch_size=4", "diffusion.sample_steps=3",
]  # fmt: skip


def _numbers(tree, path=""):
    """Every number in a metrics tree as (dotted key, value); lists give key[i]."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}".lstrip("."))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def _sensible(key: str, value: float) -> bool:
    """The range a metric can take, by its name (docs/design.md, metrics.json keys)."""
    leaf = key.rsplit(".", 1)[-1].split("[")[0]
    if not math.isfinite(value):
        return False
    if leaf.startswith("top1") or "accuracy" in leaf or leaf.startswith("c2st"):
        return 0.0 <= value <= 1.0
    if "corr" in leaf or leaf == "rsa":
        return -1.0 - 1e-6 <= value <= 1.0 + 1e-6
    if "ratio" in leaf or "fwhm" in leaf:
        return value > 0
    if leaf.startswith("n_") or leaf == "n":
        return value >= 0 and float(value).is_integer()
    return True


@pytest.mark.slow
def test_demo_chain_end_to_end_then_reuses_finished_stages(tmp_path):
    cfg = load_config(None, TINY, base=packaged_config("demo"))
    lines: list[str] = []
    metrics = demo(cfg, tmp_path, minutes=5, log=lines.append)
    metrics_file = tmp_path / "results" / "eval" / "metrics.json"
    saved_text = metrics_file.read_text()
    saved = json.loads(saved_text)
    assert saved == metrics and len(saved["conditions"]) == 7  # hcp7
    # The headline metrics are defined numbers in their ranges, not merely present keys.
    for key in ("map_corr_mean", "rsa", "top1_map", "top1_clip", "hrf_corr_mean"):
        assert isinstance(saved[key], float) and _sensible(key, saved[key]), (key, saved[key])
    for key in ("map_corr_mean", "rsa", "top1_map"):
        assert isinstance(saved["ceiling"][key], float) and _sensible(key, saved["ceiling"][key])
    assert saved["ceiling"]["map_corr_mean"] > 0.1  # two halves of real subjects share the task maps
    assert set(saved["memorisation"]) >= {"train_nn_corr", "heldout_nn_corr"}
    numbers = dict(_numbers(saved))
    bad = {k: v for k, v in numbers.items() if not _sensible(k, v)}
    assert bad == {} and len(numbers) > 20, bad
    assert saved["n_generated"] == saved["n_real"] > 0  # as many generated clips as held-out real ones
    html = (tmp_path / "results" / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html and 'src="http' not in html  # self-contained
    assert any("map r" in line or "map_corr_mean" in line for line in lines) and any("report:" in line for line in lines)
    assert (tmp_path / "config.yaml").is_file()

    # A second run reuses every finished stage: same metrics, nothing rewritten.
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "config.yaml"}
    again: list[str] = []
    assert demo(cfg, tmp_path, minutes=5, log=again.append) == metrics
    assert sum("reusing" in line for line in again) == 5  # simulate, prepare, train-vae, train, evaluate
    assert metrics_file.read_text() == saved_text
    assert {p: p.stat().st_mtime_ns for p in files} == files


def test_metric_table_shows_undefined_metrics_as_dashes():
    table = metric_table({"map_corr_mean": 0.5, "rsa": None, "ceiling": {"map_corr_mean": 0.9}})
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:] if line.strip()}
    assert rows["generated"][:2] == ["0.500", "-"] and rows["ceiling"][:2] == ["0.900", "-"]


def test_budget_in_steps_or_flops():
    assert _steps_for("1500", gflops=1.0, batch_size=8) == 1500
    assert _steps_for("2.4e12flops", gflops=1.0, batch_size=8) == 100  # 3 forward-equivalents per sample
    with pytest.raises(FmrisynthError, match="budget"):
        _steps_for("a lot", 1.0, 8)

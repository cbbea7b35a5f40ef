"""The main job end to end on a tiny grid (a few steps per stage), and the scaling helpers."""

import json
import math
import re

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


UNIT = (0.0, 1.0)
CORR = (-1.0 - 1e-6, 1.0 + 1e-6)
POSITIVE = (1e-300, math.inf)
NONNEGATIVE = (0.0, math.inf)
FINITE = (-math.inf, math.inf)
COUNT = "count"
# The range of every number in metrics.json (docs/design.md), by its dotted key with list indices as
# [] and condition names as <c>; the first rule whose pattern matches the whole key applies.
RANGES = [
    (r"(.+\.)?(top1_map|top1_clip|c2st_\w+?(_ci\[\])?)", UNIT),
    (r"(.+\.)?(map_corr_mean|map_corr\.<c>|rsa|hrf_corr_mean)", CORR),
    (r"hrf_corr_real_mean|realism\.fc_corr(_reference)?|memorisation\.(train|heldout)_nn_corr", CORR),
    (r"hrf\.<c>\.corr_(generated_hrf|generated_real|real_hrf)|realism\.autocorr_(real|generated|reference)\[\]", CORR),
    (r"realism\.autocorr_max_diff(_reference)?", (0.0, 2.0)),
    (r"(realism\.|codec\.)(variance_ratio|global_signal_ratio|between_clip_variance_ratio)(_reference)?", POSITIVE),
    (r"realism\.between_clip_variance_real", (1.0 - 1e-9, math.inf)),  # total over within-clip variance
    (r"realism\.mean_clip_diff(_reference)?", NONNEGATIVE),
    (r"realism\.fwhm_(real|generated|reference)_mm|realism\.fwhm_axes_mm\.(real|generated|reference)\[\]", POSITIVE),
    (r"pca\.(real|generated)\.(subject|pe|task)|pca\.explained_variance_ratio\[\]", UNIT),
    (r"hrf\.<c>\.peak_s_(real|generated|hrf)", FINITE),  # from the block onset: before it when the clip peaks early
    (r"(reference\.|codec\.)?n|n_real|n_generated|memorisation\.n_train|ceiling\.n_halves\[\]", COUNT),
    (r"n_per_condition\.<c>\.(real|generated)|reference\.n_per_condition\.<c>|hrf\.<c>\.roi_voxels", COUNT),
    (r"roi_fraction", (1e-300, 1.0)),
]


def _sensible(key: str, value: float) -> bool:
    """Whether a number of metrics.json lies in its range (``RANGES``); a key without a rule is an error,
    so that a new figure gets its range written down before the demo test passes."""
    pattern = ".".join("<c>" if ":" in part else part for part in re.sub(r"\[\d+\]", "[]", key).split("."))
    bounds = next((b for rule, b in RANGES if re.fullmatch(rule, pattern)), None)
    if bounds is None:
        raise KeyError(f"no range known for metrics key {key!r} ({pattern}); add it to RANGES")
    if not math.isfinite(value):
        return False
    if bounds == COUNT:
        return value >= 0 and float(value).is_integer()
    return bounds[0] <= value <= bounds[1]


def test_sensible_knows_every_metric_and_refuses_values_out_of_range():
    good = {"top1_map": 1.0, "map_corr.MOTOR:rh": -0.2, "realism.c2st_stats_ci[1]": 0.7, "n_real": 36,
            "ceiling.n_halves[0]": 18, "hrf.WM:2bk_faces.peak_s_real": 6.5, "realism.fwhm_axes_mm.real[2]": 7.1,
            "truth.generated.map_corr.MOTOR:rh": 0.4, "codec.variance_ratio": 0.9, "pca.real.pe": 0.01}  # fmt: skip
    assert all(_sensible(k, v) for k, v in good.items())
    bad = {"top1_map": 1.5, "map_corr.MOTOR:rh": 1.2, "realism.c2st_stats_ci[1]": -0.1, "n_real": 2.5,
           "ceiling.n_halves[0]": -1, "hrf.WM:2bk_faces.peak_s_real": math.inf, "realism.fwhm_axes_mm.real[2]": 0.0,
           "truth.generated.map_corr.MOTOR:rh": math.nan, "codec.variance_ratio": math.inf, "pca.real.pe": 1.1}  # fmt: skip
    assert not any(_sensible(k, v) for k, v in bad.items())
    with pytest.raises(KeyError, match="no range known"):
        _sensible("realism.new_figure", 0.5)


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

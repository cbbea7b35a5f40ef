"""Every model size builds, counts and runs (on the meta device: no memory, no init cost), and a
size that cannot run is refused before anything is trained or written (issue 20, item 1)."""

import json

import numpy as np
import pytest
import torch

from fmrisynth.cli import main
from fmrisynth.config import ModelConfig, load_config
from fmrisynth.data.store import StoreWriter
from fmrisynth.errors import FmrisynthError
from fmrisynth.models import presets
from fmrisynth.models.baseline import BASELINE_PRESETS
from fmrisynth.models.blocks import Attention
from fmrisynth.models.presets import LATENT_SHAPES, PRESETS, Preset, build_denoiser, describe, family
from fmrisynth.pipeline import scale

pytestmark = pytest.mark.slow  # seconds or more per test: `make test` runs it, `make test-fast` does not

REFERENCE_GRID = {"s38m": 38.1e6, "s85m": 85.4e6, "s152m": 151.5e6, "s237m": 236.5e6, "s340m": 340.3e6, "s463m": 462.9e6}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds_counts_and_runs_with_even_heads(preset):
    row = describe(ModelConfig(preset=preset), LATENT_SHAPES[PRESETS[preset].grid])  # a forward pass on meta
    assert row["params"] > 0 and row["gflops"] > 0
    with torch.device("meta"):
        model = build_denoiser(ModelConfig(preset=preset), LATENT_SHAPES[PRESETS[preset].grid], 7)
    heads = [m.q.out_features // m.heads for m in model.modules() if isinstance(m, Attention)]
    assert all(size % 2 == 0 for size in heads)
    target = REFERENCE_GRID.get(preset, 236.5e6 if preset.startswith("s237m-") else None)
    if target:
        assert abs(row["params"] / target - 1) < 0.05


@pytest.mark.parametrize("preset", list(BASELINE_PRESETS))
def test_every_baseline_preset_builds_and_counts_at_both_sizes(preset):
    for shape in LATENT_SHAPES.values():
        row = describe(ModelConfig(backbone="monai-unet", preset=preset), shape)
        assert row["params"] > 0 and row["gflops"] > 0


def test_presets_json_lists_the_sizes_that_used_to_crash(capsys, monkeypatch):
    monkeypatch.setattr(presets, "PRESETS", {k: PRESETS[k] for k in ("s20m", "s152m", "s463m")})
    monkeypatch.setattr(presets, "_baseline_presets", lambda: {})
    assert main(["presets", "--json"]) == 0
    assert [r["preset"] for r in json.loads(capsys.readouterr().out)] == ["s20m", "s152m", "s463m"]
    assert main(["presets"]) == 0 and "s463m" in capsys.readouterr().out


@pytest.fixture
def odd_preset(monkeypatch):
    """A size whose heads are 41 wide (82 // 2), as s20m's were: the rotary encoding cannot take it."""
    monkeypatch.setitem(PRESETS, "odd", Preset("6mm", family(41, head_dim=41)))
    return "odd"


def test_odd_head_size_is_one_line(odd_preset):
    with pytest.raises(FmrisynthError, match="odd size 41"):
        describe(ModelConfig(preset=odd_preset), LATENT_SHAPES["6mm"])


@pytest.mark.parametrize("preset", ["nope", "odd"])
def test_train_with_a_bad_preset_writes_nothing(tmp_path, capsys, odd_preset, preset):
    latents = tmp_path / "latents"  # 4 frames, 2 channels, 2x2x2: what `train` checks the preset against
    with StoreWriter(latents, (4, 2, 2, 2, 2), np.eye(4), (8, 8, 8), ["a", "b"], kind="latents",
                     meta={"latent_mean": [0, 0], "latent_std": [1, 1], "vqgan_checkpoint": "v", "clip_store": "c"}) as w:
        w.add(np.zeros((4, 2, 2, 2, 2)), label=0, condition="a", onset_s=0, duration_s=1, tr=1, split="train")
    out = tmp_path / "run"
    assert main(["train", "--latents", str(tmp_path / "latents"), "--out", str(out), "--preset", preset, "--steps", "1",
                 "--quiet"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and preset in err
    assert not out.exists()


@pytest.mark.parametrize("sizes, message", [(["tiny", "s1m", "odd"], "odd size"), (["tiny", "s99m"], "unknown preset"),
                                            (["tiny", "s1m"], "budget")])  # fmt: skip
def test_scale_checks_every_size_and_the_budget_before_anything_runs(tmp_path, monkeypatch, odd_preset, sizes, message):
    import fmrisynth.pipeline as pipeline

    monkeypatch.setattr(pipeline, "prepare_latents", lambda *a, **k: pytest.fail("data stage started"))
    with pytest.raises(FmrisynthError, match=message):
        scale(load_config(), sizes, "0" if message == "budget" else "10", tmp_path / "scale")
    assert not (tmp_path / "scale").exists()

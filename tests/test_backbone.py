import json

import pytest
import torch

from fmrisynth.cli import main
from fmrisynth.config import ModelConfig
from fmrisynth.errors import FmrisynthError
from fmrisynth.models.backbone import VARIANTS, Backbone
from fmrisynth.models.blocks import DesignEmbedder, LabelEmbedder, ResBlock, TransformerBlock
from fmrisynth.models.presets import LATENT_SHAPES, PRESETS, build_denoiser, count_params, gflops

SMALL = dict(widths=(8, 16, 16), depths=(1, 1, 1), kinds=("conv", "attn", "attn"), head_dim=8)


def inputs(b, frames, channels, *spatial, n_classes=3):
    torch.manual_seed(0)
    return (torch.randn(b, frames * channels, *spatial), torch.randint(0, 1000, (b,)),
            torch.randint(0, n_classes + 1, (b,)), torch.rand(b, frames))  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("spatial", [(8, 10, 8), (5, 7, 3)])
def test_every_variant_maps_odd_latents_to_their_own_shape(variant, spatial):
    model = Backbone(3, 2, n_classes=3, variant=variant, patch=(2, 1, 1), **SMALL)
    x, t, label, design = inputs(2, 3, 2, *spatial)
    assert model(x, t, label, design).shape == x.shape


@pytest.mark.parametrize("preset", ["tiny", "s0.3m"])
def test_cpu_presets_run_at_the_demo_latent(preset):
    shape = LATENT_SHAPES["6mm"]
    model = build_denoiser(ModelConfig(preset=preset), shape, n_classes=7)
    x, t, label, design = inputs(1, *shape, n_classes=7)
    assert model(x, t, label, design).shape == (1, 80, 8, 10, 8)


@pytest.mark.parametrize("adaln, xattn", [(True, True), (True, False), (False, True)])
def test_transformer_block_is_the_identity_at_init(adaln, xattn):
    block = TransformerBlock(16, 2, cond_dim=12, adaln=adaln, xattn=xattn)
    x = torch.randn(2, 30, 16)
    assert torch.equal(block(x, torch.randn(2, 12), torch.randn(2, 5, 12)), x)


def test_film_block_is_the_identity_at_init_and_conditioned_after():
    block = ResBlock(8, cond_dim=6)
    x = torch.randn(2, 8, 3, 4, 5)
    assert torch.equal(block(x, torch.randn(2, 6)), x)
    torch.nn.init.normal_(block.conv2.weight)
    c = torch.randn(1, 6).expand(2, 6).clone()
    c[1] += 1.0
    out = block(x[:1].expand(2, -1, -1, -1, -1), c)
    assert not torch.allclose(out[0], out[1])  # the embedding's scale and shift reach the output


def test_label_embedder_has_a_null_row_and_design_embedder_sees_timing():
    emb = LabelEmbedder(n_classes=4, dim=6)
    assert emb.table.num_embeddings == 5 and emb.null == 4
    pooled, tokens = DesignEmbedder(frames=10, dim=6)(torch.rand(3, 10))
    assert pooled.shape == (3, 6) and tokens.shape == (3, 10, 6)


def test_bad_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="one entry per level"):
        Backbone(2, 2, 3, widths=(8, 16), depths=(1,), kinds=("conv", "attn"))
    with pytest.raises(ValueError, match="unknown variant"):
        Backbone(2, 2, 3, variant="nope", **SMALL)
    with pytest.raises(FmrisynthError, match="unknown preset"):
        build_denoiser(ModelConfig(preset="huge"), (2, 2, 4, 4, 4), 3)


REFERENCE_GRID = {"s38m": 38.1e6, "s85m": 85.4e6, "s152m": 151.5e6, "s237m": 236.5e6, "s340m": 340.3e6, "s463m": 462.9e6}


@pytest.mark.parametrize("preset", [*REFERENCE_GRID, *[p for p in PRESETS if p.startswith("s237m-")]])
def test_reference_grid_and_ablations_match_the_published_sizes(preset):
    with torch.device("meta"):  # no memory, no init cost
        params = count_params(build_denoiser(ModelConfig(preset=preset), LATENT_SHAPES["2mm"], n_classes=7))
    assert abs(params / REFERENCE_GRID.get(preset, 236.5e6) - 1) < 0.05


def test_gflops_counts_attention_and_scales_with_the_latent():
    model = Backbone(3, 2, 3, **SMALL)
    small, large = gflops(model, (3, 2, 4, 4, 4)), gflops(model, (3, 2, 8, 8, 8))
    assert 0 < small < large
    attn_free = Backbone(3, 2, 3, variant="all-cnn", **SMALL)
    assert gflops(attn_free, (3, 2, 8, 8, 8)) > 0


def test_presets_json_matches_the_models_actually_built(capsys, monkeypatch):
    import fmrisynth.models.presets as presets

    monkeypatch.setattr(presets, "PRESETS", {k: PRESETS[k] for k in ("tiny", "s1m", "s237m-all-cnn")})
    monkeypatch.setattr(presets, "_baseline_presets", lambda: {"monai-tiny": None})
    assert main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["preset"] for r in rows] == ["tiny", "s1m", "s237m-all-cnn", "monai-tiny", "monai-tiny"]
    for r in rows[:2] + rows[3:4]:
        model = build_denoiser(ModelConfig(backbone=r["backbone"], preset=r["preset"]), tuple(r["latent_shape"]), 7)
        assert count_params(model) == r["params"] and r["gflops"] > 0
    assert rows[2]["variant"] == "all-cnn"

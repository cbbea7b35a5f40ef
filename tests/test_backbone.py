import json

import pytest
import torch
from einops import rearrange

from fmrisynth.cli import main
from fmrisynth.config import ModelConfig
from fmrisynth.errors import FmrisynthError
from fmrisynth.models.backbone import VARIANTS, Backbone, Stage
from fmrisynth.models.blocks import DesignEmbedder, GroupNorm, LabelEmbedder, ResBlock, TemporalConv, TransformerBlock, rope
from fmrisynth.models.presets import LATENT_SHAPES, PRESETS, build_denoiser, count_params, gflops

SMALL = dict(widths=(8, 16, 16), depths=(1, 1, 1), kinds=("conv", "attn", "attn"), head_dim=8)


def inputs(b, frames, channels, *spatial, n_classes=3):
    torch.manual_seed(0)
    return (torch.randn(b, frames, channels, *spatial), torch.randint(0, 1000, (b,)),
            torch.randint(0, n_classes + 1, (b,)), torch.rand(b, frames))  # fmt: skip


def trained_like(model):
    """The model with every weight random, so that zero-initialised paths carry signal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("spatial", [(8, 10, 8), (5, 7, 3)])
def test_every_variant_runs_odd_latents_through_every_weight(variant, spatial):
    """Odd sides (stride-2 levels of ceil(n / 2), patches of 2 padded at the far end and cropped back):
    at init the output is exactly the zero of the direct path; with weights, every parameter gets a
    gradient, the far-corner voxel (the one padding and cropping touch) answers its own input, and a
    clip's output does not depend on the other clips of its batch (padding mixes nothing)."""
    model = Backbone(2, n_classes=3, variant=variant, patch=(2, 1, 1), **SMALL)
    x, t, label, design = inputs(2, 3, 2, *spatial)
    assert torch.equal(model(x, t, label, design), torch.zeros_like(x))
    model = trained_like(model)
    out = model(x, t, label, design)  # (2, 3, 2, *spatial)
    out.square().mean().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent and torch.isfinite(out).all()
    with torch.no_grad():
        y = x.clone()
        y[..., -1, -1, -1] += 1.0
        assert (model(y, t, label, design) - out)[..., -1, -1, -1].abs().amax() > 1e-4
        assert torch.allclose(model(x[:1], t[:1], label[:1], design[:1]), out[:1], atol=1e-5)


@pytest.mark.parametrize("spatial", [(5, 7, 3), (4, 5, 6)])
def test_a_patched_transformer_stage_sees_odd_sides_as_zero_padded_ones(spatial):
    """A side the patch does not divide is padded with zeros at its far end and cropped back: the
    stage's output is, on the real voxels, its output on the latent zero-padded by hand."""
    stage = trained_like(Stage("attn", 8, 1, 16, 8, patch=2, mlp_ratio=2.0, adaln=True, xattn=True)).eval()
    h = torch.randn(2 * 3, 8, *spatial)  # (B*T, C, d, h, w), B = 2 clips of T = 3 frames
    c, ctx = torch.randn(6, 16), torch.randn(2, 5, 16)  # (B*T, cond), (B, M, cond)
    d, hh, w = spatial
    padded = torch.nn.functional.pad(h, (0, -w % 2, 0, -hh % 2, 0, -d % 2))  # (B*T, C, even sides)
    with torch.no_grad():
        assert torch.allclose(stage(h, c, ctx, 3), stage(padded, c, ctx, 3)[:, :, :d, :hh, :w], atol=1e-5)


def test_one_model_runs_any_clip_length_with_the_same_weights():
    model = trained_like(Backbone(2, n_classes=3, **SMALL)).eval()
    for frames in (4, 9, 64):
        x, t, label, design = inputs(1, frames, 2, 4, 4, 4)
        out = model(x, t, label, design)
        assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("variant", ["all-cnn", "all-transformer"])
def test_frames_mix_across_time_in_conv_and_transformer_levels(variant):
    """Changing frame 0 changes the prediction at the other frames: the clip is one sample, not T."""
    model = trained_like(Backbone(2, n_classes=3, variant=variant, **SMALL)).eval()
    x, t, label, design = inputs(1, 6, 2, 4, 4, 4)
    y = x.clone()
    y[:, 0] += 1.0
    delta = (model(x, t, label, design) - model(y, t, label, design)).abs()  # (1, T, c, d, h, w)
    assert delta[:, 1:].amax() > 1e-4


def test_frames_are_processed_alike_apart_from_their_neighbours():
    """Spatial layers are shared over frames: a constant clip with a constant design stays constant in time."""
    model = trained_like(Backbone(2, n_classes=3, variant="all-transformer", **SMALL)).eval()
    x = torch.randn(1, 1, 2, 4, 4, 4).expand(1, 5, 2, 4, 4, 4).contiguous()
    out = model(x, torch.tensor([10]), torch.tensor([1]), torch.zeros(1, 5))
    # attention is permutation-equivariant and the design is constant, so all frames agree exactly
    assert torch.allclose(out[:, 1:], out[:, :1].expand_as(out[:, 1:]), atol=1e-5)


def test_rotary_positions_make_attention_scores_depend_on_offsets_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    scores = rope(q) @ rope(k).transpose(-1, -2)  # (1, 1, 12, 12)
    for offset in (1, 3):
        diag = torch.diagonal(scores[0, 0], offset)
        assert torch.allclose(diag, diag[:1].expand_as(diag), atol=1e-5)


def test_rotary_embedding_rotates_each_channel_pair_by_its_angle():
    x = torch.randn(3, 2, 7, 8)  # (B, heads, N, e)
    pos = torch.arange(7.0)[:, None] / 10000 ** (torch.arange(0, 8, 2) / 8)  # (N, e/2) angles
    x1, x2 = x[..., 0::2], x[..., 1::2]
    expected = torch.stack([x1 * pos.cos() - x2 * pos.sin(), x1 * pos.sin() + x2 * pos.cos()], dim=-1).flatten(-2)
    assert torch.allclose(rope(x), expected, atol=1e-6)


def test_untrained_model_predicts_zero_the_direct_path_of_v_prediction():
    model = Backbone(2, n_classes=3, **SMALL)
    x, t, label, design = inputs(2, 4, 2, 4, 4, 4)
    assert torch.equal(model(x, t, label, design), torch.zeros_like(x))


@pytest.mark.parametrize("preset", ["tiny", "s0.3m"])
def test_cpu_presets_run_at_the_demo_latent(preset):
    shape = LATENT_SHAPES["6mm"]
    model = build_denoiser(ModelConfig(preset=preset), shape, n_classes=7)
    x, t, label, design = inputs(1, *shape, n_classes=7)
    assert model(x, t, label, design).shape == (1, 20, 4, 8, 10, 8)


@pytest.mark.parametrize("adaln, xattn", [(True, True), (True, False), (False, True)])
def test_transformer_block_is_the_identity_at_init(adaln, xattn):
    block = TransformerBlock(16, 2, cond_dim=12, adaln=adaln, xattn=xattn)
    x = torch.randn(2 * 3, 30, 16)  # (B*T, N, dim), B = 2, T = 3
    assert torch.equal(block(x, torch.randn(6, 12), torch.randn(2, 5, 12), frames=3), x)


def test_film_and_temporal_blocks_are_the_identity_at_init_and_conditioned_after():
    block, temporal = ResBlock(8, cond_dim=6), TemporalConv(8, cond_dim=6)
    x = torch.randn(2, 8, 3, 4, 5)
    assert torch.equal(block(x, torch.randn(2, 6)), x)
    assert torch.equal(temporal(x, torch.randn(2, 6), frames=2), x)
    torch.nn.init.normal_(block.conv2.weight)
    c = torch.randn(1, 6).expand(2, 6).clone()
    c[1] += 1.0
    out = block(x[:1].expand(2, -1, -1, -1, -1), c)
    assert not torch.allclose(out[0], out[1])  # the embedding's scale and shift reach the output


@pytest.mark.parametrize("dilation, frames", [(1, 5), (2, 4), (4, 3)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_temporal_conv_computes_the_conv1d_over_frames_at_every_voxel(dilation, frames, layout):
    """The Conv2d-on-a-view form gives the per-voxel Conv1d's output and gradients, in either layout."""
    block = trained_like(TemporalConv(6, cond_dim=5, dilation=dilation))
    x = torch.randn(2 * frames, 6, 3, 4, 2).contiguous(memory_format=layout).requires_grad_()  # (B*T, C, d, h, w)
    c = torch.randn(2 * frames, 5)
    out = block(x, c, frames)
    scale, shift = block.film(c)[:, :, None, None, None].chunk(2, dim=1)
    h = torch.nn.functional.silu(block.norm(x) * (scale + 1) + shift)
    h = rearrange(h, "(b t) c d h w -> (b d h w) c t", t=frames)  # the reference: one sequence per voxel
    ref = x + rearrange(block.conv(h), "(b d h w) c t -> (b t) c d h w", d=3, h=4, w=2)
    assert torch.allclose(out, ref, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, block.conv.weight])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, block.conv.weight])
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels, n_groups", [(8, 8), (18, 2)])
def test_group_norm_of_channels_last_activations_is_plain_group_norm(channels, n_groups):
    norm = trained_like(GroupNorm(n_groups, channels))
    x = torch.randn(4, channels, 3, 4, 5)
    out = norm(x.contiguous(memory_format=torch.channels_last_3d))
    assert out.is_contiguous(memory_format=torch.channels_last_3d)  # the next convolution gets its layout
    assert torch.allclose(out, torch.nn.functional.group_norm(x, n_groups, norm.weight, norm.bias), atol=1e-5)


def test_label_embedder_has_a_null_row_and_design_tokens_see_the_timing():
    emb = LabelEmbedder(n_classes=4, dim=6)
    assert emb.table.num_embeddings == 5 and emb.null == 4
    design = DesignEmbedder(dim=6)
    boxcar = torch.zeros(2, 30)
    boxcar[0, 5:15], boxcar[1, 10:20] = 1, 1  # the same block, shifted by 5 frames
    tokens = design(boxcar)  # (2, 30, 6)
    assert tokens.shape == (2, 30, 6)
    assert torch.allclose(tokens[0, 2:22], tokens[1, 7:27], atol=1e-6)  # convolutional: shift-equivariant
    assert not torch.allclose(tokens[0, 2:22], tokens[1, 2:22])


def test_bad_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="one entry per level"):
        Backbone(2, 3, widths=(8, 16), depths=(1,), kinds=("conv", "attn"))
    with pytest.raises(ValueError, match="unknown variant"):
        Backbone(2, 3, variant="nope", **SMALL)
    with pytest.raises(FmrisynthError, match="unknown preset"):
        build_denoiser(ModelConfig(preset="huge"), (2, 2, 4, 4, 4), 3)


REFERENCE_GRID = {"s38m": 38.1e6, "s85m": 85.4e6, "s152m": 151.5e6, "s237m": 236.5e6, "s340m": 340.3e6, "s463m": 462.9e6}


@pytest.mark.parametrize("preset", [*REFERENCE_GRID, *[p for p in PRESETS if p.startswith("s237m-")]])
def test_reference_grid_and_ablations_match_the_published_sizes(preset):
    with torch.device("meta"):  # no memory, no init cost
        params = count_params(build_denoiser(ModelConfig(preset=preset), LATENT_SHAPES["2mm"], n_classes=7))
    assert abs(params / REFERENCE_GRID.get(preset, 236.5e6) - 1) < 0.05


def test_gflops_counts_attention_quadratically_and_frames_linearly():
    conv = Backbone(2, 3, variant="all-cnn", **SMALL)
    attn = Backbone(2, 3, variant="all-transformer", **SMALL)
    # conv FLOPs grow with the voxel count (x8), attention FLOPs with its square: the ratio says which were counted
    conv_ratio = gflops(conv, (3, 2, 8, 8, 8)) / gflops(conv, (3, 2, 4, 4, 4))
    attn_ratio = gflops(attn, (3, 2, 8, 8, 8)) / gflops(attn, (3, 2, 4, 4, 4))
    assert 7.0 < conv_ratio < 8.5 and attn_ratio > conv_ratio + 1.0
    assert gflops(conv, (6, 2, 4, 4, 4)) == pytest.approx(2 * gflops(conv, (3, 2, 4, 4, 4)), rel=0.05)


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

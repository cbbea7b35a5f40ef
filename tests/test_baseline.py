"""The MONAI U-Net baseline honours the project's denoiser interface and the reference's size."""

import subprocess
import sys

import pytest
import torch

from fmrisynth.models.baseline import BASELINE_PRESETS, build_baseline

N_CLASSES = 7


def tiny(latent_shape):
    torch.manual_seed(0)
    return build_baseline("monai-tiny", latent_shape, N_CLASSES).eval()


def inputs(latent_shape, batch=2):
    frames, c, d, h, w = latent_shape
    x = torch.randn(batch, frames, c, d, h, w)
    t = torch.randint(0, 1000, (batch,))
    label = torch.arange(batch) % N_CLASSES
    design = (torch.arange(frames) >= 3).float().expand(batch, frames)
    return x, t, label, design


def perturbed(model):
    """MONAI zero-initialises the output conv and every residual branch's last layer, so at init the
    conditioning cannot reach the output; give those all-zero tensors values to see it through."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("latent_shape", [(20, 4, 8, 10, 8), (3, 2, 5, 7, 9)], ids=["demo", "odd"])
def test_output_is_the_zero_direct_path_at_init_and_follows_the_time_step_after(latent_shape):
    """Latents padded to the U-Net's multiple come back at their own shape: zero at init (MONAI's
    zero-initialised output conv); after, the real voxels of the output on the latent zero-padded by
    hand (padding at the far end, the crop aligned), dependent on the diffusion time step, one clip
    at a time."""
    model = tiny(latent_shape)
    x, t, label, design = inputs(latent_shape)
    with torch.no_grad():
        assert torch.equal(model(x, t, label, design), torch.zeros_like(x))
        perturbed(model)
        out = model(x, t, label, design)  # (B, T, c, d, h, w)
        assert out.shape == x.shape and torch.isfinite(out).all()
        d, h, w = latent_shape[2:]
        padded = torch.nn.functional.pad(x, (0, -w % model.multiple, 0, -h % model.multiple, 0, -d % model.multiple))
        assert padded.shape != x.shape  # both latents need padding
        assert torch.allclose(model(padded, t, label, design)[..., :d, :h, :w], out, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(out, model(x, (t + 500) % 1000, label, design))
        assert torch.allclose(model(x[:1], t[:1], label[:1], design[:1]), out[:1], rtol=1e-4, atol=1e-4)


def test_label_changes_the_output():
    latent_shape = (4, 2, 4, 4, 4)
    model = perturbed(tiny(latent_shape))
    x, t, label, design = inputs(latent_shape)
    with torch.no_grad():
        a = model(x, t, label, design)
        b = model(x, t, (label + 1) % N_CLASSES, design)
    assert not torch.allclose(a, b)


def test_design_changes_the_output():
    latent_shape = (4, 2, 4, 4, 4)
    model = perturbed(tiny(latent_shape))
    x, t, label, design = inputs(latent_shape)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, label, design), model(x, t, label, torch.zeros_like(design)))


def test_null_label_has_its_own_embedding_row():
    latent_shape = (4, 2, 4, 4, 4)
    model = tiny(latent_shape)
    assert model.unet.class_embedding.num_embeddings == N_CLASSES + 1
    x, t, _, design = inputs(latent_shape)
    null = torch.full((x.shape[0],), N_CLASSES)
    with torch.no_grad():
        out = perturbed(model)(x, t, null, design)
        for label in range(N_CLASSES):  # the null row is none of the real conditions
            assert not torch.allclose(out, model(x, t, torch.full_like(null, label), design))


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="monai-tiny"):
        build_baseline("monai-huge", (20, 4, 8, 10, 8), N_CLASSES)


def n_params(preset, latent_shape):
    with torch.device("meta"):
        model = build_baseline(preset, latent_shape, N_CLASSES)
    return sum(p.numel() for p in model.parameters())


def test_237m_preset_matches_the_reference_size():
    assert abs(n_params("monai-237m", (20, 4, 24, 28, 24)) / 237e6 - 1) < 0.05


def test_tiny_preset_is_cpu_sized_and_its_stem_keeps_the_clip():
    assert 5e6 <= n_params("monai-tiny", (20, 4, 8, 10, 8)) <= 1e7
    for preset in BASELINE_PRESETS.values():  # equal terms: the first level is at least T*c wide
        assert preset["channels"][0] >= 20 * 4


def test_presets_are_plain_unet_kwargs():
    import inspect

    from monai.networks.nets import DiffusionModelUNet

    accepted = inspect.signature(DiffusionModelUNet).parameters
    for preset in BASELINE_PRESETS.values():
        assert set(preset) <= set(accepted)


def test_import_does_not_import_monai():
    code = "import sys, fmrisynth.models.baseline; assert 'monai' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

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


@pytest.mark.parametrize("latent_shape", [(20, 4, 8, 10, 8), (3, 2, 5, 7, 9)], ids=["demo", "odd"])
def test_output_shape_equals_input_shape(latent_shape):
    model = tiny(latent_shape)
    x, t, label, design = inputs(latent_shape)
    with torch.no_grad():
        assert model(x, t, label, design).shape == x.shape


def perturbed(model):
    """MONAI zero-initialises the output conv and every residual branch's last layer, so at init the
    conditioning cannot reach the output; give those all-zero tensors values to see it through."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


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
        assert perturbed(model)(x, t, null, torch.zeros_like(design)).shape == x.shape


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

"""The VQ-GAN model and its loss: the round trip on several grids, the codebook, the adaptive GAN weight."""

import numpy as np
import pytest
import torch

from fmrisynth.config import VQGANConfig
from fmrisynth.errors import FmrisynthError
from fmrisynth.models.vqgan import VQGAN, Quantizer
from fmrisynth.models.vqgan_loss import VQGANLoss


@pytest.mark.parametrize(
    "shape, factor", [((16, 20, 16), 4), ((32, 40, 32), 4), ((24, 28, 24), 4), ((32, 40, 32), 8), ((16, 16, 16), 8)]
)
def test_volume_latent_round_trip(shape, factor):
    """On every grid: the encoder reads only brain voxels, each latent vector becomes its
    nearest codebook vector (the codes map back to the codebook), and decoded volumes are zero
    outside the brain."""
    torch.manual_seed(0)
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    outside = ~torch.from_numpy(mask)
    model = VQGAN(VQGANConfig(downsample=factor, latent_channels=3), mask).eval()
    x = torch.randn(2, 1, *shape)
    z = model.latent(x)  # (2, 3, d, h, w)
    assert z.shape == (2, 3, *(s // factor for s in shape))
    y = x.clone()
    y[:, :, outside] = 100.0
    assert torch.equal(model.latent(y), z)  # outside the brain is never seen
    quant, loss, info = model.encode(x)
    codebook = model.quantizer.codebook
    idx = info["indices"]  # (2, d, h, w)
    assert quant.shape == z.shape and idx.shape == (2, *z.shape[2:])
    # the codebook vectors, up to the rounding of the straight-through form z + (q - z)
    assert torch.allclose(quant.permute(0, 2, 3, 4, 1), codebook[idx], rtol=0, atol=1e-6)
    dist = torch.cdist(z.permute(0, 2, 3, 4, 1).reshape(-1, 3), codebook)  # (N, K)
    assert torch.equal(dist.gather(1, idx.reshape(-1, 1))[:, 0], dist.amin(1))  # each the nearest
    assert loss.item() == pytest.approx(0.25 * (z - quant).square().mean().item(), rel=1e-5)  # commitment
    recon = model.decode(quant)
    assert recon.shape == x.shape and recon[:, :, ~outside].abs().sum() > 0
    assert torch.all(recon[:, :, outside] == 0)  # nothing outside the brain


def test_grid_not_divisible_is_a_clear_error():
    with pytest.raises(FmrisynthError, match="not divisible by the VQ-GAN downsampling factor 8"):
        VQGAN(VQGANConfig(downsample=8), np.ones((16, 20, 16), bool))
    with pytest.raises(FmrisynthError, match="unknown VQ-GAN preset"):
        VQGAN(VQGANConfig(preset="huge"), np.ones((16, 20, 16), bool))


@pytest.mark.parametrize("mode", ["ema", "st"])
def test_quantizer_restarts_dead_codes_and_learns_clusters(mode):
    """Data far from the random codebook: without restarts most codes would never be used."""
    torch.manual_seed(0)
    q = Quantizer(16, 2, commitment=0.25, ema=mode == "ema", decay=0.8, dead_threshold=0.2)
    centres = torch.randn(8, 2) * 10 + 50
    opt = torch.optim.SGD(q.parameters(), lr=0.5) if mode == "st" else None
    for _ in range(150):
        z = (centres[torch.randint(8, (256,))] + 0.1 * torch.randn(256, 2)).reshape(4, 4, 4, 4, 2).permute(0, 4, 1, 2, 3)
        quant, loss, info = q(z)
        if opt:
            opt.zero_grad()
            loss.backward()
            opt.step()
    q.eval()
    quant, _, info = q(centres.t().reshape(1, 2, 2, 2, 2))
    err = (quant - centres.t().reshape(1, 2, 2, 2, 2)).abs().max()
    assert err < 0.5  # every cluster has a code of its own
    assert info["codes_used"] == 8 / 16 and info["perplexity"] > 7.5


def test_quantizer_gradient_is_straight_through():
    q = Quantizer(8, 4, commitment=0.25, ema=True, decay=0.99, dead_threshold=0.1)
    z = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    quant, _, _ = q(z)
    quant.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))


def test_adversarial_loss_waits_for_disc_start_then_uses_an_adaptive_weight():
    torch.manual_seed(0)
    cfg = VQGANConfig(disc_start=3, adv_weight=0.5)
    model, loss = VQGAN(cfg, np.ones((16, 20, 16), bool)), VQGANLoss(cfg)
    x = torch.randn(2, 1, 16, 20, 16)
    recon, qloss, _ = model(x)
    last = model.decoder.conv_out.weight
    before, logs = loss.generator_loss(x, recon, qloss, model.mask, 2, last)
    assert "g_loss" not in logs and torch.isclose(before, torch.tensor(logs["rec_l1"] + logs["codebook_loss"]))
    d_loss, d_logs = loss.discriminator_loss(x, recon, 2)
    assert d_loss.item() == 0 and d_logs == {}
    after, logs = loss.generator_loss(x, recon, qloss, model.mask, 3, last)
    assert logs["d_weight"] > 0 and torch.isclose(after, before + logs["d_weight"] * torch.tensor(logs["g_loss"]))
    d_loss, d_logs = loss.discriminator_loss(x, recon, 3)
    assert d_loss.requires_grad and {"d_loss", "logits_real", "logits_fake"} <= set(d_logs)


def test_reconstruction_loss_counts_only_brain_voxels():
    cfg = VQGANConfig()
    mask = np.zeros((16, 20, 16), bool)
    mask[4:12, 4:16, 4:12] = True
    model, loss = VQGAN(cfg, mask), VQGANLoss(cfg)
    x = torch.zeros(1, 1, 16, 20, 16)
    x[:, :, ~torch.from_numpy(mask)] = 100.0  # outside the brain: must not count
    recon = torch.ones_like(x) * model.mask
    _, logs = loss.generator_loss(x, recon, torch.tensor(0.0), model.mask, 0, model.decoder.conv_out.weight)
    assert logs["rec_l1"] == pytest.approx(1.0)

"""The VQ-GAN loss as its own module (taming-transformers' VQLPIPSWithDiscriminator, minus LPIPS).

Generator: masked L1 (+ optional L2) reconstruction + codebook/commitment loss + an adaptive weight
times a least-squares patch-adversarial loss, switched on after ``disc_start`` steps. The adaptive
weight ||∇ rec|| / ||∇ adv|| at the decoder's last layer keeps the adversarial gradient on the scale of
the reconstruction gradient, so ``adv_weight`` means the same thing at any grid or learning rate.
Least squares, not hinge: MONAI's hinge squashes logits with tanh, so once the discriminator wins (it
does quickly: reconstructions lack the voxel-level noise of real frames) the generator's gradient
vanishes and the adaptive weight explodes.

Only voxels inside the brain mask count: outside it the volume is zero by construction, and averaging
over the whole box would dilute the loss by the mask's fill fraction (about 20% at the demo grid).
Perceptual losses are left out: MONAI's PerceptualLoss needs downloaded weights trained on other images.
"""

from __future__ import annotations

import torch
from torch import nn

from fmrisynth.config import VQGANConfig
from fmrisynth.models.vqgan import preset


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, 1, D, H, W) over the voxels where mask (1, 1, D, H, W) is 1."""
    return (x * mask).sum() / (mask.sum() * x.shape[0])


class VQGANLoss(nn.Module):
    """Holds the 3D patch discriminator; ``generator_loss`` and ``discriminator_loss`` give (loss, logs) per pass."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        p = preset(cfg.preset)
        self.discriminator = PatchDiscriminator(
            spatial_dims=3, num_layers_d=p["disc_layers"], channels=p["disc_channels"], in_channels=1, out_channels=1
        )
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self.cfg = cfg

    def gan_active(self, step: int) -> bool:
        return self.cfg.adv_weight > 0 and step >= self.cfg.disc_start

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x)[-1]  # PatchDiscriminator returns every layer's features; last = logits

    def adaptive_weight(self, rec: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """adv_weight · ||∇ rec|| / ||∇ adv|| at ``last_layer`` (VQ-GAN, Esser et al. 2021, eq. 7)."""
        g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
        weight = g_rec.norm() / (g_adv.norm() + 1e-4)
        return self.cfg.adv_weight * weight.clamp(0.0, 1e4).detach()

    def generator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, codebook_loss: torch.Tensor, mask: torch.Tensor, step: int,
        last_layer: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """x, recon (B, 1, D, H, W); mask (1, 1, D, H, W); last_layer: the decoder's output conv weight."""
        err = recon.float() - x.float()
        l1 = masked_mean(err.abs(), mask)
        rec = l1 + self.cfg.l2_weight * masked_mean(err.pow(2), mask) if self.cfg.l2_weight else l1
        loss = rec + codebook_loss
        logs = {"rec_l1": l1.item(), "codebook_loss": codebook_loss.item()}
        if self.gan_active(step):
            adv = self.adversarial(self._logits(recon), target_is_real=True, for_discriminator=False)
            weight = self.adaptive_weight(rec, adv, last_layer) if torch.is_grad_enabled() else self.cfg.adv_weight
            loss = loss + weight * adv
            logs.update(g_loss=adv.item(), d_weight=float(weight))
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, fake: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """LSGAN loss on real x and detached reconstructions; before ``disc_start`` a zero that trains nothing."""
        if not self.gan_active(step):
            return torch.zeros((), device=x.device, requires_grad=True), {}
        real, fake = self._logits(x), self._logits(fake.detach())
        loss = 0.5 * (
            self.adversarial(real, target_is_real=True, for_discriminator=True)
            + self.adversarial(fake, target_is_real=False, for_discriminator=True)
        )
        return loss, {"d_loss": loss.item(), "logits_real": real.mean().item(), "logits_fake": fake.mean().item()}

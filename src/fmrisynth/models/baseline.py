"""The baseline: MONAI's 3D diffusion U-Net behind the project's denoiser interface.

The reference compares its hybrid CNN-Transformer against ``monai.networks.nets.DiffusionModelUNet``
(~237M parameters). To make that comparison fair, the U-Net here takes exactly what our backbone
takes and returns what it returns::

    forward(x: (B, T, c, d, h, w), t: (B,), label: (B,) long, design: (B, T) float) -> (B, T, c, d, h, w)

* The latent clip's frames are stacked on channels (T*c in, T*c out), as the reference did; the
  first level is at least T*c wide so that the stem is no bottleneck (a stem narrower than its
  input loses the clip: docs/design.md), which makes the comparison with ours fair.
* The condition label goes through MONAI's class embedding (``num_class_embeds = n_classes + 1``);
  the last row, ``label == n_classes``, is the null class of classifier-free guidance.
* The block design (the condition's boxcar per frame) becomes one cross-attention token per frame:
  ``Linear(1 -> D)(design[:, t]) + pos[t]``, the same tokens our backbone's ``DesignEmbedder`` makes.
  Every attention level of the U-Net attends to them, so the baseline sees the same conditioning
  information as ours, through MONAI's own conditioning path (ours also pools them into AdaLN/FiLM).
* The U-Net halves each axis ``len(channels) - 1`` times and needs axes divisible by that power of
  two; latents such as the demo's 8x10x8 are zero-padded at the far end of each axis and the output
  is cropped back, so the loss and the sampler only ever see the real latent voxels.

MONAI's inferers do not pass class labels, so sampling goes through fmrisynth's own sampling loop.
MONAI is imported only when a model is built: importing this module stays cheap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# kwargs of DiffusionModelUNet; in/out channels, conditioning and the class table come from the data.
BASELINE_PRESETS: dict[str, dict] = {
    # 7.3M parameters, 3.4 GFLOPs per clip at the demo latent (T=20, c=4): the first level is T*c = 80
    # wide, so the stem does not squeeze the clip (the old 32-wide stem lost it: docs/design.md). Ours costs
    # the same per clip at s1m.
    "monai-tiny": dict(
        channels=(80, 80, 80),
        attention_levels=(False, True, True),
        num_res_blocks=1,
        num_head_channels=16,
        norm_num_groups=16,
        cross_attention_dim=32,
    ),
    # The reference's baseline size: 237.7M parameters, ~1000 GFLOPs per clip at the 2 mm latent. Attention at
    # 1/2 and 1/4 of the latent grid (2016 and 252 tokens at 24x28x24); none at full resolution.
    "monai-237m": dict(
        channels=(192, 384, 480),
        attention_levels=(False, True, True),
        num_res_blocks=2,
        num_head_channels=96,
        norm_num_groups=32,
        cross_attention_dim=512,
    ),
}


class MonaiUNetDenoiser(nn.Module):
    """MONAI's ``DiffusionModelUNet`` (3D) conditioned on a class label and a block design.

    Args:
        latent_shape: (T, c, d, h, w) of one latent clip; T*c is the U-Net's channel count.
        n_classes: number of real conditions; one extra embedding row is the null class.
        cross_attention_dim: width D of the design tokens the U-Net cross-attends to.
        **unet_kwargs: the remaining ``DiffusionModelUNet`` arguments (channels, attention_levels,
            num_res_blocks, num_head_channels, norm_num_groups, ...), e.g. a ``BASELINE_PRESETS`` entry.
    """

    def __init__(self, latent_shape: tuple[int, ...], n_classes: int, cross_attention_dim: int, **unet_kwargs):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        if len(latent_shape) != 5:
            raise ValueError(f"latent_shape must be (T, c, d, h, w), got {tuple(latent_shape)}")
        if n_classes < 1:
            raise ValueError(f"n_classes must be at least 1, got {n_classes}")
        self.frames, latent_channels = int(latent_shape[0]), int(latent_shape[1])
        self.n_classes = n_classes
        channels = self.frames * latent_channels
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=channels,
            out_channels=channels,
            with_conditioning=True,
            cross_attention_dim=cross_attention_dim,
            num_class_embeds=n_classes + 1,
            use_flash_attention=True,  # PyTorch's fused attention; same maths, far less memory
            **unet_kwargs,
        )
        # Axes must survive len(channels) - 1 halvings without rounding.
        self.multiple = 2 ** (len(self.unet.block_out_channels) - 1)
        self.design_embed = nn.Linear(1, cross_attention_dim)
        self.design_pos = nn.Parameter(torch.randn(self.frames, cross_attention_dim) * 0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor, design: torch.Tensor) -> torch.Tensor:
        """Predict the diffusion target (eps or v) for noisy latent clips; see the module docstring."""
        if x.ndim != 6 or x.shape[1] != self.frames or design.shape != (x.shape[0], self.frames):
            raise ValueError(
                f"expected x (B, {self.frames}, c, d, h, w) and design (B, {self.frames}), got {tuple(x.shape)} and "
                f"{tuple(design.shape)}"
            )
        shape = x.shape
        x = x.flatten(1, 2)  # (B, T*c, d, h, w)
        d, h, w = x.shape[-3:]
        pad = [(-n) % self.multiple for n in (d, h, w)]
        # F.pad lists the last axis first: (w_lo, w_hi, h_lo, h_hi, d_lo, d_hi).
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))  # (B, T*c, d+pd, h+ph, w+pw)
        context = self.design_embed(design.to(x.dtype).unsqueeze(-1)) + self.design_pos  # (B, T, D)
        out = self.unet(x, timesteps=t, context=context, class_labels=label)  # (B, T*c, d+pd, h+ph, w+pw)
        return out[..., :d, :h, :w].reshape(shape)  # (B, T*c, d, h, w) -> (B, T, c, d, h, w)


def build_baseline(preset: str, latent_shape: tuple[int, ...], n_classes: int) -> MonaiUNetDenoiser:
    """The MONAI U-Net baseline of a named size for latent clips of ``latent_shape`` = (T, c, d, h, w)."""
    if preset not in BASELINE_PRESETS:
        raise ValueError(f"unknown baseline preset {preset!r}; choose one of {', '.join(BASELINE_PRESETS)}")
    return MonaiUNetDenoiser(latent_shape, n_classes, **BASELINE_PRESETS[preset])

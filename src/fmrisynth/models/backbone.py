"""The hierarchical CNN-Transformer denoiser (ours): a space-time U-Net of conv and transformer levels.

A latent clip stays a clip: (B, T, c, d, h, w). Frames are folded into the batch for every spatial
layer, so spatial weights are shared over frames, and every level also mixes across frames at each
location: dilated temporal convolutions in conv levels, temporal self-attention with rotary
(relative) positions in transformer levels. Stacking T*c frames into channels instead (the first
version) lost the clip at the stem: a linear probe of its features recovered 7 % of the noise and
samples were white in time (docs/design.md). Nothing depends on T, so a model trained on 20-frame clips
runs on a 512-frame run.

Early, high-resolution levels are FiLM residual blocks (cheap, local); deeper levels are
AdaLN-Zero transformer blocks with cross-attention to the condition tokens (global, where the
token count is small). Levels are joined by strided convolutions on the way down and by upsampling
+ skip concatenation on the way up. The output layer is zero-initialised: with v-prediction the
untrained network is then the best linear denoiser of unit-variance data (see models/diffusion.py).

Odd sizes are fine: a stride-2 convolution maps n to ceil(n / 2) (10 -> 5 -> 3) and each upsampling
returns exactly to the size of its skip, so no grid has to be a power of two.

Ablations (``variant``) change the stages, not the code path:
  hybrid           the preset's conv/transformer split, AdaLN-Zero + cross-attention
  all-cnn          every level convolutional (conditioning by FiLM only)
  all-transformer  every level a transformer stage
  adaln-only       transformer blocks without cross-attention
  xattn-only       transformer blocks with cross-attention but no AdaLN modulation
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from fmrisynth.models.blocks import (
    DesignEmbedder,
    GroupNorm,
    LabelEmbedder,
    ResBlock,
    TemporalConv,
    TimestepEmbedder,
    TransformerBlock,
    groups,
    sincos_3d,
)

VARIANTS = ("hybrid", "all-cnn", "all-transformer", "adaln-only", "xattn-only")
KINDS = ("conv", "attn")


class Stage(nn.Module):
    """``depth`` space-time blocks at one resolution and width, on frames folded into the batch.

    A conv block is a FiLM ResBlock on each frame followed by a temporal convolution (dilations
    1, 2, 4, ... so that a few blocks see across the whole HRF). A transformer stage turns each
    frame into tokens of ``patch``^3 voxels (padding a side that ``patch`` does not divide), adds a
    fixed 3D position embedding, runs its blocks and turns the tokens back into a map.
    """

    def __init__(self, kind: str, width: int, depth: int, cond_dim: int, head_dim: int, patch: int,
                 mlp_ratio: float, adaln: bool, xattn: bool):  # fmt: skip
        super().__init__()
        self.kind, self.patch = kind, patch if kind == "attn" else 1
        if kind == "conv":
            self.blocks = nn.ModuleList(ResBlock(width, cond_dim) for _ in range(depth))
            self.temporal = nn.ModuleList(TemporalConv(width, cond_dim, dilation=2 ** (i % 3)) for i in range(depth))
        else:
            heads = max(1, width // head_dim)
            self.blocks = nn.ModuleList(
                TransformerBlock(width, heads, cond_dim, mlp_ratio, adaln=adaln, xattn=xattn) for _ in range(depth)
            )
        if self.patch > 1:
            self.patchify = nn.Conv3d(width, width, self.patch, stride=self.patch)
            self.unpatchify = nn.ConvTranspose3d(width, width, self.patch, stride=self.patch)

    def forward(self, h: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor, frames: int) -> torch.Tensor:
        """h (B*T, C, d, h, w), c (B*T, cond), ctx (B, M, cond) -> (B*T, C, d, h, w)."""
        if self.kind == "conv":
            for block, temporal in zip(self.blocks, self.temporal):
                h = temporal(block(h, c), c, frames)  # (B*T, C, d, h, w)
            return h
        size, p = h.shape[2:], self.patch
        if p > 1:
            h = F.pad(h, (0, -size[2] % p, 0, -size[1] % p, 0, -size[0] % p))  # (B*T, C, p*ceil(d/p), ...)
            h = self.patchify(h)  # (B*T, C, ceil(d/p), ceil(h/p), ceil(w/p))
        grid = h.shape[2:]
        x = rearrange(h, "b c d h w -> b (d h w) c")  # (B*T, N, C)
        x = x + sincos_3d(x.shape[-1], grid, x.device).to(x.dtype)  # (B*T, N, C)
        for block in self.blocks:
            x = block(x, c, ctx, frames)  # (B*T, N, C)
        h = rearrange(x, "b (d h w) c -> b c d h w", d=grid[0], h=grid[1], w=grid[2])  # (B*T, C, *grid)
        if p > 1:
            h = self.unpatchify(h)[:, :, : size[0], : size[1], : size[2]]  # (B*T, C, d, h, w)
        return h


class Backbone(nn.Module):
    """Space-time U-Net of conv/transformer stages with FiLM, AdaLN-Zero and cross-attention conditioning.

    Args:
        channels: c of the latent clip; the network maps (B, T, c, d, h, w) to itself, for any T.
        n_classes: number of conditions; label ``n_classes`` is the null condition.
        widths, depths, kinds: per level (highest resolution first): channels, blocks, "conv"/"attn".
            The last level is the bottleneck; every other level has an encoder and a decoder stage.
        head_dim: channels per attention head (heads = width // head_dim).
        patch: voxels per token side at transformer levels (an int, or one per level).
        cond_dim: width of the conditioning embedding and tokens (default 4 * widths[0]).
        variant: an ablation from ``VARIANTS``.
    """

    def __init__(
        self,
        channels: int,
        n_classes: int,
        widths: Sequence[int] = (64, 128, 256),
        depths: Sequence[int] = (1, 2, 4),
        kinds: Sequence[str] = ("conv", "conv", "attn"),
        head_dim: int = 64,
        patch: int | Sequence[int] = 1,
        mlp_ratio: float = 4.0,
        cond_dim: int | None = None,
        variant: str = "hybrid",
    ):
        super().__init__()
        levels = len(widths)
        patches = [patch] * levels if isinstance(patch, int) else list(patch)
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if not (len(depths) == len(kinds) == len(patches) == levels) or set(kinds) - set(KINDS):
            raise ValueError(f"widths, depths, kinds (conv/attn) and patch need one entry per level, got "
                             f"{widths}, {depths}, {kinds}, {patches}")  # fmt: skip
        kinds = {"all-cnn": ["conv"] * levels, "all-transformer": ["attn"] * levels}.get(variant, list(kinds))
        self.channels, self.n_classes, self.variant = channels, n_classes, variant
        cond_dim = cond_dim or 4 * widths[0]
        self.t_embed = TimestepEmbedder(cond_dim)
        self.label_embed = LabelEmbedder(n_classes, cond_dim)
        self.design_embed = DesignEmbedder(cond_dim)

        def stage(i: int) -> Stage:
            return Stage(kinds[i], widths[i], depths[i], cond_dim, head_dim, patches[i], mlp_ratio,
                         adaln=variant != "xattn-only", xattn=variant != "adaln-only")  # fmt: skip

        self.stem = nn.Conv3d(channels, widths[0], 3, padding=1)
        self.encoder = nn.ModuleList(stage(i) for i in range(levels))
        self.downs = nn.ModuleList(nn.Conv3d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(levels - 1))
        self.ups = nn.ModuleList(nn.Conv3d(widths[i + 1], widths[i], 3, padding=1) for i in range(levels - 1))
        self.fuses = nn.ModuleList(nn.Conv3d(2 * widths[i], widths[i], 1) for i in range(levels - 1))
        self.decoder = nn.ModuleList(stage(i) for i in range(levels - 1))
        self.out = nn.Sequential(GroupNorm(groups(widths[0]), widths[0]), nn.SiLU(),
                                 nn.Conv3d(widths[0], channels, 3, padding=1))  # fmt: skip
        nn.init.zeros_(self.out[-1].weight)  # the untrained model predicts zero, as DiT's final layer
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor, design: torch.Tensor) -> torch.Tensor:
        """x (B, T, c, d, h, w), t (B,), label (B,) long, design (B, T) -> prediction (B, T, c, d, h, w)."""
        frames = x.shape[1]
        emb_t, emb_y = self.t_embed(t), self.label_embed(label)  # (B, cond), (B, cond)
        emb_f = self.design_embed(design)  # (B, T, cond)
        c = rearrange(emb_t[:, None] + emb_y[:, None] + emb_f, "b t e -> (b t) e")  # (B*T, cond)
        ctx = torch.cat([emb_t[:, None], emb_y[:, None], emb_f], dim=1)  # (B, 2 + T, cond)
        # channels-last from here on: oneDNN runs the narrow (8-64 channel) 3D convolutions 2x faster
        # in it, temporal convolutions and tokenisation read it without a copy (blocks.TemporalConv)
        x = rearrange(x, "b t c d h w -> (b t) c d h w").contiguous(memory_format=torch.channels_last_3d)
        h = self.stem(x)  # (B*T, w0, d, h, w)
        skips = []
        for i, stage in enumerate(self.encoder):
            h = stage(h, c, ctx, frames)  # (B*T, w_i, d_i, h_i, w_i)
            if i < len(self.downs):
                skips.append(h)
                h = self.downs[i](h)  # (B*T, w_{i+1}, ceil(d_i / 2), ceil(h_i / 2), ceil(w_i / 2))
        for i in reversed(range(len(self.decoder))):
            skip = skips.pop()  # (B*T, w_i, d_i, h_i, w_i)
            h = self.ups[i](F.interpolate(h, size=skip.shape[2:], mode="nearest"))  # (B*T, w_i, d_i, h_i, w_i)
            h = self.fuses[i](torch.cat([h, skip], dim=1))  # (B*T, 2 w_i, ...) -> (B*T, w_i, d_i, h_i, w_i)
            h = self.decoder[i](h, c, ctx, frames)  # (B*T, w_i, d_i, h_i, w_i)
        out = rearrange(self.out(h), "(b t) c d h w -> b t c d h w", t=frames)  # (B, T, c, d, h, w)
        return out.contiguous()  # callers get the usual layout back

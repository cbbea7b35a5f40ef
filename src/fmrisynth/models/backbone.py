"""The hierarchical CNN-Transformer denoiser (ours): a U-Net whose levels are conv or transformer stages.

The latent clip (B, T, c, d, h, w) enters with its frames stacked along channels, (B, T*c, d, h, w),
so every layer sees the whole clip's time course at once. Early, high-resolution levels are FiLM
residual blocks (cheap, local); deeper levels are AdaLN-Zero transformer blocks with cross-attention
to the condition tokens (global, where the token count is small). Levels are joined by strided
convolutions on the way down and by upsampling + skip concatenation on the way up.

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
    LabelEmbedder,
    ResBlock,
    TimestepEmbedder,
    TransformerBlock,
    groups,
    sincos_3d,
)

VARIANTS = ("hybrid", "all-cnn", "all-transformer", "adaln-only", "xattn-only")
KINDS = ("conv", "attn")


class Stage(nn.Module):
    """``depth`` blocks at one resolution and width.

    A transformer stage turns the feature map into tokens of ``patch``^3 voxels (padding a side that
    ``patch`` does not divide), adds a fixed 3D position embedding, runs its blocks and turns the
    tokens back into a map of the input's size.
    """

    def __init__(self, kind: str, width: int, depth: int, cond_dim: int, head_dim: int, patch: int,
                 mlp_ratio: float, adaln: bool, xattn: bool):  # fmt: skip
        super().__init__()
        self.kind, self.patch = kind, patch if kind == "attn" else 1
        if kind == "conv":
            self.blocks = nn.ModuleList(ResBlock(width, cond_dim) for _ in range(depth))
        else:
            heads = max(1, width // head_dim)
            self.blocks = nn.ModuleList(
                TransformerBlock(width, heads, cond_dim, mlp_ratio, adaln=adaln, xattn=xattn) for _ in range(depth)
            )
        if self.patch > 1:
            self.patchify = nn.Conv3d(width, width, self.patch, stride=self.patch)
            self.unpatchify = nn.ConvTranspose3d(width, width, self.patch, stride=self.patch)

    def forward(self, h: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            for block in self.blocks:
                h = block(h, c)  # (B, C, d, h, w)
            return h
        size, p = h.shape[2:], self.patch
        if p > 1:
            h = F.pad(h, (0, -size[2] % p, 0, -size[1] % p, 0, -size[0] % p))  # (B, C, p*ceil(d/p), ...)
            h = self.patchify(h)  # (B, C, ceil(d/p), ceil(h/p), ceil(w/p))
        grid = h.shape[2:]
        x = rearrange(h, "b c d h w -> b (d h w) c")  # (B, N, C)
        x = x + sincos_3d(x.shape[-1], grid, x.device).to(x.dtype)  # (B, N, C)
        for block in self.blocks:
            x = block(x, c, ctx)  # (B, N, C)
        h = rearrange(x, "b (d h w) c -> b c d h w", d=grid[0], h=grid[1], w=grid[2])  # (B, C, *grid)
        if p > 1:
            h = self.unpatchify(h)[:, :, : size[0], : size[1], : size[2]]  # (B, C, d, h, w)
        return h


class Backbone(nn.Module):
    """U-Net of conv/transformer stages with FiLM, AdaLN-Zero and cross-attention conditioning.

    Args:
        frames, channels: T and c of the latent clip; the network maps (B, T*c, d, h, w) to itself.
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
        frames: int,
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
        self.frames, self.channels, self.n_classes, self.variant = frames, channels, n_classes, variant
        cond_dim = cond_dim or 4 * widths[0]
        self.t_embed = TimestepEmbedder(cond_dim)
        self.label_embed = LabelEmbedder(n_classes, cond_dim)
        self.design_embed = DesignEmbedder(frames, cond_dim)

        def stage(i: int) -> Stage:
            return Stage(kinds[i], widths[i], depths[i], cond_dim, head_dim, patches[i], mlp_ratio,
                         adaln=variant != "xattn-only", xattn=variant != "adaln-only")  # fmt: skip

        self.stem = nn.Conv3d(frames * channels, widths[0], 3, padding=1)
        self.encoder = nn.ModuleList(stage(i) for i in range(levels))
        self.downs = nn.ModuleList(nn.Conv3d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(levels - 1))
        self.ups = nn.ModuleList(nn.Conv3d(widths[i + 1], widths[i], 3, padding=1) for i in range(levels - 1))
        self.fuses = nn.ModuleList(nn.Conv3d(2 * widths[i], widths[i], 1) for i in range(levels - 1))
        self.decoder = nn.ModuleList(stage(i) for i in range(levels - 1))
        self.out = nn.Sequential(nn.GroupNorm(groups(widths[0]), widths[0]), nn.SiLU(),
                                 nn.Conv3d(widths[0], frames * channels, 3, padding=1))  # fmt: skip
        nn.init.zeros_(self.out[-1].weight)  # the untrained model predicts zero, as DiT's final layer
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor, design: torch.Tensor) -> torch.Tensor:
        """x (B, T*c, d, h, w), t (B,), label (B,) long, design (B, T) -> prediction (B, T*c, d, h, w)."""
        emb_t, emb_y = self.t_embed(t), self.label_embed(label)  # (B, cond), (B, cond)
        pooled, frame_tokens = self.design_embed(design)  # (B, cond), (B, T, cond)
        c = emb_t + emb_y + pooled  # (B, cond)
        ctx = torch.cat([emb_t[:, None], emb_y[:, None], frame_tokens], dim=1)  # (B, 2 + T, cond)
        h = self.stem(x)  # (B, w0, d, h, w)
        skips = []
        for i, stage in enumerate(self.encoder):
            h = stage(h, c, ctx)  # (B, w_i, d_i, h_i, w_i)
            if i < len(self.downs):
                skips.append(h)
                h = self.downs[i](h)  # (B, w_{i+1}, ceil(d_i / 2), ceil(h_i / 2), ceil(w_i / 2))
        for i in reversed(range(len(self.decoder))):
            skip = skips.pop()  # (B, w_i, d_i, h_i, w_i)
            h = self.ups[i](F.interpolate(h, size=skip.shape[2:], mode="nearest"))  # (B, w_i, d_i, h_i, w_i)
            h = self.fuses[i](torch.cat([h, skip], dim=1))  # (B, 2 w_i, ...) -> (B, w_i, d_i, h_i, w_i)
            h = self.decoder[i](h, c, ctx)  # (B, w_i, d_i, h_i, w_i)
        return self.out(h)  # (B, T*c, d, h, w)

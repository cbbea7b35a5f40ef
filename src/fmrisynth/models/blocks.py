"""Building blocks of the stage-2 denoiser: conditioning embedders, a FiLM conv block, a transformer block.

Conditioning follows DiT (Peebles & Xie, 2023): the timestep, the condition label and the block
design are summed into one embedding ``c`` (B, cond_dim) that modulates every block — by FiLM
(``x * (scale + 1) + shift``) in convolutional stages and by AdaLN-Zero in transformer stages. The
same three are also given as a short token sequence ``ctx`` (B, 2 + T, cond_dim) that transformer
blocks cross-attend to, so that *when* the block happens (one token per frame) stays visible to
every voxel token instead of being averaged into ``c``.

Every block is zero-initialised so that it starts as the identity: a deep stack then begins as a
shallow network and trains stably without warm-up tricks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN / FiLM: a per-sample, per-channel affine map, the identity when shift = scale = 0."""
    return x * (scale + 1) + shift


def groups(channels: int) -> int:
    """GroupNorm groups: 32 as usual, or fewer when the width is small or not divisible by 32."""
    return math.gcd(32, channels)


class TimestepEmbedder(nn.Module):
    """Diffusion timestep (B,) -> (B, dim): sinusoidal features then an MLP (as in DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)  # (half,)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (B, freq_dim) -> (B, dim)


class LabelEmbedder(nn.Module):
    """Condition label (B,) -> (B, dim). Row ``n_classes`` is the null condition of classifier-free
    guidance; the diffusion object (not the model) decides when a label is replaced by it."""

    def __init__(self, n_classes: int, dim: int):
        super().__init__()
        self.null = n_classes
        self.table = nn.Embedding(n_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        return self.table(label)  # (B,) -> (B, dim)


class DesignEmbedder(nn.Module):
    """The block's boxcar over the clip's frames (B, T) -> per-frame tokens (B, T, dim) and a pooled (B, dim).

    A token is "frame k" plus "this much of frame k lies inside the block", so cross-attention can
    read the timing directly; the pooled vector (an MLP over the whole boxcar) feeds AdaLN/FiLM. The
    null design is all zeros, which these maps send to fixed, learned vectors.
    """

    def __init__(self, frames: int, dim: int):
        super().__init__()
        self.frame = nn.Parameter(torch.randn(frames, dim) * 0.02)
        self.inside = nn.Linear(1, dim)
        self.pool = nn.Sequential(nn.Linear(frames, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, design: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.frame + self.inside(design[..., None])  # (B, T, 1) -> (B, T, dim)
        return self.pool(design), tokens  # (B, dim), (B, T, dim)


class ResBlock(nn.Module):
    """Convolutional residual block at constant width; the embedding sets a FiLM scale and shift.

    norm -> SiLU -> conv -> norm -> FiLM -> SiLU -> conv (zero-initialised, so the block starts as
    the identity) + skip.
    """

    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups(width), width)
        self.conv1 = nn.Conv3d(width, width, 3, padding=1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))
        self.norm2 = nn.GroupNorm(groups(width), width, affine=False)
        self.conv2 = nn.Conv3d(width, width, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C, d, h, w)
        scale, shift = self.film(c)[:, :, None, None, None].chunk(2, dim=1)  # (B, cond) -> 2 x (B, C, 1, 1, 1)
        h = self.conv2(F.silu(modulate(self.norm2(h), shift, scale)))  # (B, C, d, h, w)
        return x + h


class Attention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention to ``context`` tokens of ``context_dim``."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        source = x if context is None else context  # (B, M, dim or context_dim)
        q = rearrange(self.q(x), "b n (h e) -> b h n e", h=self.heads)  # (B, heads, N, e)
        k, v = rearrange(self.kv(source), "b m (two h e) -> two b h m e", two=2, h=self.heads)  # (B, heads, M, e)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, e)
        return self.proj(rearrange(out, "b h n e -> b n (h e)"))  # (B, N, dim)


class TransformerBlock(nn.Module):
    """DiT block with AdaLN-Zero, plus cross-attention to the condition tokens (as in PixArt-alpha).

    ``adaln=False`` drops the modulation (LayerNorms get their own affine parameters, the timestep
    then reaches the block only through the context); ``xattn=False`` drops the cross-attention.
    Either way the block starts as the identity: the AdaLN gates are zero-initialised or, without
    AdaLN, the output projections are; the cross-attention output projection always is.
    """

    def __init__(self, dim: int, heads: int, cond_dim: int, mlp_ratio: float = 4.0, adaln: bool = True, xattn: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6) if xattn else None
        self.xattn = Attention(dim, heads, context_dim=cond_dim) if xattn else None
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim)) if adaln else None
        zero = [self.adaLN_modulation[-1]] if adaln else [self.attn.proj, self.mlp[-1]]
        for layer in zero + ([self.xattn.proj] if xattn else []):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        if self.adaLN_modulation is not None:
            mods = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)  # (B, cond) -> 6 x (B, 1, dim)
        else:
            mods = (0.0, 0.0, 1.0, 0.0, 0.0, 1.0)  # no modulation: shift 0, scale 0, gate 1
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, dim)
        if self.xattn is not None:
            x = x + self.xattn(self.norm2(x), ctx)  # (B, N, dim), attending to (B, M, cond_dim)
        return x + gate_mlp * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))  # (B, N, dim)


def sincos_3d(dim: int, size: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Fixed 3D sine-cosine position embedding (N = d*h*w, dim), as DiT's but per axis.

    Fixed rather than learned so that one model runs at any latent size and its parameter count
    does not depend on the grid. ``dim`` is split over the three axes (leftover channels are zero).
    """
    per_axis = (dim // 6) * 2  # an even number of channels per axis
    freqs = 1.0 / 10000 ** (torch.arange(per_axis // 2, device=device) / max(per_axis // 2, 1))  # (per_axis/2,)
    axes = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in size], indexing="ij")
    parts = []
    for pos in axes:
        args = pos.reshape(-1, 1) * freqs  # (N, per_axis/2)
        parts += [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=1)  # (N, 3 * per_axis)
    return F.pad(emb, (0, dim - emb.shape[1]))  # (N, dim)

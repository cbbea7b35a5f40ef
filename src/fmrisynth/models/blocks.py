"""Building blocks of the stage-2 denoiser: conditioning embedders, a FiLM conv block, a transformer block.

Conditioning follows DiT (Peebles & Xie, 2023), per frame: the timestep, the condition label and
the frame's design token are summed into one embedding ``c`` per frame (B*T, cond_dim) that
modulates every block — by FiLM (``x * (scale + 1) + shift``) in convolutional stages and by
AdaLN-Zero in transformer stages. The same are also given as a token sequence ``ctx``
(B, 2 + T, cond_dim) that transformer blocks cross-attend to, so the whole design stays visible to
every voxel token.

Space and time are factorised as in video diffusion (VDM, Ho et al. 2022; Latte, 2024): spatial
layers run on each frame (frames folded into the batch, (B*T, C, d, h, w)), temporal layers run
across frames at each location. Nothing depends on the clip length.

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


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that normalises a channels-last input with few channels per group in the standard layout.

    PyTorch's channels-last GroupNorm kernel on the CPU is 3x slower than the standard one when
    groups hold 1-3 channels (``tiny``'s 8 channels in 8 groups, s3m's 32 in 32), and faster from
    about 4 channels per group (s1m's 18 in 2): below that, two layout copies cost less.
    The parameters, and so checkpoints, are those of ``nn.GroupNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
        if x.device.type == "cpu" and channels_last and self.num_channels // self.num_groups < 4:
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last_3d)
        return super().forward(x)


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
    """The block design per frame (B, T) -> one token per frame (B, T, dim).

    The design is the fraction of each frame inside a task block (a boxcar). A stack of dilated
    temporal convolutions (receptive field 57 frames, longer than the HRF at any TR) turns it into
    "where is this frame relative to the blocks around it", the information the HRF needs. The
    design is zero-padded once (outside the clip there is no block) and the convolutions are
    'valid', so the tokens are exactly shift-equivariant and any number of frames works; the null
    design (all zeros) maps to one constant token.
    """

    def __init__(self, dim: int, hidden: int = 32, kernel: int = 9, dilations: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        layers, width = [], 1
        for d in dilations:
            layers += [nn.Conv1d(width, hidden, kernel, dilation=d), nn.SiLU()]
            width = hidden
        self.reach = sum(d * (kernel - 1) for d in dilations) // 2  # frames seen on each side
        self.convs = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, dim)

    def forward(self, design: torch.Tensor) -> torch.Tensor:
        h = self.convs(F.pad(design[:, None], (self.reach, self.reach)))  # (B, 1, T + 2 reach) -> (B, hidden, T)
        return self.out(h.transpose(1, 2))  # (B, T, hidden) -> (B, T, dim)


class ResBlock(nn.Module):
    """Convolutional residual block at constant width; the embedding sets a FiLM scale and shift.

    norm -> SiLU -> conv -> norm -> FiLM -> SiLU -> conv (zero-initialised, so the block starts as
    the identity) + skip.
    """

    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.norm1 = GroupNorm(groups(width), width)
        self.conv1 = nn.Conv3d(width, width, 3, padding=1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))
        self.norm2 = GroupNorm(groups(width), width, affine=False)
        self.conv2 = nn.Conv3d(width, width, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C, d, h, w)
        scale, shift = self.film(c)[:, :, None, None, None].chunk(2, dim=1)  # (B, cond) -> 2 x (B, C, 1, 1, 1)
        h = self.conv2(F.silu(modulate(self.norm2(h), shift, scale)))  # (B, C, d, h, w)
        return x + h


def rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding along the sequence axis of x (..., N, e), e even (Su et al., 2021).

    Attention scores then depend on relative positions only, so temporal attention trained on
    20-frame clips runs on a 512-frame run without positions it has never seen.

    Each channel pair (x1, x2) is rotated by its angle, (x1 cos - x2 sin, x1 sin + x2 cos): computed
    as one complex product (x1 + i x2) e^(i angle), in float32, which on the CPU is 3-5x faster than
    four products of strided halves.
    """
    n, e = x.shape[-2], x.shape[-1]
    freqs = 1.0 / 10000 ** (torch.arange(0, e, 2, device=x.device, dtype=torch.float32) / e)  # (e/2,)
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * freqs  # (N, e/2)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (e // 2, 2)).contiguous())  # (..., N, e/2): x1 + i x2
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)  # (..., N, e/2)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)  # (..., N, e)


class Attention(nn.Module):
    """Multi-head attention: self-attention (``rotary``: with relative positions), or cross-attention
    to ``context`` tokens of ``context_dim``."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, rotary: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.rotary = heads, rotary
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        source = x if context is None else context  # (B, M, dim or context_dim)
        q = rearrange(self.q(x), "b n (h e) -> b h n e", h=self.heads)  # (B, heads, N, e)
        k, v = rearrange(self.kv(source), "b m (two h e) -> two b h m e", two=2, h=self.heads)  # (B, heads, M, e)
        if self.rotary:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, e)
        return self.proj(rearrange(out, "b h n e -> b n (h e)"))  # (B, N, dim)


class TemporalConv(nn.Module):
    """Temporal mixing at every voxel of a conv level: norm -> SiLU -> dilated Conv1d over frames.

    Zero-initialised (starts as the identity). Frames arrive folded into the batch, (B*T, C, d, h,
    w); the convolution is translation-invariant in time, so any clip length works.

    The Conv1d's weights are applied as a (k, 1) Conv2d over (frames, voxels) of a channels-last
    view, not as a Conv1d over a (B*d*h*w, C, T) copy: in the channels-last layout the backbone
    keeps, (B*T, C, d, h, w) is stored as (B, T, d*h*w, C), which is exactly a channels-last
    (B, C, T, d*h*w) image, so no permuted copy is made and oneDNN runs one convolution over
    every voxel at once (3x faster on CPU than the copy and the 5120-row Conv1d it replaced).
    """

    def __init__(self, width: int, cond_dim: int, kernel: int = 3, dilation: int = 1):
        super().__init__()
        self.norm = GroupNorm(groups(width), width)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))
        self.conv = nn.Conv1d(width, width, kernel, padding=dilation * (kernel // 2), dilation=dilation)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, frames: int) -> torch.Tensor:
        scale, shift = self.film(c)[:, :, None, None, None].chunk(2, dim=1)  # (B*T, cond) -> 2 x (B*T, C, 1, 1, 1)
        h = F.silu(modulate(self.norm(x), shift, scale))  # (B*T, C, d, h, w)
        n, ch, *size = h.shape
        # a view when h is channels-last (a copy otherwise): (B, T, d*h*w, C) read as (B, C, T, d*h*w)
        h = h.permute(0, 2, 3, 4, 1).reshape(n // frames, frames, -1, ch).permute(0, 3, 1, 2)
        dilation = self.conv.dilation[0]
        h = F.conv2d(h, self.conv.weight[..., None], self.conv.bias, padding=(self.conv.padding[0], 0),
                     dilation=(dilation, 1))  # (B, C, T, d*h*w), channels-last  # fmt: skip
        h = h.permute(0, 2, 3, 1).reshape(n, *size, ch).permute(0, 4, 1, 2, 3)  # (B*T, C, d, h, w), channels-last view
        return x + h  # (B*T, C, d, h, w)


class TransformerBlock(nn.Module):
    """A space-time DiT block: spatial self-attention within each frame, temporal self-attention
    across frames at each token (Latte / VDM's factorisation), cross-attention to the condition
    tokens (as PixArt-alpha), MLP; AdaLN-Zero from the per-frame embedding.

    ``adaln=False`` drops the modulation (LayerNorms get their own affine parameters, the
    embedding then reaches the block only through the context); ``xattn=False`` drops the
    cross-attention. Either way the block starts as the identity: the AdaLN gates are
    zero-initialised or, without AdaLN, the output projections are; the cross-attention output
    projection always is.
    """

    def __init__(self, dim: int, heads: int, cond_dim: int, mlp_ratio: float = 4.0, adaln: bool = True, xattn: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm_t = nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6)
        self.tattn = Attention(dim, heads, rotary=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6) if xattn else None
        self.xattn = Attention(dim, heads, context_dim=cond_dim) if xattn else None
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 9 * dim)) if adaln else None
        zero = [self.adaLN_modulation[-1]] if adaln else [self.attn.proj, self.tattn.proj, self.mlp[-1]]
        for layer in zero + ([self.xattn.proj] if xattn else []):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor, frames: int) -> torch.Tensor:
        """x (B*T, N, dim) tokens of each frame, c (B*T, cond), ctx (B, M, cond) -> (B*T, N, dim)."""
        if self.adaLN_modulation is not None:
            mods = self.adaLN_modulation(c)[:, None].chunk(9, dim=-1)  # (B*T, cond) -> 9 x (B*T, 1, dim)
        else:
            mods = (0.0, 0.0, 1.0) * 3  # no modulation: shift 0, scale 0, gate 1
        (shift_s, scale_s, gate_s), (shift_t, scale_t, gate_t), (shift_m, scale_m, gate_m) = mods[:3], mods[3:6], mods[6:]
        n = x.shape[1]
        x = x + gate_s * self.attn(modulate(self.norm1(x), shift_s, scale_s))  # (B*T, N, dim)
        h = rearrange(modulate(self.norm_t(x), shift_t, scale_t), "(b t) n e -> (b n) t e", t=frames)  # (B*N, T, dim)
        x = x + gate_t * rearrange(self.tattn(h), "(b n) t e -> (b t) n e", n=n)  # (B*T, N, dim)
        if self.xattn is not None:
            q = rearrange(self.norm2(x), "(b t) n e -> b (t n) e", t=frames)  # (B, T*N, dim)
            x = x + rearrange(self.xattn(q, ctx), "b (t n) e -> (b t) n e", t=frames)  # attends to (B, M, cond)
        return x + gate_m * self.mlp(modulate(self.norm3(x), shift_m, scale_m))  # (B*T, N, dim)


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

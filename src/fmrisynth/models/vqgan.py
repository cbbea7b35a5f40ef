"""Stage 1: a 3D VQ-GAN that compresses one fMRI volume 4x (or 8x) per axis.

Volume (B, 1, D, H, W) ⇄ latent (B, c, D/f, H/f, W/f). The interface follows taming-transformers:
``encode(x) -> (quant, loss, info)`` and ``decode(quant) -> x̂``; ``latent(x)`` is the encoder output
before quantisation, which is what the latent store keeps and the diffusion stage models (as in
latent diffusion's VQ-regularised autoencoders: the decoder snaps latents to the codebook first).

The model is bound to its grid through the brain mask it holds as a buffer: decoded volumes are zero
outside the brain, and a checkpoint knows which grid and mask it was trained on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from fmrisynth.config import VQGANConfig
from fmrisynth.errors import FmrisynthError

# channels per resolution level (half resolution first; factor f uses the first log2(f) levels);
# res_blocks per level; the discriminator's width and depth (used by vqgan_loss.VQGANLoss).
PRESETS: dict[str, dict] = {
    "tiny": dict(channels=(16, 32, 32), res_blocks=1, attention=True, disc_channels=8, disc_layers=2),
    "base": dict(channels=(64, 128, 128), res_blocks=2, attention=True, disc_channels=32, disc_layers=3),
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise FmrisynthError(f"unknown VQ-GAN preset {name!r}; choose {' or '.join(PRESETS)}")
    return PRESETS[name]


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, 3x3x3 conv) x 2, 1x1x1 skip when widths differ."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(cin), nn.SiLU(), nn.Conv3d(cin, cout, 3, padding=1),
            _norm(cout), nn.SiLU(), nn.Conv3d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Attention(nn.Module):
    """Single-head self-attention over all voxels; used only at the lowest resolution, where it is cheap."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv3d(ch, 3 * ch, 1)
        self.proj = nn.Conv3d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n c) d h w -> n b 1 (d h w) c", n=3)  # 3 x (B, 1, N, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 1, N, C)
        return x + self.proj(rearrange(y, "b 1 (d h w) c -> b c d h w", d=d, h=h, w=w))


def _middle(ch: int, attention: bool) -> nn.Sequential:
    return nn.Sequential(ResBlock(ch, ch), Attention(ch) if attention else nn.Identity(), ResBlock(ch, ch))


def _head(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv3d(cin, cout, 3, padding=1))


class Encoder(nn.Module):
    """(B, 1, D, H, W) -> (B, c, D/f, H/f, W/f): a 2x2x2 patch stem, then residual levels with strided convs.

    The stem replaces taming's full-resolution level: 3D convolutions at full resolution cost most of
    the compute (on CPU, seconds per batch at the demo grid) for detail that a 2x2x2 patch embedding
    followed by 3x3x3 convolutions at half resolution keeps as well.
    """

    def __init__(self, channels: tuple[int, ...], res_blocks: int, attention: bool, latent_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(1, channels[0], 2, stride=2)]  # patch stem: halves every axis
        cin = channels[0]
        for i, ch in enumerate(channels):
            for _ in range(res_blocks):
                layers.append(ResBlock(cin, ch))
                cin = ch
            if i < len(channels) - 1:
                layers.append(nn.Conv3d(ch, ch, 3, stride=2, padding=1))  # halves every axis
        layers += [_middle(cin, attention), _head(cin, latent_channels)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, c, d, h, w) -> (B, 1, d·f, h·f, w·f): the encoder's mirror (nearest upsampling + conv, patch head)."""

    def __init__(self, channels: tuple[int, ...], res_blocks: int, attention: bool, latent_channels: int):
        super().__init__()
        cin = channels[-1]
        layers: list[nn.Module] = [nn.Conv3d(latent_channels, cin, 3, padding=1), _middle(cin, attention)]
        for i, ch in reversed(list(enumerate(channels))):
            for _ in range(res_blocks):
                layers.append(ResBlock(cin, ch))
                cin = ch
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(ch, ch, 3, padding=1)]
        self.net = nn.Sequential(*layers, _norm(cin), nn.SiLU())
        self.conv_out = nn.ConvTranspose3d(cin, 1, 2, stride=2)  # patch head: doubles every axis

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.net(z))


def _broadcast(*tensors: torch.Tensor) -> None:
    """Make every rank hold rank 0's values (after random restarts, which differ per rank)."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.broadcast(t, 0)


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of t, in rank order: what one process would hold for the global batch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _all_reduce(*tensors: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


class Quantizer(nn.Module):
    """Nearest-neighbour codebook with EMA or straight-through updates, dead-code restarts and usage stats.

    MONAI's EMAQuantizer was the first choice but lacks restarts and a gradient-trained mode, and its
    unused codes blow up on the first EMA step (zero cluster sizes); this one is initialised from the
    first batch of encoder outputs and keeps every code's EMA share of assignments (``counts``), which
    serves the EMA update, the restart rule and the usage statistics at once.

    Args:
        size: number of codes K.
        dim: code dimension (= latent channels).
        commitment: weight of ||z - sg(q)||² (the encoder's commitment to its code).
        ema: update codes as EMA cluster means (True) or by gradient through ||sg(z) - q||² (False).
        decay: EMA decay of ``counts`` (and of the codes when ``ema``).
        dead_threshold: a code whose share falls below this fraction of the uniform share 1/K is
            restarted at a random encoder output of the current batch.
    """

    def __init__(self, size: int, dim: int, commitment: float, ema: bool, decay: float, dead_threshold: float):
        super().__init__()
        self.size, self.commitment, self.ema = size, commitment, ema
        self.decay, self.dead_threshold = decay, dead_threshold
        codebook = torch.randn(size, dim)
        if ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("code_sum", torch.zeros(size, dim))  # EMA of the vectors assigned to each code
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("counts", torch.zeros(size))  # EMA of assignments per code
        self.register_buffer("initialised", torch.tensor(False))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, c) -> (N,) index of the nearest code."""
        cb = self.codebook.float()
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)  # (N, K)
        return dist2.argmin(1)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        onehot = F.one_hot(idx, self.size).type_as(flat)  # (N, K)
        n, sums = onehot.sum(0), onehot.t() @ flat  # (K,), (K, c)
        _all_reduce(n, sums)
        if not self.initialised:  # data-dependent init: codes at random encoder outputs, equal shares
            pool = _gather(flat)  # rank 0 draws from the global batch, as a single process would
            self.codebook.data.copy_(pool[torch.randint(len(pool), (self.size,), device=flat.device)])
            _broadcast(self.codebook.data)
            self.counts.fill_(n.sum().item() / self.size)
            if self.ema:
                self.code_sum.copy_(self.codebook * self.counts[:, None])
            self.initialised.fill_(True)
            return
        self.counts.lerp_(n, 1 - self.decay)
        if self.ema:  # codes = EMA cluster sums / EMA cluster sizes; an unused code stays where it is
            self.code_sum.lerp_(sums, 1 - self.decay)
            self.codebook.copy_(self.code_sum / self.counts.clamp(min=1e-12)[:, None])
        dead = self.counts < self.dead_threshold * self.counts.mean()
        if dead.any():
            pool = _gather(flat)
            picks = pool[torch.randint(len(pool), (int(dead.sum()),), device=flat.device)]
            self.codebook.data[dead] = picks + 1e-3 * picks.std() * torch.randn_like(picks)
            self.counts[dead] = self.counts.mean()
            if self.ema:
                self.code_sum[dead] = self.codebook[dead] * self.counts[dead, None]
            _broadcast(self.codebook.data, self.counts, *([self.code_sum] if self.ema else []))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """z (B, c, d, h, w) -> (quantised z with straight-through gradient, codebook loss, info)."""
        with torch.autocast(z.device.type, enabled=False):
            b, c, *spatial = z.shape
            flat = rearrange(z.float(), "b c d h w -> (b d h w) c")  # (N, c)
            if self.training:
                self._update(flat.detach(), self.nearest(flat.detach()))
            idx = self.nearest(flat.detach())  # (N,), against the updated codebook
            q = self.codebook[idx].float()  # (N, c)
            loss = self.commitment * F.mse_loss(flat, q.detach())
            if not self.ema:
                loss = loss + F.mse_loss(q, flat.detach())
            q = flat + (q - flat).detach()  # straight-through estimator
            probs = torch.bincount(idx, minlength=self.size).float() / len(idx)
            info = {
                "indices": idx.view(b, *spatial),
                "perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
                "codes_used": (probs > 0).float().mean(),
            }
            d, h, w = spatial
            return rearrange(q, "(b d h w) c -> b c d h w", b=b, d=d, h=h, w=w).type_as(z), loss, info


class VQGAN(nn.Module):
    """Encoder, quantiser and decoder of one volume on a fixed grid.

    Args:
        cfg: the ``vae`` config section (preset, latent channels, downsampling, codebook).
        mask: bool (D, H, W) brain mask; decoded volumes are zero outside it. Every side must be
            divisible by ``cfg.downsample``.
    """

    def __init__(self, cfg: VQGANConfig, mask: np.ndarray | torch.Tensor):
        super().__init__()
        p = preset(cfg.preset)
        if cfg.downsample not in (4, 8):
            raise FmrisynthError(f"vae.downsample must be 4 or 8, got {cfg.downsample}")
        if cfg.quantizer not in ("ema", "st"):
            raise FmrisynthError(f"vae.quantizer must be 'ema' or 'st', got {cfg.quantizer!r}")
        shape = tuple(mask.shape)
        if len(shape) != 3 or any(s % cfg.downsample for s in shape):
            raise FmrisynthError(
                f"grid {'x'.join(map(str, shape))} is not divisible by the VQ-GAN downsampling factor "
                f"{cfg.downsample}; pad the grid (e.g. --grid 6mm:32x40x32) or set vae.downsample"
            )
        levels = int(math.log2(cfg.downsample))
        args = (p["channels"][:levels], p["res_blocks"], p["attention"], cfg.latent_channels)
        self.encoder, self.decoder = Encoder(*args), Decoder(*args)
        self.quantizer = Quantizer(
            cfg.codebook_size, cfg.latent_channels, cfg.commitment, cfg.quantizer == "ema", cfg.ema_decay, cfg.dead_code_threshold
        )
        self.register_buffer("mask", torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None])  # (1, 1, D, H, W)
        self.downsample = cfg.downsample

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(self.mask.shape[2:])  # type: ignore[return-value]

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, D, H, W) -> unquantised latent (B, c, D/f, H/f, W/f)."""
        return self.encoder(x * self.mask)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """x (B, 1, D, H, W) -> (quant (B, c, d, h, w), codebook loss, info with indices and usage)."""
        return self.quantizer(self.latent(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """quant (B, c, d, h, w) -> volume (B, 1, D, H, W), zero outside the brain."""
        return self.decoder(quant) * self.mask

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        quant, loss, info = self.encode(x)
        return self.decode(quant), loss, info

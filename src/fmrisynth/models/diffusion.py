"""Gaussian diffusion on latent clips: noise schedule, training loss, DDPM/DDIM sampling, guidance.

The diffusion object owns everything about noise, so a denoiser is only a function
``model(x_t, t, label, design) -> eps or v`` (either backbone). Conventions follow DDPM (Ho et al.,
2020) and DDIM (Song et al., 2021) as implemented by MONAI's schedulers, which the tests compare
against step by step:

* one update rule serves every sampler: DDIM's, with eta = 0 (deterministic DDIM) or eta = 1
  (ancestral DDPM with the "fixed small" posterior variance; over all 1000 steps it is exactly
  MONAI's DDPM step, over fewer it is the strided ancestral sampler);
* ``analytic``: the ancestral step with the variance that is exact for the model (Analytic-DPM,
  Bao et al. 2022): the posterior-mean step plus the spread of x0 given x_t, which is the model's
  own x0 error, measured on training clips after training (``measure_x0_error``; unit white data
  and the untrained model: 1 - a_t). Both DDIM and fixed-small DDPM lose variance over few steps
  even with a perfect denoiser: for white data each DDIM step multiplies x by cos(angle step), so
  10 steps keep 78 % of the variance. In the whitened units of a Gaussian prior the data are
  nearly white, and ``analytic`` keeps it;
* sampling timesteps are ``linspace(num_steps - 1, 0, steps)`` rounded, as MONAI's DDIM;
* nothing is clipped: latents are normalised to unit variance, not to [-1, 1].

The direct path. With v-prediction (Salimans & Ho, 2022) the denoised estimate is
``x0 = sqrt(a) x_t - sqrt(1 - a) v``; for unit-variance latents this is exactly EDM's
preconditioning (Karras et al., 2022) with sigma_data = 1: c_skip = a, c_out = sqrt(1 - a), and
x_t already has unit variance (c_in = 1). The backbone's output layer starts at zero, so the
untrained model returns ``sqrt(a) x_t``, the best linear denoiser of unit-variance white data, and
learning only has to add what is not white. We keep the DDPM schedule (verified against MONAI)
rather than EDM's continuous sigmas, so both samplers stay as they are; ``eps`` remains available
as the reference's choice.

Every training run logs two reference losses, computed in closed form from the training latents
under the same schedule, weighting and target (``reference_losses``): ``ref_loss_gaussian``, the
best a denoiser can do that knows each latent element's mean and variance but no correlation at
all, and ``ref_loss_white``, the same for unit white noise (what the untrained model scores). A
run whose loss is not below the first has learned nothing about the clips' structure.

Classifier-free guidance (Ho & Salimans, 2022): training replaces the condition by the null one
(label ``null_label``, an all-zero design) with probability ``cond_drop``; sampling mixes the two
predictions, ``uncond + guidance * (cond - uncond)`` (guidance 1 = the conditional model alone).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fmrisynth.config import DiffusionConfig
from fmrisynth.errors import FmrisynthError

SAMPLERS = {"ddim": (0.0, False), "ddpm": (1.0, False), "analytic": (1.0, True)}  # sampler -> (eta, analytic variance)


def design_boxcar(onset_s: torch.Tensor, duration_s: torch.Tensor, tr: torch.Tensor, frames: int) -> torch.Tensor:
    """A block as the denoiser's ``design`` input: the fraction of each frame [k tr, (k+1) tr) that
    lies inside the block, (B,) x 3 -> (B, T); for training clips and generated ones alike."""
    start = torch.arange(frames, device=tr.device, dtype=torch.float32)[None] * tr[:, None]  # (B, T)
    end, onset = start + tr[:, None], onset_s[:, None]  # (B, T), (B, 1)
    overlap = torch.minimum(end, onset + duration_s[:, None]) - torch.maximum(start, onset)  # (B, T)
    return (overlap.clamp(min=0) / tr[:, None]).float()


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """The noise schedule beta_t, t = 0 .. num_steps - 1, in float64."""
    n = cfg.num_steps
    if cfg.schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    if cfg.schedule == "scaled-linear":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float64) ** 2
    if cfg.schedule == "cosine":  # Nichol & Dhariwal (2021), s = 0.008, betas capped at 0.999
        x = torch.linspace(0, n, n + 1, dtype=torch.float64)
        alpha_bar = torch.cos((x / n + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, 0.999)
    raise FmrisynthError(f"unknown noise schedule {cfg.schedule!r}; choose linear, scaled-linear or cosine")


class Diffusion:
    """Forward noising, the training loss and the samplers for one schedule.

    Args:
        cfg: the schedule, the prediction target ("eps" or "v") and ``cond_drop``.
        null_label: the label meaning "no condition" (the denoiser's ``n_classes``).
        x0_error: (num_steps,) the model's mean squared x0 error at each timestep over 1 - a_t (the
            error of unit white data's best denoiser); None: 1, as for the untrained model.
    """

    def __init__(self, cfg: DiffusionConfig, null_label: int, x0_error: list[float] | None = None):
        if cfg.prediction not in ("eps", "v"):
            raise FmrisynthError(f"unknown prediction target {cfg.prediction!r}; choose eps or v")
        if cfg.weighting not in ("plain", "min-snr"):
            raise FmrisynthError(f"unknown loss weighting {cfg.weighting!r}; choose plain or min-snr")
        self.cfg, self.null_label = cfg, null_label
        self.num_steps = cfg.num_steps
        self.alpha_bar = torch.cumprod(1 - make_betas(cfg), dim=0)  # (num_steps,) float64
        self.x0_error = torch.ones(cfg.num_steps, dtype=torch.float64) if x0_error is None else \
            torch.tensor(x0_error, dtype=torch.float64)  # fmt: skip

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast over ``like`` (B, ...)."""
        a = self.alpha_bar.to(like.device)[t].to(like.dtype).reshape(-1, *[1] * (like.ndim - 1))  # (B, 1, ...)
        return a.sqrt(), (1 - a).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def drop_condition(self, label: torch.Tensor, design: torch.Tensor, drop: torch.Tensor):
        """Replace the condition of the samples where ``drop`` (B,) is true by the null condition."""
        return torch.where(drop, torch.full_like(label, self.null_label), label), design * ~drop[:, None]

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """Loss weight per timestep (B,): 1, or min-SNR-5 expressed for the eps or v target."""
        if self.cfg.weighting == "plain":
            return torch.ones(t.shape, dtype=torch.float64, device=t.device)
        a = self.alpha_bar.to(t.device)[t]
        snr = a / (1 - a)
        return snr.clamp(max=5.0) / (snr + 1 if self.cfg.prediction == "v" else snr)

    def loss(self, model, x0: torch.Tensor, label: torch.Tensor, design: torch.Tensor,
             draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """Weighted mean squared error of the eps/v prediction at uniformly drawn timesteps.

        x0 (B, T, c, d, h, w) normalised latents, label (B,), design (B, T). ``draws`` = (t (B,)
        long, noise like x0, drop (B,) bool) lets the caller own the randomness (exact resume,
        one noise stream over ranks); by default they come from torch's global generator.
        """
        b = x0.shape[0]
        if draws is None:
            draws = (torch.randint(0, self.num_steps, (b,), device=x0.device), torch.randn_like(x0),
                     torch.rand(b, device=x0.device) < self.cfg.cond_drop)  # fmt: skip
        t, noise, drop = draws
        label, design = self.drop_condition(label, design, drop)
        out = model(self.q_sample(x0, t, noise), t, label, design)  # (B, T, c, d, h, w)
        if self.cfg.prediction == "eps":
            target = noise
        else:
            a, s = self._coefs(t, x0)
            target = a * noise - s * x0  # v = sqrt(a) eps - sqrt(1 - a) x0
        per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
        return (per_sample * self.weights(t).to(per_sample)).mean()

    def reference_losses(self, variance: torch.Tensor) -> dict[str, float]:
        """Expected loss of the best denoiser of independent Gaussian elements, in closed form.

        ``variance`` holds each element's variance in the normalised units the model sees (any
        shape). For x0 ~ N(mu, s2), x_t = a x0 + b eps, the best predictor of the target y is
        affine in x_t and leaves Var(y) - Cov(y, x_t)^2 / Var(x_t): for eps 1 - b^2 / (a^2 s2 + b^2),
        for v (a^2 + b^2 s2) - a^2 b^2 (1 - s2)^2 / (a^2 s2 + b^2). Averaged over the timesteps
        (uniform, as in training) with the loss weights. Returns ``ref_loss_gaussian`` for the given
        variances and ``ref_loss_white`` for unit white noise.
        """
        a2 = self.alpha_bar.to(torch.float64)[:, None]  # (S, 1)
        b2 = 1 - a2
        w = self.weights(torch.arange(self.num_steps))[:, None]  # (S, 1)

        def expected(s2: torch.Tensor) -> float:
            s2 = s2.to(torch.float64).flatten()[None]  # (1, E)
            vx = a2 * s2 + b2  # (S, E)
            if self.cfg.prediction == "eps":
                mse = 1 - b2 / vx
            else:
                mse = (a2 + b2 * s2) - a2 * b2 * (1 - s2) ** 2 / vx
            return float((w * mse).mean())

        return {"ref_loss_gaussian": expected(variance), "ref_loss_white": expected(torch.ones(1))}

    @torch.no_grad()
    def measure_x0_error(self, model, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                         points: int = 20, seed: int = 0) -> list[float]:  # fmt: skip
        """The model's x0 error at every timestep, over 1 - a_t (``x0_error``), from ``points`` timesteps
        (interpolated between them) on ``batches`` of (x0 (B, T, ...), label (B,), design (B, T)).

        The x0 error is (1 - a) times the v error, or (1 - a) / a times the eps error.
        """
        gen = torch.Generator().manual_seed(seed)
        grid = torch.linspace(0, self.num_steps - 1, points).round().long()
        errors = []
        for t in grid.tolist():
            total, n = 0.0, 0
            for x0, label, design in batches:
                tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
                noise = torch.randn(x0.shape, generator=gen).to(x0.device)
                out = model(self.q_sample(x0, tt, noise), tt, label, design).float()  # (B, T, ...)
                a = float(self.alpha_bar[t])
                target = noise if self.cfg.prediction == "eps" else math.sqrt(a) * noise - math.sqrt(1 - a) * x0
                total += float((out - target).pow(2).sum())
                n += out.numel()
            errors.append(total / n / (a if self.cfg.prediction == "eps" else 1.0))
        return np.interp(np.arange(self.num_steps), grid.numpy(), errors).tolist()

    def predict(self, model, x: torch.Tensor, t: int, label: torch.Tensor, design: torch.Tensor, guidance: float):
        """The model's output at timestep ``t``, mixed with the unconditional one by ``guidance``."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)  # (B,)
        if guidance == 1.0:
            return model(x, tt, label, design)  # (B, T, c, d, h, w)
        null_label, null_design = self.drop_condition(label, design, torch.ones_like(label, dtype=torch.bool))
        out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([label, null_label]),
                    torch.cat([design, null_design]))  # fmt: skip  # (2B, T*c, d, h, w)
        cond, uncond = out.chunk(2)  # 2 x (B, T, c, d, h, w)
        return uncond + guidance * (cond - uncond)

    def step(self, out: torch.Tensor, t: int, t_prev: int, x: torch.Tensor, eta: float,
             noise: torch.Tensor | None = None, analytic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """One reverse step from timestep ``t`` to ``t_prev`` (-1: to the clean sample).

        DDIM's update (eq. 12 of Song et al.) with sigma = eta * sqrt of the DDPM posterior variance;
        ``analytic`` adds c0^2 Var(x0 | x_t) to the noise variance (c0: the posterior mean's weight on
        x0; Var(x0 | x_t) = (1 - a_t) x0_error[t]). Returns (x_{t_prev}, predicted x0); ``noise``
        is needed when the step adds noise.
        """
        a = float(self.alpha_bar[t])
        a_prev = float(self.alpha_bar[t_prev]) if t_prev >= 0 else 1.0
        if self.cfg.prediction == "eps":
            eps = out
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        else:
            x0 = math.sqrt(a) * x - math.sqrt(1 - a) * out
            eps = math.sqrt(a) * out + math.sqrt(1 - a) * x
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if analytic:
            c0 = math.sqrt(a_prev) * (1 - a / a_prev) / (1 - a)
            sigma = math.sqrt(sigma**2 + c0**2 * (1 - a) * float(self.x0_error[t]))
        if sigma > 0:
            x_prev = x_prev + sigma * noise
        return x_prev, x0

    def timesteps(self, steps: int) -> list[int]:
        """The ``steps`` timesteps a sampler visits, from noisiest to cleanest (MONAI DDIM's spacing)."""
        if not 1 <= steps <= self.num_steps:
            raise FmrisynthError(f"sampling steps must be between 1 and {self.num_steps}, got {steps}")
        return torch.linspace(self.num_steps - 1, 0, steps).round().long().tolist()

    @torch.no_grad()
    def sample(self, model, label: torch.Tensor, design: torch.Tensor, shape: tuple[int, ...], steps: int = 50,
               sampler: str = "ddim", guidance: float = 1.0,
               generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:  # fmt: skip
        """Generate normalised latents (B, *shape) for labels (B,) and designs (B, T).

        All randomness comes from ``generator``: CPU generators, so the same seed gives the same
        samples on any device; one per sample (a list of B) makes each sample independent of the
        others in the batch.
        """
        if sampler not in SAMPLERS:
            raise FmrisynthError(f"unknown sampler {sampler!r}; choose {' or '.join(SAMPLERS)}")
        (eta, analytic), device = SAMPLERS[sampler], label.device

        def randn() -> torch.Tensor:  # (B, T, c, d, h, w)
            if isinstance(generator, (list, tuple)):
                return torch.stack([torch.randn(*shape, generator=g) for g in generator]).to(device)
            return torch.randn(label.shape[0], *shape, generator=generator).to(device)

        x = randn()
        ts = self.timesteps(steps)
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            out = self.predict(model, x, t, label, design, guidance).float()  # (B, T, c, d, h, w)
            noisy = eta > 0 and (t_prev >= 0 or analytic)
            x, _ = self.step(out, t, t_prev, x, eta, randn() if noisy else None, analytic)
        return x

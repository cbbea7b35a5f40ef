"""A Gaussian model of the task-free background of fMRI clips, per subject, exactly invertible.

One model serves three places, fitted on three kinds of frames (README, "Realism"):

* the **Gaussian generator**: clip - task response, in voxels. Response + a draw of this model is a
  training-free generator of a dataset in seconds, and the peer every deep model is measured against;
* the **diffusion prior** (PriorGrad, Lee et al. 2022): the residual latents. The denoiser diffuses
  ``whiten(z)`` instead of z, so its zero-initialised v-prediction output makes the untrained model
  the exact denoiser of this Gaussian (its samples, coloured, are draws of it) and training can only
  add what is not Gaussian;
* the **codec residual**: clip - decode(encode(clip)), what the VQ-GAN drops, added back to decoded clips.

The model of a frame sequence x (T, E) of subject s (E voxels or latent elements):

    x_t = mu_s + A y_t,    A A^T = U diag(lam) U^T + diag(psi)     (top-K PCA + a diagonal remainder)
    y   = Q p + r          p (T, K) along the K directions Q, r (T, E) in their complement
    p[:, k] ~ N(0, C[s, k]),   r[:, e] ~ N(0, C[s, K]) for every complement dimension e

The spatial part A is pooled over subjects (one basis); what differs from subject to subject, the
mean frame and the T x T time covariances of each direction and of the rest (amplitude,
autocorrelation, global signal), is estimated per subject and shrunk towards the pooled estimate
with the weight of ``prior_clips`` clips (a conjugate, inverse-Wishart-like posterior mean), so a
subject with few clips falls back on the pool.

Clips also differ in overall amplitude from run to run, far more than within a run (on the demo
data the log within-clip variance has an sd of 0.35 across runs and 0.08 within one), which no
single Gaussian reproduces. So each clip carries a gain: x - mu_s = exp(zeta * tau / 2) A y, with
zeta ~ N(0, 1) per clip (a Gaussian scale mixture) and tau the sd of the clips' log within-clip
variance around their subject's mean, less what a Gaussian draw varies by itself.
``whiten`` estimates each clip's gain from the clip itself (its log within-clip variance, shrunk by
the share of its spread that is gain) and divides it out; ``color`` takes zeta, drawn by the caller, so that several models (the
latent prior, the codec residual) can give one generated clip one gain. ``whiten`` maps x to white noise and ``color`` back,
both exactly: A^{-1} = (I + Q diag(g) Q^T) diag(psi)^-1/2 with g = (1 + s^2)^-1/2 - 1 (Woodbury on
the square root). Clips of another length than the fitted T use a stationary form of each time
covariance (its biased autocovariance, extended by a Yule-Walker autoregression), so whole runs of
any length are drawn and whitened the same way.

``background.npz`` files are written and read here only (``save`` / ``load``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fmrisynth.errors import FmrisynthError

POOLED = -1  # the subject index of the pooled model (an unseen subject; the pooled ablation)
# the files of a latent store that hold background models (generate/fit.py:fit_backgrounds writes them)
BACKGROUND, PRIOR, CODEC_RESIDUAL = "background.npz", "latent_prior.npz", "codec_residual.npz"


@dataclass
class GaussianBackground:
    """Arrays (float32 numpy) of a fitted model; see the module docstring for the symbols."""

    subjects: list[str]
    mean: np.ndarray  # (S + 1, E) mean frame per subject, last: pooled
    psi: np.ndarray  # (E,) diagonal remainder variance
    q: np.ndarray  # (E, K) orthonormal low-rank directions in psi^-1/2 units
    s: np.ndarray  # (K,) their singular values
    cov: np.ndarray  # (S + 1, K + 1, T, T) time covariance per subject (last: pooled) of each direction, last: rest
    tau: float  # sd of the clips' log gains (0: one Gaussian)
    gain_shrink: float  # share of a clip's log-variance deviation that is gain (the rest is sampling noise)
    _factors: dict = field(default_factory=dict, repr=False, compare=False)  # frames -> ``factors(frames)``
    _tensors: dict = field(default_factory=dict, repr=False, compare=False)  # (name, device) -> tensor there

    # ---- fitting ---------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, clips: np.ndarray, subjects: list[str] | np.ndarray, components: int = 50, prior_clips: float = 10.0,
            max_frames: int = 8000, seed: int = 0, gains: bool = True) -> "GaussianBackground":  # fmt: skip
        """Fit on clips (N, T, E) float32 of the subjects ``subjects`` (N,) (names or ids).

        ``gains`` models each clip's amplitude (the scale mixture). The spread of the clips' log
        within-clip variance is partly what any Gaussian gives (a draw's own sampling noise, measured on draws of
        the model fitted without gains); only the excess is gain: tau^2 = spread^2 - noise^2, and
        each clip's gain is its deviation shrunk by tau^2 / spread^2 (empirical Bayes) before the
        clips are put on a common gain and the model is fitted again.
        """
        clips = np.asarray(clips, dtype=np.float32)
        if clips.ndim != 3 or len(clips) < 2 or not np.isfinite(clips).all():
            raise FmrisynthError(f"a background model needs at least 2 finite clips (N, T, E); got {clips.shape}")
        names = [str(x) for x in subjects]
        order = sorted(set(names))
        sid = np.array([order.index(x) for x in names])  # (N,)
        counts = np.bincount(sid, minlength=len(order)).astype(np.float64)  # clips per subject
        shrink = counts / (counts + prior_clips)  # weight of a subject's own estimate
        pooled_mean = clips.mean((0, 1), dtype=np.float64)  # (E,)
        own = np.stack([clips[sid == i].mean((0, 1), dtype=np.float64) for i in range(len(order))])  # (S, E)
        mean = np.concatenate([shrink[:, None] * own + (1 - shrink[:, None]) * pooled_mean, pooled_mean[None]])
        x = torch.from_numpy(clips) - torch.from_numpy(mean[sid].astype(np.float32))[:, None]  # (N, T, E) centred

        def deviation(y: torch.Tensor) -> np.ndarray:  # (N,) log within-clip variance around the subject's mean
            y = y.double()
            log_var = (y - y.mean(1, keepdim=True)).pow(2).mean((1, 2)).log().numpy()
            return log_var - (np.bincount(sid, log_var) / counts)[sid]

        plain = cls._fit_centred(x, order, sid, counts, shrink, mean, components, max_frames, seed)
        if not gains:
            return plain
        dev = deviation(x)
        spread2 = float((dev**2).mean())
        drawn = torch.from_numpy(plain.sample(x.shape[1], sid, np.random.default_rng(seed)))  # (N, T, E), no gains
        tau2 = max(spread2 - float((deviation(drawn) ** 2).mean()), 0.0)
        gain = dev * tau2 / spread2 if spread2 > 0 else np.zeros(len(x))  # (N,) shrunk log gains
        model = cls._fit_centred(x * torch.from_numpy(np.exp(-gain / 2)).float()[:, None, None], order, sid, counts,
                                 shrink, mean, components, max_frames, seed)  # fmt: skip
        model.tau, model.gain_shrink = float(np.sqrt(tau2)), tau2 / spread2 if spread2 > 0 else 0.0
        return model

    @classmethod
    def _fit_centred(cls, x: torch.Tensor, order: list[str], sid: np.ndarray, counts: np.ndarray, shrink: np.ndarray,
                     mean: np.ndarray, components: int, max_frames: int, seed: int) -> "GaussianBackground":  # fmt: skip
        """The Gaussian (no gains) of centred clips x (N, T, E): spatial part, then time covariances."""
        n, t, e = x.shape
        frames = x.reshape(n * t, e)
        pick = torch.from_numpy(np.random.default_rng(seed).permutation(n * t)[:max_frames])
        sub = frames[pick].double()  # (F, E)
        k = max(1, min(components, len(sub) - 1, e - 1))
        u, sv, _ = torch.svd_lowrank(sub.T, q=min(k + 10, min(sub.shape)), niter=4, M=None)  # u (E, k+10)
        u, lam = u[:, :k], sv[:k] ** 2 / (len(sub) - 1)  # (E, K), (K,)
        var = sub.var(0)  # (E,)
        psi = (var - (u**2 * lam).sum(1)).clamp(min=0.05 * var.clamp(min=1e-8))  # (E,)
        qm, s, _ = torch.linalg.svd(u * lam.sqrt() / psi.sqrt()[:, None], full_matrices=False)  # (E, K), (K,)
        model = cls(order, mean.astype(np.float32), psi.float().numpy(), qm.float().numpy(), s.float().numpy(),
                    np.zeros((len(order) + 1, k + 1, t, t), np.float32), 0.0, 0.0)  # fmt: skip

        p, r = model._split(model._spatial_inverse(x))  # (N, T, K), (N, T, E)
        own_cov = torch.zeros(len(order), k + 1, t, t, dtype=torch.float64)
        for i in range(len(order)):
            mine = sid == i
            pi, ri = p[mine].double(), r[mine].double()
            own_cov[i, :k] = torch.einsum("ntk,nuk->ktu", pi, pi) / mine.sum()
            own_cov[i, k] = torch.einsum("nte,nue->tu", ri, ri) / (mine.sum() * max(e - k, 1))
        pooled = (own_cov * torch.from_numpy(counts)[:, None, None, None]).sum(0) / n  # (K + 1, T, T)
        w = torch.from_numpy(shrink)[:, None, None, None]
        model.cov = torch.cat([w * own_cov + (1 - w) * pooled, pooled[None]]).float().numpy()
        return model

    # ---- the transform -------------------------------------------------------------------------------------
    def _t(self, name: str, like: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """The array ``name`` (or the factors for ``frames`` frames) on ``like``'s device, copied there once:
        the prior whitens every training batch, and a copy per call would move the spatial basis (about
        13 MB at 2 mm) from host to GPU at every step."""
        key = (name, frames, like.device)
        if key not in self._tensors:
            array = self.factors(frames) if name == "factors" else getattr(self, name)
            self._tensors[key] = torch.as_tensor(array, device=like.device)
        return self._tensors[key]

    def _spatial_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """y = A^-1 x for centred frames x (..., E)."""
        q, g = self._t("q", x), (1 + self._t("s", x) ** 2).rsqrt() - 1  # (E, K), (K,)
        y = x / self._t("psi", x).sqrt()
        return y + (y @ q) * g @ q.T

    def _spatial(self, y: torch.Tensor) -> torch.Tensor:
        """x = A y, (..., E)."""
        q, f = self._t("q", y), (1 + self._t("s", y) ** 2).sqrt() - 1  # (E, K), (K,)
        return (y + (y @ q) * f @ q.T) * self._t("psi", y).sqrt()

    def _split(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., T, E) -> coordinates along Q (..., T, K) and the complement (..., T, E)."""
        p = y @ self._t("q", y)
        return p, y - p @ self._t("q", y).T

    def factors(self, frames: int) -> np.ndarray:
        """Cholesky factors (S + 1, K + 1, frames, frames) of the time covariances for ``frames`` frames,
        computed once per length (every generated clip or run colours with them)."""
        if frames not in self._factors:
            t = self.cov.shape[-1]
            cov = self.cov.astype(np.float64) if frames == t else stationary(self.cov, frames)
            jitter = 1e-5 * np.trace(cov, axis1=-2, axis2=-1)[..., None, None] / frames * np.eye(frames)
            self._factors[frames] = np.linalg.cholesky(cov + jitter).astype(np.float32)
        return self._factors[frames]

    def _subject_rows(self, subjects: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        idx = subjects.long() if isinstance(subjects, torch.Tensor) else torch.as_tensor(np.asarray(subjects)).long()
        return torch.where(idx < 0, torch.full_like(idx, len(self.subjects)), idx)  # POOLED -> the last row

    def whiten(self, x: torch.Tensor, subjects) -> torch.Tensor:
        """Clips x (B, T, E) of subjects (B,) (indices, POOLED allowed) -> white noise (B, T, E).

        With gains (tau > 0) each clip's own gain, estimated from its within-clip variance, is divided out.
        """
        rows = self._subject_rows(subjects).to(x.device)
        chol = self._t("factors", x, x.shape[1])[rows]  # (B, K + 1, T, T)
        p, r = self._split(self._spatial_inverse(x - self._t("mean", x)[rows][:, None]))
        p = torch.linalg.solve_triangular(chol[:, :-1], p.transpose(1, 2)[..., None], upper=False)[..., 0]  # (B, K, T)
        r = torch.linalg.solve_triangular(chol[:, -1], r, upper=False)  # (B, T, E)
        w = p.transpose(1, 2) @ self._t("q", x).T + r  # (B, T, E)
        within = (w - w.mean(1, keepdim=True)).pow(2).mean((1, 2), keepdim=True) * w.shape[1] / max(w.shape[1] - 1, 1)
        return w * within.pow(-self.gain_shrink / 2)  # the clip's own gain out (white: within-clip variance 1)

    def color(self, w: torch.Tensor, subjects, zeta: torch.Tensor | None = None) -> torch.Tensor:
        """White noise w (B, T, E) -> clips (B, T, E) of subjects (B,), with gains exp(zeta tau / 2) (zeta (B,),
        standard normal; None: the common gain). With zeta = 0 the inverse of ``whiten`` for a clip of that gain."""
        rows = self._subject_rows(subjects).to(w.device)
        chol = self._t("factors", w, w.shape[1])[rows]  # (B, K + 1, T, T)
        p, r = self._split(w)
        p = (chol[:, :-1] @ p.transpose(1, 2)[..., None])[..., 0].transpose(1, 2)  # (B, T, K)
        x = self._spatial(p @ self._t("q", w).T + chol[:, -1] @ r)  # (B, T, E)
        if zeta is not None:
            x = x * torch.exp(torch.as_tensor(zeta, dtype=x.dtype, device=x.device) * self.tau / 2)[:, None, None]
        return x + self._t("mean", w)[rows][:, None]

    def sample(self, frames: int, subjects, rng: np.random.Generator, zeta: np.ndarray | None = None) -> np.ndarray:
        """Clips (B, frames, E) float32 of subjects (B,), drawn with ``rng`` (gains too, unless ``zeta`` (B,) is given)."""
        subjects = np.asarray(subjects)
        w = torch.from_numpy(rng.standard_normal((len(subjects), frames, self.psi.shape[0]), dtype=np.float32))
        zeta = rng.standard_normal(len(subjects)) if zeta is None else zeta
        return self.color(w, subjects, zeta=torch.as_tensor(zeta)).numpy()

    def draw_subjects(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Indices (n,) of training subjects, drawn uniformly: a generated clip takes one subject's style."""
        return rng.integers(len(self.subjects), size=n)

    def index(self, names: list[str]) -> np.ndarray:
        """Subject indices (n,) of ``names``; POOLED for subjects the model has not seen."""
        return np.array([self.subjects.index(x) if x in self.subjects else POOLED for x in map(str, names)])

    # ---- file ------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        np.savez(path, subjects=np.array(self.subjects), mean=self.mean, psi=self.psi, q=self.q, s=self.s, cov=self.cov,
                 tau=self.tau, gain_shrink=self.gain_shrink)  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> "GaussianBackground":
        try:
            with np.load(path) as f:
                model = cls([str(x) for x in f["subjects"]], f["mean"], f["psi"], f["q"], f["s"], f["cov"], float(f["tau"]),
                            float(f["gain_shrink"]))  # fmt: skip
        except (OSError, KeyError, ValueError) as e:
            raise FmrisynthError(f"not a readable background model ({e})", path) from None
        if not all(np.isfinite(a).all() for a in (model.mean, model.psi, model.q, model.s, model.cov, model.tau)):
            raise FmrisynthError("background model holds non-finite values", path)
        return model


def stationary(cov: np.ndarray, frames: int) -> np.ndarray:
    """Toeplitz covariances (..., frames, frames) of the stationary processes closest to cov (..., T, T).

    Only the within-clip part is extended: C of clips with their own means removed (H C H, H the
    centring matrix; scaled back by T / (T - 1)). A clip's offset from its subject's mean, half of
    a demo clip's variance, would otherwise read as a fluctuation slower than the clip itself and
    an AR fit would carry it over the whole run (whole-run lag-1 0.40-0.51 against 0.17 simulated).
    The biased autocovariance g(l) = sum_t C[t, t + l] / T is positive definite (an average of
    each draw's biased autocovariance), so its Yule-Walker AR(T - 1) fit is stable and extends
    g beyond lag T - 1 without ever leaving the positive-definite cone.
    """
    from scipy.linalg import solve_toeplitz

    t = cov.shape[-1]
    centre = np.eye(t) - 1.0 / t  # (T, T)
    flat = centre @ cov.reshape(-1, t, t).astype(np.float64) @ centre * (t / max(t - 1, 1))  # within-clip part
    out = np.empty((len(flat), frames, frames))
    lags = np.abs(np.subtract.outer(np.arange(frames), np.arange(frames)))
    for i, c in enumerate(flat):
        g = np.array([np.trace(c, offset=k) for k in range(t)]) / t  # (T,)
        if frames > t:
            phi = solve_toeplitz(g[:-1], g[1:]) if g[0] > 0 else np.zeros(t - 1)  # AR(T - 1)
            g = np.concatenate([g, np.zeros(frames - t)])
            for k in range(t, frames):
                g[k] = phi @ g[k - 1 : k - t : -1]  # g(k) = sum_i phi_i g(k - i), i = 1 .. T - 1
        out[i] = g[lags]
    return out.reshape(*cov.shape[:-2], frames, frames)

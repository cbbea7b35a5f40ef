"""Batched first-level GLM of clips and the group one-sample t map (docs/design.md protocol, step 1).

Every clip gets the same model: OLS of each voxel on [HRF-convolved block regressor of the clip's
condition, intercept, polynomial drift]. Clips differ only in where the block sits (onset,
duration, TR), so the designs are tiny (T, p) matrices that are inverted together and applied with
one batched matmul; the cost is a few passes over the data, against nilearn's per-clip model
objects. The numbers agree with ``nilearn.glm.first_level.run_glm`` on the same design (a test).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fmrisynth.tasks import block_regressor


@lru_cache(maxsize=4096)
def _regressor(onset_s: float, duration_s: float, n_frames: int, tr: float, hrf: str) -> np.ndarray:
    # Clips share a handful of (onset, duration, TR) combinations: compute each regressor once.
    return block_regressor([onset_s], [duration_s], n_frames, tr, hrf)


def design_matrices(
    onsets_s: np.ndarray,
    durations_s: np.ndarray,
    trs: np.ndarray,
    n_frames: int,
    hrf: str = "glover",
    drift_order: int = 1,
) -> np.ndarray:
    """One design per clip: columns [task, intercept, drift^1 .. drift^order]; (N, T, 2 + order).

    The drift is a power of frame time rescaled to [-1, 1]; with the intercept it spans the same
    space as nilearn's ``drift_model="polynomial"``, so the task beta and t are identical.
    """
    ramp = np.linspace(-1.0, 1.0, n_frames)  # (T,)
    nuisance = np.stack([ramp**k for k in range(drift_order + 1)], axis=1)  # (T, 1 + order)
    designs = np.empty((len(onsets_s), n_frames, 2 + drift_order))  # (N, T, p)
    for n, (onset, duration, tr) in enumerate(zip(onsets_s, durations_s, trs)):
        designs[n, :, 0] = _regressor(round(float(onset), 4), round(float(duration), 4), n_frames, float(tr), hrf)
        designs[n, :, 1:] = nuisance
    return designs


def clip_glm(y: np.ndarray, designs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OLS of every voxel of every clip on its own design; the task column's beta and t.

    Args:
        y: (N, T, V) clips, in-mask voxels.
        designs: (N, T, p) from ``design_matrices``; column 0 is the task regressor.

    Returns:
        beta, t: (N, V) float32 each. A voxel without residual variance gets t = 0.
    """
    # Sufficient statistics instead of residuals: X'y and y'y are two passes over the data and no
    # (N, T, V) temporary; SSE = y'y - beta'X'y (float32 is ample for z-scored clips of ~20 frames).
    x = designs.astype(np.float64)
    n_frames, p = x.shape[1:]
    xt = np.swapaxes(x, 1, 2)  # (N, p, T)
    xtx_inv = np.linalg.inv(xt @ x)  # (N, p, p)
    xty = xt.astype(np.float32) @ y  # (N, p, V)
    coef = np.einsum("npq,nqv->npv", xtx_inv.astype(np.float32), xty)  # (N, p, V); einsum beats matmul at p=3
    sse = np.einsum("ntv,ntv->nv", y, y) - np.einsum("npv,npv->nv", coef, xty)  # (N, V)
    sigma2 = np.maximum(sse, 0.0) / (n_frames - p)
    se = np.sqrt(sigma2 * xtx_inv[:, 0, 0, None].astype(np.float32))  # (N, V)
    beta = coef[:, 0]
    t = np.divide(beta, se, out=np.zeros_like(beta), where=se > 0)
    return beta, t


class GroupMap:
    """Running one-sample t over clips of their beta maps, without keeping the clips' maps.

    ``add`` the (n, V) betas of any number of batches; ``t`` is then mean / (sd / sqrt(n)), with
    the sample sd (ddof 1), as ``scipy.stats.ttest_1samp``. With a single clip the t statistic is
    undefined and ``t`` returns that clip's beta map (metrics use correlations, which ignore scale).
    """

    def __init__(self, n_voxels: int):
        self.n = 0
        self.sum = np.zeros(n_voxels)
        self.sumsq = np.zeros(n_voxels)

    def add(self, beta: np.ndarray) -> None:
        self.n += len(beta)
        self.sum += beta.sum(0, dtype=np.float64)
        self.sumsq += np.square(beta, dtype=np.float64).sum(0)

    @classmethod
    def combine(cls, parts: list["GroupMap"]) -> "GroupMap":
        """The group of all clips of ``parts`` (e.g. the two halves of a noise-ceiling split)."""
        out = cls(len(parts[0].sum))
        for g in parts:
            out.n, out.sum, out.sumsq = out.n + g.n, out.sum + g.sum, out.sumsq + g.sumsq
        return out

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)

    @property
    def t(self) -> np.ndarray:
        mean = self.mean
        if self.n < 2:
            return mean
        var = np.maximum(self.sumsq - self.n * mean**2, 0.0) / (self.n - 1)
        se = np.sqrt(var / self.n)
        return np.divide(mean, se, out=np.zeros_like(mean), where=se > 0)

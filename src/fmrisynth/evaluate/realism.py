"""Does a clip set look like fMRI, apart from the task? (docs/design.md protocol, step 4.)

Every statistic is computed the same way for each clip set and compared with the real test set:

* voxel variance and temporal autocorrelation (lags 1-5) of the residuals after removing each
  clip's voxel means, on the evaluation's randomly sampled voxels (a few thousand voxels estimate a pooled
  ratio to the third decimal, and the full brain would cost a pass per lag);
* the within-clip variance of the global signal (the in-mask mean of each frame);
* spatial smoothness: FWHM in mm per axis from the variance of neighbour differences (the classic
  AFNI 3dFWHMx / FSL smoothest estimator), on a seeded subset of neighbour pairs;
* functional connectivity: parcel-mean time courses, one correlation matrix per clip, averaged;
* classifier two-sample tests (C2ST, cross-validated accuracy, 0.5 = indistinguishable), three views
  of the same clips: linear (logistic regression on PCA scores of whole clips), quadratic (the scores
  and their squares: differences in spread, not only in mean) and statistics (per-clip summary
  statistics: what varies from clip to clip, such as amplitude or smoothness, which pooled PCA
  features average away); each with an interval over repeated subsampled fits;
* between-clip variance (total over within-clip variance: how much clips differ from each other)
  and the distance between mean clips.

``Realism`` streams over batches of clips; everything is a sum, so memory stays at one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fmrisynth.evaluate import metrics as M

LAGS = 5
MIN_C2ST_CLIPS = 10  # per set: below this a 5-fold accuracy moves in steps of 0.1 or more and can sit below chance
C2ST_REPEATS = 10  # subsampled refits behind each C2ST interval
# half of each set per refit, drawn without replacement (a duplicate across folds would leak): the spread
# of half-sample estimates around the full one is about the full estimate's own sampling spread
C2ST_SUBSAMPLE = 0.5
C2ST_KINDS = ("linear", "quadratic", "stats")
STAT_NAMES = ("within-clip variance", "lag-1 autocorrelation", "lag-2 autocorrelation", "lag-3 autocorrelation",
              "global-signal variance", "spatial sd of the clip mean", "mean |value|")
MAX_PAIRS = 4096  # neighbour pairs per axis for the FWHM: the estimate is a ratio of means over pairs
PARCEL_VOXELS = 32  # voxels averaged per parcel: the mean of 32 already follows the parcel's shared signal


@dataclass
class Probe:
    """Where realism is measured, the same for every clip set of one evaluation.

    Attributes:
        pair_voxels: (U,) the in-mask voxels that belong to a neighbour pair (sorted).
        pairs: per axis, (2, P) positions in ``pair_voxels`` of neighbours along that axis.
        voxel_mm: (3,) voxel size along each axis.
        parcel_voxels: (W,) in-mask voxels that enter the parcel means (at most PARCEL_VOXELS per parcel).
        parcels: scipy.sparse (W, K) averaging matrix: column k holds 1/size at the voxels of parcel k.
        parcellation: what the parcels are ("glasser-360" or "kmeans-100").
    """

    pair_voxels: np.ndarray
    pairs: list[np.ndarray]
    voxel_mm: np.ndarray
    parcel_voxels: np.ndarray
    parcels: object
    parcellation: str


def glasser_parcels(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Glasser parcel (1..360, 0 = none) of each in-mask voxel, from the labelled surface in our wheel.

    A voxel takes the label of its nearest midthickness vertex when that vertex lies within the
    cortical half-thickness plus the voxel's half-diagonal (as the simulator paints its maps).
    """
    from fmrisynth.data.sim_anatomy import glasser_labels

    mm = np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]  # (V, 3)
    return glasser_labels(mm, np.sqrt((affine[:3, :3] ** 2).sum(0)).max())


def kmeans_parcels(mask: np.ndarray, n_parcels: int, seed: int) -> np.ndarray:
    """A seeded k-means parcellation of the mask's voxel coordinates (1..K): compact blobs of similar size."""
    from sklearn.cluster import KMeans

    coords = np.argwhere(mask).astype(np.float32)  # (V, 3)
    k = max(1, min(n_parcels, len(coords)))
    fit = coords[np.random.default_rng(seed).permutation(len(coords))[:10000]]  # fitting on all voxels buys nothing
    return KMeans(k, n_init=1, random_state=seed).fit(fit).predict(coords) + 1


def make_probe(mask: np.ndarray, affine: np.ndarray, mni: bool, n_parcels: int, seed: int) -> Probe:
    """Neighbour pairs and parcels of a brain mask: Glasser parcels on MNI grids, else k-means."""
    import scipy.sparse as sp

    index = np.full(mask.shape, -1)
    index[mask] = np.arange(int(mask.sum()))
    rng = np.random.default_rng(seed)
    pairs = []
    for axis in range(3):
        a, b = np.moveaxis(index, axis, 0)[:-1], np.moveaxis(index, axis, 0)[1:]
        both = (a >= 0) & (b >= 0)
        p = np.stack([a[both], b[both]])  # (2, P)
        pairs.append(p[:, np.sort(rng.permutation(p.shape[1])[:MAX_PAIRS])])
    pair_voxels = np.unique(np.concatenate(pairs, axis=1))
    pairs = [np.searchsorted(pair_voxels, p) for p in pairs]
    labels = glasser_parcels(mask, affine) if mni else kmeans_parcels(mask, n_parcels, seed)
    name = "glasser-360" if mni else f"kmeans-{n_parcels}"
    order = rng.permutation(len(labels))  # a random subset of each parcel: the first PARCEL_VOXELS in this order
    first = np.zeros(len(labels), bool)
    for label in np.unique(labels[labels > 0]):
        first[order[labels[order] == label][:PARCEL_VOXELS]] = True
    voxels = np.flatnonzero(first)
    _, column = np.unique(labels[voxels], return_inverse=True)
    sizes = np.bincount(column)
    parcels = sp.csr_matrix((1.0 / sizes[column], (np.arange(len(voxels)), column)), shape=(len(voxels), len(sizes)),
                            dtype=np.float32)
    return Probe(pair_voxels, pairs, np.sqrt((affine[:3, :3] ** 2).sum(0)), voxels, parcels, name)


class Realism:
    """Running sums over the clips of one set: global signal, neighbour differences, FC."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self.n = 0
        self.global_var = 0.0
        self.diff_sq = np.zeros(3)  # per axis: sum of squared neighbour differences of the residuals
        self.pair_sq = np.zeros(3)  # per axis: sum of squared residuals at the pairs' voxels
        k = probe.parcels.shape[1]
        self.fc_sum = np.zeros((k, k))

    def add(self, y: np.ndarray) -> None:
        """Fold in a batch of clips, (b, T, V) float32."""
        b, n_frames = y.shape[:2]
        self.n += b
        self.global_var += float(y.mean(axis=2).var(axis=1, dtype=np.float64).sum())
        r = np.take(y, self.probe.pair_voxels, axis=2)  # (b, T, U): one gather, then residuals
        r -= r.mean(1, keepdims=True)
        r_sq = np.einsum("btu,btu->u", r, r)  # (U,) float32 sums, blocked: accurate
        for axis, (i, j) in enumerate(self.probe.pairs):
            d = np.take(r, j, axis=2) - np.take(r, i, axis=2)  # (b, T, P)
            self.diff_sq[axis] += float(np.einsum("btp,btp->", d, d))
            self.pair_sq[axis] += 0.5 * float(r_sq[i].sum() + r_sq[j].sum())
        sub = np.take(y, self.probe.parcel_voxels, axis=2).reshape(b * n_frames, -1)  # (b * T, W)
        tc = np.asarray(sub @ self.probe.parcels).reshape(b, n_frames, -1)  # (b, T, K) parcel means
        z = tc - tc.mean(1, keepdims=True)
        norm = np.linalg.norm(z, axis=1, keepdims=True)
        z = np.divide(z, norm, out=np.zeros_like(z), where=norm > 0).reshape(b * n_frames, -1)  # (b * T, K)
        self.fc_sum += z.T @ z  # sum over clips and frames: each clip's correlation matrix, summed

    def summary(self, features: np.ndarray) -> dict:
        """The set's statistics; ``features`` (n, T, F) are its clips at the sampled voxels."""
        variance, autocorr = residual_moments(features)
        fwhm = fwhm_mm(self.diff_sq, self.pair_sq, self.probe.voxel_mm)
        return {"variance": variance, "autocorr": autocorr, "global_var": self.global_var / max(self.n, 1),
                "fwhm_axes_mm": fwhm, "fwhm_mm": float(np.prod(fwhm) ** (1 / 3)),
                "fc": (self.fc_sum / max(self.n, 1)).astype(np.float32)}


def residual_moments(features: np.ndarray, lags: int = LAGS) -> tuple[float, np.ndarray]:
    """Mean within-clip variance and pooled autocorrelation at lags 1..``lags`` of (n, T, F) clips.

    Residuals are the clips less each clip's voxel means; the autocorrelation at lag k is
    sum r_t r_(t+k) / sum r_t^2 over clips, voxels and frames (the usual biased estimator, the same
    bias for every set of equally long clips).
    """
    n_frames = features.shape[1]
    lags = min(lags, n_frames - 1)
    sq, cross = 0.0, np.zeros(lags)
    for start in range(0, len(features), 64):  # chunks: a residual copy of every clip at once is large
        r = features[start : start + 64].astype(np.float64)
        r -= r.mean(1, keepdims=True)
        sq += float(np.square(r).sum())
        cross += [float((r[:, k:] * r[:, :-k]).sum()) for k in range(1, lags + 1)]
    variance = sq / max(features.size, 1)
    return variance, cross / sq if sq > 0 else np.full(lags, np.nan)


def fwhm_mm(diff_sq: np.ndarray, pair_sq: np.ndarray, voxel_mm: np.ndarray) -> np.ndarray:
    """FWHM per axis (mm) from neighbour differences, assuming a Gaussian spatial autocorrelation.

    For a Gaussian field the neighbour correlation is rho = 1 - var(diff) / (2 var) and the FWHM is
    voxel * sqrt(-2 ln 2 / ln rho); no positive neighbour correlation gives 0 (white noise).
    """
    rho = 1.0 - np.divide(diff_sq, 2 * pair_sq, out=np.ones(3), where=pair_sq > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        fwhm = voxel_mm * np.sqrt(-2 * np.log(2) / np.log(np.clip(rho, 1e-12, 1 - 1e-12)))
    return np.where(rho > 0, fwhm, 0.0)


def upper_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of the upper triangles (above the diagonal) of two square matrices."""
    iu = np.triu_indices(len(a), k=1)
    return M.pearson(a[iu], b[iu]) if len(iu[0]) >= 2 else math.nan


def c2st(a: np.ndarray, b: np.ndarray, seed: int, components: int = 50, folds: int = 5) -> float:
    """The linear classifier two-sample test of clips (n, ...) of ``a`` against ``b`` (see ``two_sample_tests``)."""
    return two_sample_tests(a, b, seed, components, folds, kinds=("linear",), repeats=0)["linear"][0]


def two_sample_tests(a: np.ndarray, b: np.ndarray, seed: int, components: int = 50, folds: int = 5,
                     kinds: tuple[str, ...] = C2ST_KINDS, repeats: int = C2ST_REPEATS) -> dict:
    """Classifier two-sample tests telling clips (n, T, F) of ``a`` from those of ``b``.

    The larger set is subsampled (seeded) to the smaller one, so chance is exactly 0.5. Features,
    all computed on the pooled clips without their labels (no leak):

    * ``linear``: the pooled clips' top principal component scores;
    * ``quadratic``: the standardised scores and their squares, so that a set whose clips spread
      more (or less) along a component is told apart, which a linear boundary cannot do;
    * ``stats``: ``clip_stats`` (logarithms of the scales), standardised, and their squares, for
      the same reason: clips of random amplitude sit on both sides of real clips' typical amplitude.

    Each is classified by an L2 logistic regression with stratified shuffled folds; the accuracy
    is the mean over folds. ``repeats`` refits, each on a different half of both sets with
    different folds, give the interval: the spread of half-sample estimates around their median
    (2.5th to 97.5th percentile) is about the full estimate's own sampling spread (half-sampling),
    so it is laid around the full estimate; their median itself sits nearer 0.5 (half the
    training clips), which is why it is not the centre.

    Returns:
        {kind: (accuracy, [lo, hi] or None)}; NaN and None with fewer than ``MIN_C2ST_CLIPS``
        clips in either set.
    """
    n = min(len(a), len(b))
    if n < MIN_C2ST_CLIPS:
        return {k: (math.nan, None) for k in kinds}
    rng = np.random.default_rng(seed)
    x = np.concatenate([a[rng.permutation(len(a))[:n]], b[rng.permutation(len(b))[:n]]])  # (2n, T, F)
    y = np.repeat([0, 1], n)
    features = {}
    if {"linear", "quadratic"} & set(kinds):
        z = pca_scores(x.reshape(2 * n, -1), components)  # (2n, k)
        features["linear"] = z
        features["quadratic"] = _with_squares(z)  # (2n, 2k)
    if "stats" in kinds:
        features["stats"] = _with_squares(clip_stats(x))  # (2n, 14)
    out = {}
    for kind in kinds:
        accuracy = _cv_accuracy(features[kind], y, folds, seed)
        spread = []
        for r in range(repeats):
            pick = np.random.default_rng([seed, r]).permutation(n)[: max(MIN_C2ST_CLIPS, int(C2ST_SUBSAMPLE * n))]
            rows = np.concatenate([pick, n + pick])  # the same share of each set
            spread.append(_cv_accuracy(features[kind][rows], y[rows], folds, seed + 1 + r))
        interval = None
        if spread:
            lo, mid, hi = np.percentile(spread, [2.5, 50, 97.5])
            interval = [float(max(0.0, accuracy - (mid - lo))), float(min(1.0, accuracy + (hi - mid)))]
        out[kind] = (accuracy, interval)
    return out


def _with_squares(f: np.ndarray) -> np.ndarray:
    """Standardised features (n, k) beside their squares (n, 2k): a quadratic boundary for a linear model."""
    sd = f.std(0)
    z = (f - f.mean(0)) / np.where(sd > 0, sd, 1.0)
    return np.concatenate([z, z**2], axis=1)


def _cv_accuracy(f: np.ndarray, y: np.ndarray, folds: int, seed: int) -> float:
    """Mean accuracy over stratified shuffled folds of a standardised L2 logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(min(folds, int(np.bincount(y).min())), shuffle=True, random_state=seed)
    return float(cross_val_score(model, f, y, cv=cv).mean())


def clip_stats(x: np.ndarray) -> np.ndarray:
    """Per-clip summary statistics (n, 7) of clips (n, T, F), in the order of ``STAT_NAMES``.

    Within-clip variance (voxel residuals after each voxel's clip mean), lag-1..3 autocorrelation
    of those residuals (pooled over the clip's voxels), the within-clip variance of the global
    signal (mean over the voxels), the spatial sd of the clip's mean frame and the mean absolute
    value. Scales (variances, sd, mean |value|) enter as logarithms: a factor is a shift.
    """
    out, tiny = np.empty((len(x), len(STAT_NAMES))), 1e-12
    for start in range(0, len(x), 64):  # chunks: a float64 residual copy of every clip at once is large
        c = x[start : start + 64].astype(np.float64)  # (b, T, F)
        mean = c.mean(1)  # (b, F) the clip's mean frame
        r = c - mean[:, None]
        sq = np.einsum("btf,btf->b", r, r)  # (b,)
        lag = [np.einsum("btf,btf->b", r[:, k:], r[:, :-k]) / np.maximum(sq, tiny) for k in (1, 2, 3)]
        out[start : start + len(c)] = np.stack([
            np.log(sq / r[0].size + tiny), *lag, np.log(r.mean(2).var(1) + tiny), np.log(mean.std(1) + tiny),
            np.log(np.abs(c).mean((1, 2)) + tiny)], axis=1)
    return out


def between_clip_ratio(x: np.ndarray, labels: np.ndarray) -> float:
    """Total over within-clip variance of clips (n, T, F) of conditions ``labels`` (n,).

    The total is taken around each condition's voxel means (so sets with other condition counts
    compare fairly) and the within-clip variance around each clip's own voxel means; the ratio is
    1 when clips differ only as frames within a clip do and grows with what sets clips apart
    (subject, session, amplitude).
    """
    total, within = 0.0, 0.0
    for c in np.unique(labels):
        xc = x[labels == c].astype(np.float64)  # (m, T, F)
        total += float(np.square(xc - xc.mean((0, 1))).sum())
        within += float(np.square(xc - xc.mean(1, keepdims=True)).sum())
    return total / within if within > 0 else math.nan


def mean_clip_distance(real: np.ndarray, other: np.ndarray, real_variance: float) -> float:
    """RMS difference of the mean clips per condition (C, T, V), in real within-clip sd units.

    Mean clips carry the sampling noise of their clip counts, so the figure is read against the
    reference's, taken with as many clips as the generated set.
    """
    return float(np.sqrt(np.mean(np.square(other - real)) / real_variance)) if real_variance > 0 else math.nan


def pca_scores(x: np.ndarray, components: int) -> np.ndarray:
    """Scores (n, k) of rows x (n, D) on their top principal components, through the n x n Gram matrix.

    Clips are far fewer than their features (a few hundred vs 20 frames x 4096 voxels), so one
    float32 matrix product and an n x n eigendecomposition give the exact PCA in a second, where
    a randomized SVD of the (n, D) matrix takes tens.
    """
    x = x - x.mean(0)
    w, v = np.linalg.eigh((x @ x.T).astype(np.float64))  # ascending eigenvalues
    top = np.argsort(w)[::-1][: min(components, len(x) - 1)]
    return v[:, top] * np.sqrt(np.maximum(w[top], 0.0))


def compare(real: dict, other: dict) -> dict:
    """The yardsticks of ``other`` against the real test set's statistics (both from ``summary``)."""
    ratio = lambda k: other[k] / real[k] if real[k] > 0 else math.nan  # noqa: E731
    return {"variance_ratio": ratio("variance"), "global_signal_ratio": ratio("global_var"),
            "autocorr": other["autocorr"], "autocorr_max_diff": float(np.max(np.abs(other["autocorr"] - real["autocorr"]))),
            "fwhm_mm": other["fwhm_mm"], "fc_corr": upper_corr(real["fc"], other["fc"])}

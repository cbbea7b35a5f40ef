"""The metrics of docs/design.md's evaluation protocol, as small functions on arrays.

Maps are rows of a (C, V) array of in-mask voxels; everything is a correlation, so maps of
different scale (t maps from many or few clips, real or generated) compare fairly.
"""

from __future__ import annotations

import numpy as np


def _standardise(x: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm, so that a @ b.T is the Pearson r; (n, F).

    float32 rows (clips: tens of thousands of values each) stay float32, which halves the memory
    and the time of nearest-neighbour searches at a precision of 1e-6; everything else is float64.
    """
    x = np.asarray(x)
    x = x.astype(np.float32 if x.dtype == np.float32 else np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.full_like(x, np.nan), where=norm > 0)


def corr_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between every row of a (m, F) and every row of b (n, F); (m, n)."""
    return _standardise(a) @ _standardise(b).T


def map_corr(real: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Pearson r of the same condition's real and generated map, per condition; (C,)."""
    return np.einsum("cv,cv->c", _standardise(real), _standardise(generated))


def rdm(maps: np.ndarray) -> np.ndarray:
    """Representational dissimilarity matrix 1 - r between condition maps; (C, C)."""
    return 1.0 - corr_matrix(maps, maps)


def rsa(rdm_a: np.ndarray, rdm_b: np.ndarray) -> float:
    """Pearson r of the upper triangles of two RDMs (NaN below three conditions: < 3 pairs)."""
    iu = np.triu_indices(len(rdm_a), k=1)
    if len(iu[0]) < 3:
        return float("nan")
    return float(corr_matrix(rdm_a[iu][None], rdm_b[iu][None])[0, 0])


def top1(references: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Assign each query map (n, V) the reference condition (C, V) it correlates with most.

    Returns the accuracy against ``labels`` (n,) (indices into the references) and the
    assignments (n,).
    """
    r = np.nan_to_num(corr_matrix(queries, references), nan=-np.inf)  # (n, C)
    assigned = r.argmax(axis=1)
    return float(np.mean(assigned == labels)), assigned


def roi(real_map: np.ndarray, fraction: float) -> np.ndarray:
    """The ROI of a condition: the top ``fraction`` of voxels of its real map, at least one; (V,) bool."""
    k = max(1, int(round(fraction * real_map.size)))
    keep = np.zeros(real_map.size, dtype=bool)
    keep[np.argsort(real_map)[-k:]] = True
    return keep


def peak_latency(timecourse: np.ndarray, tr: float, onset_s: float) -> float:
    """Seconds from the block onset to the time course's maximum."""
    return float(np.argmax(timecourse) * tr - onset_s)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(corr_matrix(np.ravel(a)[None], np.ravel(b)[None])[0, 0])


def variance_explained(scores: np.ndarray, groups: np.ndarray) -> float:
    """Fraction of the variance of points (F, k) that lies between the means of their groups (F,).

    This is the between-group sum of squares over the total sum of squares (an eta squared),
    computed in the space of the top principal components: how much of the frames' dominant
    variation a factor (subject, phase encoding, task) accounts for.
    """
    centred = scores - scores.mean(axis=0)
    total = float(np.square(centred).sum())
    if total == 0:
        return float("nan")
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    means = np.zeros((len(counts), scores.shape[1]))
    np.add.at(means, inverse, centred)
    means /= counts[:, None]
    return float((counts[:, None] * np.square(means)).sum() / total)


def nearest_corr(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """For each query (n, F), its highest Pearson r to any reference (m, F); (n,)."""
    return np.nanmax(corr_matrix(queries, references), axis=1)

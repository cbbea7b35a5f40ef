"""Scaling laws: how a metric grows with model size, fitted with confidence intervals.

Two standard forms, both fitted by least squares in log space with a bootstrap over the sizes:

  * log-linear: ``metric = a + b * log10(params)`` (the reference's presentation), and
  * power law on the remaining error: ``1 - metric = A * params ** -alpha`` (metrics bounded by 1:
    map correlation, RSA, top-1), which also extrapolates where the metric would reach a target.
"""

from __future__ import annotations

import numpy as np

from fmrisynth.errors import FmrisynthError


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def fit_scaling(params: np.ndarray | list, metric: np.ndarray | list, n_boot: int = 2000, seed: int = 0) -> dict:
    """Fit both laws to (params, metric) pairs; return coefficients, R², and 95% bootstrap intervals.

    Returns a JSON-ready dict::

        {"n": 5,
         "loglinear": {"a", "b", "r2", "b_ci": [lo, hi]},
         "powerlaw": {"A", "alpha", "r2", "alpha_ci": [lo, hi]}}   # absent if some metric >= 1
    """
    p = np.asarray(params, dtype=float)
    m = np.asarray(metric, dtype=float)
    ok = np.isfinite(p) & np.isfinite(m) & (p > 0)
    p, m = p[ok], m[ok]
    if len(np.unique(p)) < 2:
        raise FmrisynthError("a scaling fit needs at least two distinct model sizes with finite metrics")
    x = np.log10(p)
    rng = np.random.default_rng(seed)
    boots = [rng.integers(len(x), size=len(x)) for _ in range(n_boot)]
    boots = [b for b in boots if len(np.unique(x[b])) > 1]

    def r2(y: np.ndarray, pred: np.ndarray) -> float:
        ss = float(((y - y.mean()) ** 2).sum())
        return 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0

    a, b = _line(x, m)
    slopes = [_line(x[i], m[i])[1] for i in boots]
    out = {"n": int(len(x)), "loglinear": {"a": a, "b": b, "r2": r2(m, a + b * x), "b_ci": np.percentile(slopes, [2.5, 97.5]).tolist()}}
    if np.all(m < 1):
        err = np.log10(1 - m)
        c, d = _line(x, err)
        alphas = [-_line(x[i], err[i])[1] for i in boots]
        out["powerlaw"] = {"A": 10**c, "alpha": -d, "r2": r2(err, c + d * x), "alpha_ci": np.percentile(alphas, [2.5, 97.5]).tolist()}
    return out


def predict(fit: dict, params: float | np.ndarray, law: str = "loglinear") -> np.ndarray:
    """The fitted metric at ``params`` under ``law`` ("loglinear" or "powerlaw")."""
    x = np.log10(np.asarray(params, dtype=float))
    if law == "loglinear":
        return fit["loglinear"]["a"] + fit["loglinear"]["b"] * x
    return 1 - fit["powerlaw"]["A"] * 10 ** (-fit["powerlaw"]["alpha"] * x)

import numpy as np
import pytest

from fmrisynth.errors import FmrisynthError
from fmrisynth.evaluate.scaling import fit_scaling, predict


def test_recovers_a_known_power_law():
    params = np.array([3e5, 1e6, 3e6, 1e7, 2e7])
    metric = 1 - 2.0 * params**-0.15
    fit = fit_scaling(params, metric)
    assert fit["powerlaw"]["alpha"] == pytest.approx(0.15, rel=1e-6)
    assert fit["powerlaw"]["A"] == pytest.approx(2.0, rel=1e-6) and fit["powerlaw"]["r2"] == pytest.approx(1.0)
    lo, hi = fit["powerlaw"]["alpha_ci"]
    assert lo <= 0.15 <= hi
    assert np.allclose(predict(fit, params, "powerlaw"), metric)
    assert fit["loglinear"]["b"] > 0  # bigger is better


def test_loglinear_with_noise_has_an_interval_around_the_truth():
    rng = np.random.default_rng(1)
    params = np.geomspace(1e5, 1e8, 8)
    metric = 0.2 + 0.1 * np.log10(params) + rng.normal(0, 0.01, 8)
    fit = fit_scaling(params, metric)
    lo, hi = fit["loglinear"]["b_ci"]
    assert lo < 0.1 < hi and hi - lo < 0.05
    assert "powerlaw" not in fit_scaling(params, np.minimum(metric, 1.0) + 0.2)  # metric >= 1: no error law


def test_needs_two_sizes():
    with pytest.raises(FmrisynthError, match="two distinct"):
        fit_scaling([1e6, 1e6], [0.5, 0.6])

"""Realism statistics on data with known answers: AR(1) noise, Gaussian-smoothed noise, FC, C2ST."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from fmrisynth.evaluate.realism import Realism, c2st, compare, make_probe, residual_moments, upper_corr


def _ar1(rng, rho, shape):
    """(n, T, F) stationary AR(1) series with unit innovations along T."""
    n, n_frames, f = shape
    x = np.empty(shape)
    x[:, 0] = rng.normal(size=(n, f)) / np.sqrt(1 - rho**2)
    for t in range(1, n_frames):
        x[:, t] = rho * x[:, t - 1] + rng.normal(size=(n, f))
    return x.astype(np.float32)


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.7])
def test_autocorrelation_of_ar1_noise_is_rho_to_the_lag(rng, rho):
    variance, autocorr = residual_moments(_ar1(rng, rho, (20, 400, 50)))
    # the estimator divides by all T frames: rho^k (T - k) / T, less a bias of order 1/T from the mean
    assert np.allclose(autocorr, rho ** np.arange(1, 6), atol=0.03)
    assert variance == pytest.approx(1 / (1 - rho**2), rel=0.05)


def _volume_probe(shape=(28, 30, 26), voxel_mm=3.0):
    mask = np.zeros(shape, bool)
    mask[4:-4, 4:-4, 4:-4] = True
    affine = np.diag([voxel_mm] * 3 + [1.0])
    return mask, make_probe(mask, affine, mni=False, n_parcels=20, seed=0)


@pytest.mark.parametrize("sigma_vox", [(1.5, 1.5, 1.5), (1.2, 2.0, 2.6)])
def test_fwhm_of_gaussian_smoothed_noise_within_ten_percent(rng, sigma_vox):
    mask, probe = _volume_probe()
    stats = Realism(probe)
    for _ in range(4):  # clips of 10 frames, each frame smoothed white noise
        frames = np.stack([gaussian_filter(rng.normal(size=mask.shape), sigma_vox) for _ in range(10)])
        stats.add(frames[:, mask][None].astype(np.float32))
    fwhm = stats.summary(np.zeros((4, 10, 1), np.float32))["fwhm_axes_mm"]
    expected = np.sqrt(8 * np.log(2)) * np.array(sigma_vox) * 3.0  # FWHM = 2.355 sigma, in mm
    assert np.allclose(fwhm, expected, rtol=0.10), (fwhm, expected)


def test_white_noise_has_no_smoothness(rng):
    mask, probe = _volume_probe()
    stats = Realism(probe)
    stats.add(rng.normal(size=(2, 10, int(mask.sum()))).astype(np.float32))
    assert stats.summary(np.zeros((2, 10, 1), np.float32))["fwhm_mm"] < 1.0  # far below one 3 mm voxel


def _clips(rng, mask, n, shift=0.0):
    """Clips with a shared slow signal per k-means region, plus noise; (n, T, V)."""
    v = int(mask.sum())
    loadings = np.random.default_rng(7).normal(size=(4, v))  # the same spatial structure for every set
    courses = rng.normal(size=(n, 12, 4))
    return (courses @ loadings + rng.normal(size=(n, 12, v)) + shift).astype(np.float32)


def test_identical_sets_give_fc_r_one_and_ratios_one(rng):
    mask, probe = _volume_probe((16, 16, 16))
    y = _clips(rng, mask, 8)
    a, b = Realism(probe), Realism(probe)
    a.add(y)
    b.add(y)
    features = y[:, :, :200]
    cmp = compare(a.summary(features), b.summary(features))
    assert cmp["fc_corr"] == pytest.approx(1.0) and cmp["variance_ratio"] == pytest.approx(1.0)
    assert cmp["global_signal_ratio"] == pytest.approx(1.0) and cmp["autocorr_max_diff"] == 0.0
    noise = Realism(probe)
    noise.add(rng.normal(size=y.shape).astype(np.float32))  # no shared structure: FC unrelated
    assert upper_corr(a.summary(features)["fc"], noise.summary(features)["fc"]) < 0.3


def test_c2st_is_chance_for_one_distribution_and_perfect_for_shifted_sets(rng):
    mask = np.ones((6, 6, 6), bool)
    a, b = _clips(rng, mask, 60), _clips(rng, mask, 80)
    assert abs(c2st(a, b, seed=0) - 0.5) < 0.1  # two draws of one distribution
    assert c2st(a, _clips(rng, mask, 60, shift=0.5), seed=0) > 0.95  # every voxel up by half a noise sd
    assert c2st(a, b, seed=0) == c2st(a, b, seed=0)  # seeded


def test_glasser_parcels_on_the_mni_grid():
    from fmrisynth.data.grid import brain_mask, get_grid

    grid = get_grid("6mm")
    probe = make_probe(brain_mask(grid), grid.affine, mni=True, n_parcels=100, seed=0)
    assert probe.parcellation == "glasser-360" and probe.parcels.shape[1] > 300
    assert np.allclose(probe.parcels.sum(0), 1.0)  # each column averages its parcel's voxels

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


def _gaussian_clips(rng, n, scale=None):
    """(n, 12, 300) clips of one Gaussian: AR(1) in time, a shared spatial structure; ``scale`` (n,) per clip."""
    loadings = np.random.default_rng(7).normal(size=(6, 300)) / 2  # the same structure for every set
    x = _ar1(rng, 0.4, (n, 12, 6)) @ loadings + _ar1(rng, 0.2, (n, 12, 300))
    return (x if scale is None else x * scale[:, None, None]).astype(np.float32)


def test_two_draws_of_one_gaussian_are_chance_on_all_three_tests(rng):
    from fmrisynth.evaluate.realism import C2ST_KINDS, two_sample_tests

    tests = two_sample_tests(_gaussian_clips(rng, 150), _gaussian_clips(rng, 150), seed=0, components=20)
    for kind in C2ST_KINDS:
        accuracy, (lo, hi) = tests[kind]
        assert abs(accuracy - 0.5) < 0.08 and lo <= hi and lo < 0.6, (kind, accuracy, lo, hi)


def test_random_clip_amplitude_is_caught_by_the_statistics_test_and_missed_by_the_linear_one(rng):
    from fmrisynth.evaluate.realism import two_sample_tests

    scale = np.exp(rng.uniform(-0.7, 0.7, 150))  # each clip's amplitude times 0.5-2, geometric mean 1
    tests = two_sample_tests(_gaussian_clips(rng, 150), _gaussian_clips(rng, 150, scale), seed=0, components=20)
    assert tests["stats"][0] > 0.7 and tests["stats"][1][0] > 0.6, tests["stats"]
    assert abs(tests["linear"][0] - 0.5) < 0.08, tests["linear"]


def test_c2st_is_not_computed_below_ten_clips_per_set(rng):
    from fmrisynth.evaluate.realism import two_sample_tests

    a = _gaussian_clips(rng, 9)
    assert np.isnan(c2st(a, _gaussian_clips(rng, 50), seed=0))
    assert all(np.isnan(acc) and ci is None for acc, ci in two_sample_tests(a, a + 1, seed=0).values())


def test_between_clip_ratio_and_mean_clip_distance(rng):
    from fmrisynth.evaluate.realism import between_clip_ratio, mean_clip_distance

    x = rng.normal(size=(400, 10, 50))
    labels = np.arange(400) % 2
    # white noise: total variance 1, within-clip 0.9 (10 frames less their mean)
    assert between_clip_ratio(x, labels) == pytest.approx(1 / 0.9, rel=0.02)
    shifted = x + 2 * labels[:, None, None] + rng.normal(size=(400, 1, 50))  # a per-clip offset of variance 1
    assert between_clip_ratio(shifted, labels) == pytest.approx(2 / 0.9, rel=0.03)  # the condition shift is not counted
    mean = x.mean(0)[None]
    assert mean_clip_distance(mean, mean, 1.0) == 0.0 and mean_clip_distance(mean, mean + 0.5, 4.0) == pytest.approx(0.25)

"""The Gaussian background model: exact whitening, known structure recovered, subject style, any length."""

import numpy as np
import pytest
import torch

from fmrisynth.errors import FmrisynthError
from fmrisynth.models.background import POOLED, GaussianBackground, stationary


def ar1_factor_clips(rng, n=240, frames=20, e=120, rho=0.7, subjects=4, scales=(0.5, 1.0, 1.5, 2.0)):
    """Clips (n, T, E): 3 spatial factors with AR(1) time courses, scaled per subject, + white noise."""
    sid = np.arange(n) % subjects
    loadings = rng.standard_normal((e, 3))
    z = np.zeros((n, frames, 3))
    eps = rng.standard_normal((n, frames, 3))
    z[:, 0] = eps[:, 0]
    for t in range(1, frames):
        z[:, t] = rho * z[:, t - 1] + np.sqrt(1 - rho**2) * eps[:, t]
    x = (z @ loadings.T) * np.asarray(scales)[sid][:, None, None] + 0.5 * rng.standard_normal((n, frames, e))
    return x.astype(np.float32), sid


def lag1(x, demean=True):
    """Pooled lag-1 autocorrelation; removing each clip's mean biases white noise by about -1/T."""
    r = x - x.mean(1, keepdims=True) if demean else x
    return float((r[:, 1:] * r[:, :-1]).sum() / (r * r).sum())


def test_whitening_is_exact_and_white():
    x, sid = ar1_factor_clips(np.random.default_rng(0))
    model = GaussianBackground.fit(x, sid, components=8, gains=False)
    idx = model.index(sid)
    w = model.whiten(torch.from_numpy(x), idx)
    assert torch.allclose(model.color(w, idx), torch.from_numpy(x), atol=1e-3)
    assert abs(w.var().item() - 1) < 0.05  # white: unit variance ...
    assert abs(lag1(w.numpy(), demean=False)) < 0.03  # ... and no autocorrelation left
    held = dict(model._tensors)  # the arrays it used, on the batch's device
    assert {name for name, _, _ in held} >= {"q", "psi", "s", "mean", "factors"}
    again = model.color(model.whiten(torch.from_numpy(x[:5]), idx[:5]), idx[:5])  # a second batch, as in training
    assert model._tensors.keys() == held.keys() and all(model._tensors[k] is held[k] for k in held)  # copied once
    assert torch.allclose(again, torch.from_numpy(x[:5]), atol=1e-3)


def test_samples_keep_variance_autocorrelation_and_subject_style():
    rng = np.random.default_rng(1)
    x, sid = ar1_factor_clips(rng)
    model = GaussianBackground.fit(x, sid, components=8, prior_clips=0)
    drawn = model.sample(20, np.repeat(np.arange(4), 60), rng)
    real_var = [x[sid == s].var() for s in range(4)]
    gen_var = [drawn[s * 60 : (s + 1) * 60].var() for s in range(4)]
    np.testing.assert_allclose(gen_var, real_var, rtol=0.2)  # each subject keeps its own amplitude
    assert abs(lag1(drawn) - lag1(x)) < 0.03
    # the global signal (the frames' mean over space) keeps its variance
    gs = lambda a: a.mean(2).var(1).mean()  # noqa: E731
    assert abs(gs(drawn) / gs(x) - 1) < 0.2


def test_clip_gains_are_a_scale_mixture_fitted_and_drawn():
    """Clips whose amplitude varies from clip to clip (log-variance sd 0.5): tau finds it, draws keep it."""
    rng = np.random.default_rng(5)
    x, sid = ar1_factor_clips(rng, subjects=1, scales=(1.0,))
    x *= np.exp(0.25 * rng.standard_normal(len(x)))[:, None, None].astype(np.float32)
    spread = lambda a: np.log(a.var(1).mean(1)).std()  # noqa: E731  # of the log within-clip variance
    model = GaussianBackground.fit(x, sid, components=8)
    assert abs(model.tau - 0.5) < 0.07  # the gains' own spread, without the Gaussian's sampling noise
    assert abs(spread(model.sample(20, np.zeros(240, int), rng)) - spread(x)) < 0.1
    one_gaussian = GaussianBackground.fit(x, sid, components=8, gains=False)
    assert spread(one_gaussian.sample(20, np.zeros(240, int), rng)) < spread(x) - 0.15  # what one Gaussian misses
    w = model.whiten(torch.from_numpy(x), np.zeros(240, int))
    assert spread(w.numpy()) < 0.25 * spread(x)  # each clip's gain (the part of its spread that is gain) divided out
    plain, _ = ar1_factor_clips(rng, subjects=1, scales=(1.0,))
    assert GaussianBackground.fit(plain, sid, components=8).tau < 0.1  # a Gaussian's own spread is not gain


def test_shrinkage_pulls_a_subject_with_few_clips_to_the_pool():
    rng = np.random.default_rng(2)
    x, sid = ar1_factor_clips(rng, n=200, subjects=2, scales=(1.0, 3.0))
    keep = np.r_[np.flatnonzero(sid == 0), np.flatnonzero(sid == 1)[:2]]  # subject 1: two clips only
    model = GaussianBackground.fit(x[keep], sid[keep], components=8, prior_clips=10)
    pooled_var = model.cov[-1, :, range(20), range(20)].sum()
    few = model.cov[1, :, range(20), range(20)].sum()
    own_var = x[sid == 1].var()
    assert abs(few - pooled_var) < abs(few - own_var * 20)
    assert model.index(["0", "1", "unseen"]).tolist() == [0, 1, POOLED]


def test_stationary_form_extends_an_ar1_to_long_runs():
    rng = np.random.default_rng(3)
    x, sid = ar1_factor_clips(rng, rho=0.6, subjects=1, scales=(1.0,))
    model = GaussianBackground.fit(x, sid, components=8)
    run = model.sample(400, [0, 0, 0, 0], rng)  # (4, 400, E): far longer than the 20-frame clips
    factor = run @ np.linalg.pinv(model.q.T * np.sqrt(model.psi)[None])  # rough factor time courses
    assert run.shape == (4, 400, 120)
    assert abs(run.var() / x.var() - 1) < 0.25
    assert 0.45 < lag1(factor) < 0.7
    cov = stationary(model.cov[:1, :1], 64)[0, 0]
    assert np.all(np.linalg.eigvalsh(cov) > -1e-8)  # a valid covariance at any length


def test_save_load_round_trip_and_refusals(tmp_path):
    x, sid = ar1_factor_clips(np.random.default_rng(4), n=40)
    model = GaussianBackground.fit(x, [f"sub{s}" for s in sid], components=4)
    model.save(tmp_path / "bg.npz")
    again = GaussianBackground.load(tmp_path / "bg.npz")
    assert again.subjects == model.subjects
    np.testing.assert_array_equal(again.cov, model.cov)
    bad = GaussianBackground(model.subjects, model.mean, model.psi * np.nan, model.q, model.s, model.cov, 0.0, 0.0)
    bad.save(tmp_path / "bad.npz")
    with pytest.raises(FmrisynthError, match="non-finite"):
        GaussianBackground.load(tmp_path / "bad.npz")
    with pytest.raises(FmrisynthError, match="at least 2 finite clips"):
        GaussianBackground.fit(x[:1], sid[:1])


def test_a_clips_offset_is_not_carried_over_a_whole_run():
    """White frames around a per-clip offset (half the variance): within a clip they are white, so a
    long run drawn from the model must be white too, not the near-constant an offset would extrapolate to."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((200, 20, 50)) + rng.standard_normal((200, 1, 50))).astype(np.float32)
    model = GaussianBackground.fit(x, np.zeros(200, int), components=4, gains=False)
    run = model.sample(300, [0, 0], rng)  # (2, 300, 50)
    assert abs(lag1(run)) < 0.05 and abs(lag1(model.sample(20, np.zeros(200, int), rng), demean=False) - lag1(x, demean=False)) < 0.1

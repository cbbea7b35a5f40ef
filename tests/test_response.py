"""The task response model: its GLM recovers its own maps, it finds the maps and the subjects of data
made from known ones, its shrinkage keeps estimation noise out of the subject model, and the codec
noise model reproduces a known smoothness."""

import numpy as np
import pytest

from fmrisynth.data.store import ClipStore, StoreWriter
from fmrisynth.errors import FmrisynthError
from fmrisynth.generate.codec import CodecNoise
from fmrisynth.models.response import K, Event, ResponseModel
from fmrisynth.tasks import HRF_BASIS, design_regressors

T, TR, V = 20, 0.72, 300
CONDITIONS = ["a", "b"]


def make_store(path, rng, subject_scale, noise=1.0, subjects=8, clips=6):
    """Clips of two conditions: block response = true map (scaled per subject) + white noise."""
    maps = rng.normal(size=(2, V))  # canonical-HRF maps per condition
    mask = np.zeros((5, 6, 10), bool)
    mask.reshape(-1)[:V] = True
    with StoreWriter(path, (T, V), np.eye(4), mask.shape, CONDITIONS, mask=mask) as w:
        for s in range(subjects):
            gain = 1 + subject_scale * rng.normal()
            for i in range(clips):
                c = i % 2
                onset = rng.uniform(0.5, 2.0)
                x = design_regressors([onset], [8.0], T, TR)  # (T, 1)
                y = x @ (gain * maps[c])[None] + noise * rng.normal(size=(T, V)) + rng.normal(size=V)
                w.add(y, condition=CONDITIONS[c], label=c, subject=f"s{s}", onset_s=onset, duration_s=8.0, tr=TR,
                      split="train")  # fmt: skip
    return ClipStore(path), maps


def test_a_glm_on_the_models_own_prediction_recovers_its_maps():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(2, K, 50)).astype(np.float32)
    model = ResponseModel(CONDITIONS, mean, np.zeros((0, 2, K, 50), np.float32), {}, np.ones(50, np.float32))
    events = [Event("a", 2.0, 10.0), Event("b", 30.0, 12.0, amplitude=0.5), Event("a", 60.0, 10.0)]
    y = model.predict(events, TR, 140)  # (T, V): a whole run, two conditions, one modulated
    xa = design_regressors([2.0, 60.0], [10.0, 10.0], 140, TR, HRF_BASIS)
    xb = design_regressors([30.0], [12.0], 140, TR, HRF_BASIS, [0.5])
    beta = np.linalg.lstsq(np.hstack([xa, xb]), y, rcond=None)[0]  # (2K, V)
    assert np.allclose(beta[:K], mean[0], atol=1e-3) and np.allclose(beta[K:], mean[1], atol=1e-3)


def test_fit_recovers_known_maps_and_finds_real_subject_differences(tmp_path):
    rng = np.random.default_rng(1)
    store, maps = make_store(tmp_path / "s", rng, subject_scale=0.5)
    model = ResponseModel.fit(store, store.indices(split="train"))
    for c in range(2):
        assert np.corrcoef(model.mean[c, 0], maps[c])[0, 1] > 0.95
    assert len(model.components) >= 1  # a gain that differs between subjects is signal
    gains = [model.maps(model.subject_scores[f"s{s}"])[0, 0] @ maps[0] for s in range(8)]
    assert np.std(gains) > 0.1 * np.mean(np.abs(gains))


def test_estimation_noise_is_not_mistaken_for_subject_differences(tmp_path):
    rng = np.random.default_rng(2)
    store, _ = make_store(tmp_path / "s", rng, subject_scale=0.0, noise=2.0)
    model = ResponseModel.fit(store, store.indices(split="train"))
    draws = np.stack([model.maps(z) for z in model.draw_subjects(20, rng)])  # (20, C, K, V)
    assert draws.std(0).mean() < 0.1 * np.abs(model.mean).mean()


def test_save_load_round_trip_and_clear_errors(tmp_path):
    rng = np.random.default_rng(3)
    store, _ = make_store(tmp_path / "s", rng, subject_scale=0.5, subjects=4)
    model = ResponseModel.fit(store, store.indices(split="train"))
    loaded = ResponseModel.load(model.save(tmp_path / "response.npz"))
    assert loaded.conditions == model.conditions and np.array_equal(loaded.components, model.components)
    assert all(np.array_equal(loaded.subject_scores[s], v) for s, v in model.subject_scores.items())
    with pytest.raises(FmrisynthError, match="unknown condition 'c'"):
        model.predict([Event("c", 0.0, 1.0)], TR, T)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FmrisynthError, match="response model"):
        ResponseModel.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("sigma", [0.0, 1.0, 1.5])
def test_codec_noise_reproduces_its_smoothness_and_variance(sigma):
    rng = np.random.default_rng(4)
    mask = np.ones((16, 16, 16), bool)
    truth = CodecNoise(np.full(mask.sum(), 0.6, np.float32), sigma)
    frames = truth.sample(40, mask, rng).reshape(40, *mask.shape)  # (T, D, H, W)
    fitted = CodecNoise.fit(frames, mask)
    assert fitted.sd.mean() == pytest.approx(0.6, rel=0.1)
    assert fitted.sigma_vox == pytest.approx(sigma, abs=0.15)

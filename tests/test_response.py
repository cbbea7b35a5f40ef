"""The task response model: its GLM recovers its own maps, it finds the maps, the subjects and the trial
variability of runs made from known ones with the whole design in view (earlier blocks' tails, a
condition that is not a label, the rest baseline), and its shrinkage keeps estimation noise out of
the subject model."""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from fmrisynth.config import load_config
from fmrisynth.data.run_events import FILE, RunEvent, read_run_events, write_run_events
from fmrisynth.data.simulator import simulate, trial_gains
from fmrisynth.data.store import ClipStore, StoreWriter
from fmrisynth.errors import FmrisynthError
from fmrisynth.models.response import Event, ResponseModel, clip_events
from fmrisynth.models.response_fit import K
from fmrisynth.tasks import HRF_BASIS, design_regressors

T, TR, V, RUN = 20, 0.72, 300, 200
CONDITIONS = ["a", "b"]  # labels; "m" occurs in the runs too, right before "a", but is not one


def make_store(path, rng, subject_scale=0.0, noise=1.0, subjects=8, runs=2, trial_sd=0.0):
    """Runs of 8 s blocks m, a, b (m always right before a), each response = the condition's map (scaled
    per subject, times a gain 1 + trial_sd * N(0, 1) per block) + white noise, z-scored per run as
    prepare does; clips of a and b cut at their onsets, every run's events kept in events.tsv."""
    maps = rng.normal(size=(3, V))  # canonical-HRF maps of a, b, m
    mask = np.zeros((5, 6, 10), bool)
    mask.reshape(-1)[:V] = True
    sources = []
    with StoreWriter(path, (T, V), np.eye(4), mask.shape, CONDITIONS, mask=mask) as w:
        for s in range(subjects):
            gain = 1 + subject_scale * rng.normal()
            for r in range(runs):
                events, y, t = {"a": [], "b": [], "m": []}, noise * rng.normal(size=(RUN, V)), 4.0
                while t + 40 < RUN * TR:
                    for c in (["m", "a"] if rng.random() < 0.5 else ["b"]):
                        events[c].append((round(t, 2), 8.0))
                        amp = gain * (1 + trial_sd * rng.normal())
                        y += design_regressors([t], [8.0], RUN, TR) @ (amp * maps["abm".index(c)])[None]
                        t += 8.0 + rng.uniform(2.0, 6.0)
                y = (y - y.mean(0)) / y.std(0)
                sources.append(SimpleNamespace(subject=f"s{s}", task="t", run=str(r), events=events))
                for c in CONDITIONS:
                    for onset, duration in events[c]:
                        start = int(onset // TR) - int(rng.integers(0, 3))
                        w.add(y[start : start + T], condition=c, label=CONDITIONS.index(c), subject=f"s{s}", task="t",
                              run=str(r), onset_s=round(onset - start * TR, 4), duration_s=duration, tr=TR,
                              start_frame=start, split="train")  # fmt: skip
        write_run_events(w.tmp, sources)
    return ClipStore(path), maps


def test_a_glm_on_the_models_own_prediction_recovers_its_maps():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(2, K, 50)).astype(np.float32)
    model = ResponseModel(CONDITIONS, mean, np.zeros((0, 2, K, 50), np.float32), {}, np.ones(50, np.float32))
    events = [Event("a", 2.0, 10.0), Event("b", 30.0, 12.0, modulation=0.5), Event("a", 60.0, 10.0)]
    y = model.predict(events, TR, 140)  # (T, V): a whole run, two conditions, one modulated
    xa = design_regressors([2.0, 60.0], [10.0, 10.0], 140, TR, HRF_BASIS)
    xb = design_regressors([30.0], [12.0], 140, TR, HRF_BASIS, [0.5])
    beta = np.linalg.lstsq(np.hstack([xa, xb]), y, rcond=None)[0]  # (2K, V)
    assert np.allclose(beta[:K], mean[0], atol=1e-3) and np.allclose(beta[K:], mean[1], atol=1e-3)


def test_events_before_the_first_frame_shape_the_response():
    rng = np.random.default_rng(5)
    model = ResponseModel(CONDITIONS, rng.normal(size=(2, K, 20)).astype(np.float32),
                          np.zeros((0, 2, K, 20), np.float32), {}, np.ones(20, np.float32))  # fmt: skip
    whole = model.predict([Event("a", 3.0, 8.0), Event("b", 20.0, 8.0)], TR, 60)
    late = model.predict([Event("a", 3.0 - 30 * TR, 8.0), Event("b", 20.0 - 30 * TR, 8.0)], TR, 30)
    assert np.allclose(late, whole[30:], atol=1e-3)  # the tail of a block that ended before the clip began


def test_fit_sees_the_whole_design(tmp_path):
    """m always precedes a: fitted clip by clip, a's map would hold m's tail; in view of the runs it does not."""
    rng = np.random.default_rng(1)
    store, maps = make_store(tmp_path / "s", rng)
    model = ResponseModel.fit(store, store.indices(split="train"))
    assert model.nuisance == ["m"]
    for c in range(2):
        assert np.corrcoef(model.mean[c, 0], maps[c])[0, 1] > 0.97
    assert np.corrcoef(model.nuisance_mean[0, 0], maps[2])[0, 1] > 0.9
    assert abs(np.corrcoef(model.mean[0, 0] - model.mean[0, 0].mean(), maps[2])[0, 1]) < 0.15
    i = int(store.indices(condition="a")[0])
    events = clip_events(store, i, model.conditions + model.nuisance)
    assert [e.condition for e in events if e.onset_s < 0] == ["m"]  # the block before a's, in the lead-in
    clip = store.item(i)
    assert ((clip - model.clip_response(store, i)) ** 2).mean() < 0.9 * (clip**2).mean()


def test_run_events_round_trip_and_a_damaged_file_is_one_line(tmp_path):
    store, _ = make_store(tmp_path / "s", np.random.default_rng(10), subjects=2, runs=1)
    events, complete = read_run_events(store)
    assert complete and set(events) == {("s0", "t", "0"), ("s1", "t", "0")}
    assert {e.condition for e in events["s0", "t", "0"]} == {"a", "b", "m"}
    assert all(isinstance(e, RunEvent) for e in events["s1", "t", "0"])
    (store.path / FILE).write_text("subject\tonset_s\ns0\tx\n")
    with pytest.raises(FmrisynthError, match="unreadable run events"):
        read_run_events(ClipStore(store.path))


def test_a_store_without_run_events_still_fits_with_a_warning(tmp_path):
    store, maps = make_store(tmp_path / "s", np.random.default_rng(6), subjects=4)
    (store.path / FILE).unlink()
    with pytest.warns(UserWarning, match="no events.tsv"):
        model = ResponseModel.fit(ClipStore(store.path), store.indices(split="train"))
    assert model.nuisance == [] and np.corrcoef(model.mean[1, 0], maps[1])[0, 1] > 0.8


def test_fit_finds_real_subject_differences(tmp_path):
    rng = np.random.default_rng(1)
    store, maps = make_store(tmp_path / "s", rng, subject_scale=0.5)
    model = ResponseModel.fit(store, store.indices(split="train"))
    assert len(model.components) >= 1  # a gain that differs between subjects is signal
    gains = [model.maps(model.subject_scores[f"s{s}"])[0, 0] @ maps[0] for s in range(8)]
    assert np.std(gains) > 0.1 * np.mean(np.abs(gains))


def test_estimation_noise_is_not_mistaken_for_subject_differences(tmp_path):
    rng = np.random.default_rng(2)
    store, _ = make_store(tmp_path / "s", rng, noise=2.0)
    model = ResponseModel.fit(store, store.indices(split="train"))
    draws = np.stack([model.maps(z) for z in model.draw_subjects(20, rng)])  # (20, C, K, V)
    assert draws.std(0).mean() < 0.1 * np.abs(model.mean).mean()


@pytest.mark.parametrize("trial_sd", [0.0, 0.3])
def test_trial_variability_is_recovered_beyond_estimation_noise(tmp_path, trial_sd):
    rng = np.random.default_rng(7)
    store, _ = make_store(tmp_path / "s", rng, noise=2.0, trial_sd=trial_sd)
    model = ResponseModel.fit(store, store.indices(split="train"))
    assert model.trial_sd == pytest.approx([trial_sd] * 2, abs=0.1)


def test_draw_gains_varies_events_only_when_trials_vary():
    model = ResponseModel(CONDITIONS, np.zeros((2, K, 5), np.float32), np.zeros((0, 2, K, 5), np.float32), {},
                          np.ones(5, np.float32))  # fmt: skip
    events, rng = [Event("a", 10.0 * k, 4.0, 2.0) for k in range(400)], np.random.default_rng(8)
    assert model.draw_gains(events, rng) == events  # and draws nothing:
    assert rng.standard_normal() == np.random.default_rng(8).standard_normal()
    model.trial_sd = np.array([0.25, 0.0], np.float32)
    gains = np.array([e.modulation for e in model.draw_gains(events, rng)]) / 2.0
    assert gains.mean() == pytest.approx(1.0, abs=0.05) and gains.std() == pytest.approx(0.25, abs=0.03)
    assert model.draw_gains([Event("b", 0.0, 4.0)], rng) == [Event("b", 0.0, 4.0)]


def test_the_simulators_trial_gains(tmp_path):
    events = {"rh": [(10.0 * k, 4.0) for k in range(500)], "lh": [(5.0, 4.0, 0.5)]}
    assert trial_gains(events, 0.0, None) is events  # sd 0 draws nothing: runs stay byte-identical
    gained = trial_gains(events, 0.3, np.random.default_rng(9))
    gains = np.array([a for _, _, a in gained["rh"]])
    assert gains.std() == pytest.approx(0.3, abs=0.03) and gained["lh"][0][2] != 0.5
    with pytest.raises(FmrisynthError, match="trial_sd"):
        simulate(load_config(None, ["sim.trial_sd=-0.1"]), tmp_path / "sim", progress=False)


def test_save_load_round_trip_and_clear_errors(tmp_path):
    rng = np.random.default_rng(3)
    store, _ = make_store(tmp_path / "s", rng, subject_scale=0.5, subjects=4)
    model = ResponseModel.fit(store, store.indices(split="train"))
    loaded = ResponseModel.load(model.save(tmp_path / "response.npz"))
    assert loaded.conditions == model.conditions and np.array_equal(loaded.components, model.components)
    assert all(np.array_equal(loaded.subject_scores[s], v) for s, v in model.subject_scores.items())
    assert loaded.nuisance == ["m"] and np.array_equal(loaded.nuisance_mean, model.nuisance_mean)
    assert np.array_equal(loaded.trial_sd, model.trial_sd)
    with np.load(tmp_path / "response.npz") as f:  # a model saved before nuisance maps and trial gains
        np.savez(tmp_path / "old.npz", **{k: f[k] for k in ("conditions", "mean", "components", "subjects", "noise_sd",
                                                              "scores")})  # fmt: skip
    old = ResponseModel.load(tmp_path / "old.npz")
    assert old.nuisance == [] and not old.trial_sd.any()
    with pytest.raises(FmrisynthError, match="unknown condition 'c'"):
        model.predict([Event("c", 0.0, 1.0)], TR, T)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FmrisynthError, match="response model"):
        ResponseModel.load(tmp_path / "bad.npz")

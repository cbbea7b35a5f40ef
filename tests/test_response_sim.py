"""The response model on the simulator's runs, whose truth is known: it recovers the spread of trial
gains (``sim.trial_sd``) and finds about none without it, and it recovers each subject's HRF latency
and each region's latency and dispersion, which its predictions then carry.

The task is 4x the demo's amplitude (``sim.task_amplitude=12``): at the demo's, four subjects'
voxels do not show the dispersion (r 0.02), and estimation noise adds 0.1-0.17 to a trial sd of 0."""

import numpy as np
import pytest

from fmrisynth.config import load_config
from fmrisynth.data.design import Event, design_tsv
from fmrisynth.data.prepare import prepare
from fmrisynth.data.run_events import read_run_events
from fmrisynth.data.sim_anatomy import SimGrid
from fmrisynth.data.sim_events import simulate_design
from fmrisynth.data.simulator import _Subject
from fmrisynth.data.store import ClipStore
from fmrisynth.models.response import ResponseModel

pytestmark = pytest.mark.slow
SUBJECTS, FRAMES, TR = 4, 400, 0.72


def fitted(root, trial_sd: float):
    """4 simulated subjects x LR, RL of 12 s MOTOR:rh and WM:2bk_faces blocks, 4x the task, prepared and fitted."""
    rng, t, design = np.random.default_rng(0), 4.0, []
    while t + 30 < FRAMES * TR:
        design.append(Event(["MOTOR:rh", "WM:2bk_faces"][len(design) % 2], round(t, 2), 12.0))
        t += 12.0 + rng.uniform(6.0, 10.0)
    (root / "design.tsv").write_text(design_tsv(design))
    cfg = load_config(None, [f"sim.subjects={SUBJECTS}", f"sim.trial_sd={trial_sd}", "sim.task_amplitude=12",
                             "data.split=[1,0,0]"])  # fmt: skip
    simulate_design(cfg, root / "sim", root / "design.tsv", TR, FRAMES, "blocks", progress=False)
    prepare("bids", root / "sim", root / "store", cfg, progress=False)
    store = ClipStore(root / "store")
    events, complete = read_run_events(store)  # prepare kept every run's design
    assert complete and all(len(run) == len(design) for run in events.values())
    return ResponseModel.fit(store, store.indices(split="train")), store, cfg


@pytest.fixture(scope="module")
def steady(tmp_path_factory):
    return fitted(tmp_path_factory.mktemp("steady"), 0.0)


def test_a_known_spread_of_trial_gains_is_recovered_and_none_is_found_without(steady, tmp_path):
    varying = fitted(tmp_path, 0.4)[0]
    rms = [float(np.sqrt(np.mean(m.trial_sd**2))) for m in (steady[0], varying)]
    assert rms[0] < 0.1 and 0.3 < rms[1] < 0.5, rms


def test_hrf_latency_and_dispersion_are_recovered_per_subject_and_region(steady):
    model, store, cfg = steady
    sim = SimGrid(cfg.sim.grid)
    latency, found = [], []
    for i in range(SUBJECTS):
        subject = _Subject(sim, cfg.sim, cfg.seed, i)
        # the truth, as the simulator makes it: -delay x time derivative, +dispersion x dispersion derivative
        delay, dispersion = (sim.to_grid(subject._warp(v[:, None]))[..., 0][store.mask]
                             for v in (subject.delay, subject.dispersion))  # fmt: skip
        maps = model.maps(model.subject_scores[f"sim{i + 1:03d}"])[0]  # (K, V) of MOTOR:rh
        strong = np.abs(maps[0]) > np.quantile(np.abs(maps[0]), 0.9)
        assert np.corrcoef(-maps[1, strong] / maps[0, strong], delay[strong])[0, 1] > 0.7
        assert np.corrcoef(maps[2, strong] / maps[0, strong], dispersion[strong])[0, 1] > 0.2
        latency.append(subject.record["hrf_delay_s"])
        # and regenerated: the predicted block response peaks later in a subject with a later HRF
        course = model.predict([Event(model.conditions[0], 2.0, 4.0)], 0.05, 400, model.maps(
            model.subject_scores[f"sim{i + 1:03d}"]))[:, strong] @ np.sign(maps[0, strong])  # fmt: skip
        found.append(0.05 * np.argmax(course))  # s, sampled finely
    assert np.corrcoef(latency, found)[0, 1] > 0.8, (latency, found)

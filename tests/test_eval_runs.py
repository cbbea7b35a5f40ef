"""Whole-run realism on runs with known answers: AR(1) noise of known rho, one distribution twice."""

import numpy as np
import pandas as pd
import pytest

from fmrisynth.evaluate.runs import Run, evaluate_runs, runs_table

EVENTS = pd.DataFrame({"onset": [20.0, 80.0, 140.0], "duration": [15.0, 15.0, 15.0], "trial_type": ["a", "b", "a"]})
TR, T = 1.0, 240


def _ar1_runs(rng, rho, n_runs=3, voxels=400, shared=0.0, offset=100.0, frames=T):
    """Runs (T, V) of AR(1) noise with lag-1 correlation ``rho``, a ``shared`` global component, a
    task response, and a scanner-unit offset and scale per voxel (z-scoring must remove them)."""
    from nilearn.glm.first_level import make_first_level_design_matrix

    task = make_first_level_design_matrix(np.arange(frames) * TR, EVENTS, hrf_model="glover", drift_model=None)[["a", "b"]]
    runs = []
    for _ in range(n_runs):
        x = np.empty((frames, voxels))
        x[0] = rng.normal(size=voxels) / np.sqrt(1 - rho**2)
        for t in range(1, frames):
            x[t] = rho * x[t - 1] + rng.normal(size=voxels)
        x += shared * x.std() * rng.normal(size=(frames, 1))  # white, so it leaves the autocorrelation alone
        x += task.to_numpy() @ rng.normal(size=(2, voxels))
        runs.append(Run((offset + rng.uniform(1, 5, voxels) * x).astype(np.float32), EVENTS, TR))
    return runs


@pytest.mark.parametrize("rho", [0.1, 0.5])
def test_autocorrelation_of_ar1_runs_is_rho_to_the_lag(rng, rho):
    # 1200 frames, no drift basis (high-pass below 1/T): only the design and the mean are fitted, and
    # each fitted slow regressor lowers the autocorrelation by about (1 + rho) / ((1 - rho) T)
    long = _ar1_runs(rng, rho, n_runs=2, frames=1200)
    plain = evaluate_runs(long, long, high_pass=0.0005)
    assert np.allclose(plain["autocorr_real"], rho ** np.arange(1, 6), atol=0.02), plain["autocorr_real"]
    # 240 frames with the default 0.01 Hz cosine basis: lower, and equally for two sets of one distribution
    real, gen = _ar1_runs(rng, rho), _ar1_runs(rng, rho)
    r = evaluate_runs(real, gen)
    assert np.all(np.array(r["autocorr_real"]) < rho ** np.arange(1, 6) + 0.01)
    assert r["autocorr_max_diff"] < 0.03 and r["psd_distance"] < 0.03  # one distribution twice: about 0
    assert r["psd_distance_real_halves"] < 0.04
    assert r["low_freq_share_ratio"] == pytest.approx(1.0, abs=0.15)
    assert r["fc_corr"] is None and r["notes"] == ["FC not computed: no parcels given"]


def test_different_dynamics_and_global_signal_are_seen(rng):
    parcels = np.repeat(np.arange(1, 21), 20)  # 20 parcels of 20 voxels
    real = _ar1_runs(rng, 0.5, shared=0.5)
    gen = _ar1_runs(rng, 0.05)
    r = evaluate_runs(real, gen, parcels)
    assert r["lag1_diff"] == pytest.approx(0.05 - 0.5 / 1.25, abs=0.06)  # the white global part dilutes the real lag 1
    assert r["psd_distance"] > 0.15 and r["low_freq_share_generated"] < r["low_freq_share_real"] / 2
    assert r["global_signal_share_real"] > 0.1 > 0.01 > r["global_signal_share_generated"]
    same = evaluate_runs(real, _ar1_runs(rng, 0.5, shared=0.5), parcels)
    # the shared part is one series per run, so its spectrum is noisier than the voxels' own: a wider floor
    assert same["global_signal_share_ratio"] == pytest.approx(1.0, abs=0.2) and same["psd_distance"] < 0.06
    assert "low-frequency (< 0.05 Hz) power share" in runs_table(r)


def test_runs_from_bids_folders(tmp_path, rng):
    import nibabel as nib

    from fmrisynth.evaluate.runs import compare_folders

    mask = np.zeros((6, 6, 6), bool)
    mask[1:5, 1:5, 1:5] = True
    for name, rho in (("real", 0.5), ("generated", 0.2)):
        for k, run in enumerate(_ar1_runs(rng, rho, n_runs=2, voxels=int(mask.sum()))):
            func = tmp_path / name / f"sub-{k}" / "func"
            func.mkdir(parents=True)
            volume = np.zeros((6, 6, 6, T), np.float32)
            volume[mask] = run.data.T
            nib.save(nib.Nifti1Image(volume, np.diag([6.0, 6.0, 6.0, 1.0])), func / f"sub-{k}_task-x_bold.nii.gz")
            EVENTS.to_csv(func / f"sub-{k}_task-x_events.tsv", sep="\t", index=False)
            (func / f"sub-{k}_task-x_bold.json").write_text('{"RepetitionTime": 1.0}')
    r = compare_folders(tmp_path / "real", tmp_path / "generated")
    assert r["n_real"] == 2 and r["voxels"] == 64 and r["lag1_diff"] < -0.2 and r["fc_corr"] is not None


def test_cli_evaluate_runs_writes_runs_json_and_refuses_an_empty_folder_in_one_line(tmp_path, rng, capsys):
    import json

    from fmrisynth.cli import main

    test_runs_from_bids_folders(tmp_path, rng)
    out = tmp_path / "eval"
    assert main(["evaluate", "--runs", "--real", str(tmp_path / "real"), "--generated", str(tmp_path / "generated"),
                 "--out", str(out)]) == 0
    assert "power spectrum distance" in capsys.readouterr().out
    assert json.loads((out / "runs.json").read_text())["n_generated"] == 2 and [p.name for p in out.iterdir()] == ["runs.json"]
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--runs", "--real", str(tmp_path / "real"), "--generated", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "e2")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no *_bold.nii.gz runs found" in err


def test_a_runs_events_are_read_by_the_one_events_reader(tmp_path, rng):
    """load_runs reads events.tsv through data/design.read_events_tsv: n/a rows are skipped, a bad value
    is one line naming the file (a second reader of the format would let these differ)."""
    from fmrisynth.errors import FmrisynthError
    from fmrisynth.evaluate.runs import load_runs

    test_runs_from_bids_folders(tmp_path, rng)
    events = next((tmp_path / "real").rglob("*_events.tsv"))
    table = EVENTS.astype(object)
    table.loc[len(table)] = [1.0, 1.0, "n/a"]
    table.to_csv(events, sep="\t", index=False)
    runs, _, _ = load_runs(tmp_path / "real")
    assert all(list(r.events.columns) == ["onset", "duration", "trial_type"] for r in runs)
    assert all("n/a" not in set(r.events["trial_type"]) for r in runs) and len(runs[0].events) == len(EVENTS)
    table.loc[0, "onset"] = "soon"
    table.to_csv(events, sep="\t", index=False)
    with pytest.raises(FmrisynthError, match="line 2: onset, duration and modulation must be numbers") as e:
        load_runs(tmp_path / "real")
    assert str(events) in str(e.value)

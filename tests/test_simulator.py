"""The embedded simulator: HCP layout, determinism, ground truth a GLM recovers, clean failures."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fmrisynth.cli import main
from fmrisynth.config import Config, SimConfig
from fmrisynth.data import simulator
from fmrisynth.data.sim_anatomy import HCP_AFFINE, SimGrid
from fmrisynth.data.simulator import simulate
from fmrisynth.errors import FmrisynthError
from fmrisynth.tasks import PARADIGMS


def _cfg(seed: int = 0, **sim) -> Config:
    return Config(seed=seed, sim=SimConfig(**{"subjects": 1, "tasks": "MOTOR", "runs": ("LR",), **sim}))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "motor"
    summary = simulate(_cfg(subjects=2, runs=("LR", "RL")), out, progress=False)
    return out, summary


def _run(out, subject="sim001", pe="LR"):
    return out / subject / "MNINonLinear" / "Results" / f"tfMRI_MOTOR_{pe}"


def test_layout_is_hcp_like(dataset):
    out, summary = dataset
    assert summary["subjects"] == ["sim001", "sim002"] and summary["runs"] == 4
    img = nib.load(_run(out) / "tfMRI_MOTOR_LR.nii.gz")
    assert img.shape == (32, 40, 32, PARADIGMS["MOTOR"].n_frames)
    assert img.header.get_zooms()[3] == pytest.approx(0.72)
    assert img.get_data_dtype() == np.int16
    brain = np.asarray(img.dataobj[..., 0])
    assert 8000 < brain[brain > 0].mean() < 12000  # HCP-like baseline intensity
    for ev in ("lf", "rf", "lh", "rh", "t", "cue"):
        rows = np.loadtxt(_run(out) / "EVs" / f"{ev}.txt", ndmin=2)
        assert rows.shape[1] == 3 and np.all(rows[:, 2] == 1) and np.all(rows[:, 0] + rows[:, 1] < 284 * 0.72)
    truth = out / "sim002" / "truth"
    assert nib.load(truth / "MOTOR_rh.nii.gz").shape == (32, 40, 32)
    design = pd.read_csv(truth / "design_tfMRI_MOTOR_RL.tsv", sep="\t")
    assert list(design.columns) == ["frame_time", "lf", "rf", "lh", "rh", "t", "cue"]
    meta = json.loads((out / "simulation.json").read_text())
    assert meta["conditions"][0] == "MOTOR:lf" and set(meta["subjects"]) == {"sim001", "sim002"}


def test_glm_recovers_ground_truth(dataset):
    """OLS on one subject's two runs: the rh beta map correlates with the rh truth map."""
    out, _ = dataset
    truth = nib.load(out / "sim001" / "truth" / "MOTOR_rh.nii.gz").get_fdata()
    for pe in ("LR", "RL"):
        data = nib.load(_run(out, pe=pe) / f"tfMRI_MOTOR_{pe}.nii.gz").get_fdata(dtype=np.float32)
        mean = data.mean(-1)
        brain = mean > 3000
        y = data[brain].T / mean[brain] * 100  # (T, V) percent of the run mean
        design = pd.read_csv(out / "sim001" / "truth" / f"design_tfMRI_MOTOR_{pe}.tsv", sep="\t")
        t = np.linspace(-1, 1, len(design))
        x = np.column_stack([design.drop(columns="frame_time"), np.ones_like(t), t, t**2])
        beta = np.linalg.lstsq(x, y, rcond=None)[0][list(design.columns[1:]).index("rh")]
        assert np.corrcoef(beta, truth[brain])[0, 1] > 0.6


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    files = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        simulate(_cfg(seed), tmp_path / name, progress=False)
        files.append((_run(tmp_path / name) / "tfMRI_MOTOR_LR.nii.gz").read_bytes())
    assert files[0] == files[1]
    assert files[0] != files[2]


def test_variance_order_subject_then_phase_encoding_then_task(dataset):
    out, _ = dataset
    runs = {
        (s, pe): nib.load(_run(out, s, pe) / f"tfMRI_MOTOR_{pe}.nii.gz").get_fdata(dtype=np.float32)
        for s in ("sim001", "sim002")
        for pe in ("LR", "RL")
    }
    brain = np.all([r.mean(-1) > 3000 for r in runs.values()], axis=0)
    mean = {k: r[brain].mean(-1) for k, r in runs.items()}  # (V,) per run
    subject = np.mean((mean["sim001", "LR"] - mean["sim002", "LR"]) ** 2)
    phase = np.mean((mean["sim001", "LR"] - mean["sim001", "RL"]) ** 2)
    rh = np.loadtxt(_run(out) / "EVs" / "rh.txt", ndmin=2)
    on = (np.arange(284) * 0.72 >= rh[0, 0] + 6) & (np.arange(284) * 0.72 < rh[0, 0] + rh[0, 1])
    task = np.mean((runs["sim001", "LR"][brain][:, on].mean(-1) - mean["sim001", "LR"]) ** 2)
    assert subject > phase > task > 0


def test_2mm_writes_the_real_hcp_grid_x_flipped():
    sim = SimGrid("2mm")
    assert sim.shape == (91, 109, 91)
    np.testing.assert_array_equal(sim.write_affine, HCP_AFFINE)
    world_ras = sim.grid.affine @ np.r_[sim.coords[0], 1]
    vol = sim.to_grid(np.arange(len(sim.support), dtype=np.int32)[:, None] + 1)[..., 0]
    written = np.argwhere(vol == 1)[0]  # where support voxel 0 landed in the written array
    np.testing.assert_allclose(HCP_AFFINE @ np.r_[written, 1], world_ras)


@pytest.mark.parametrize(
    "sim, message",
    [
        ({"subjects": 0}, "at least 1"),
        ({"runs": ("AP",)}, "LR and/or RL"),
        ({"tasks": "FOO"}, "unknown task"),
        ({"grid": "3cm"}, "unknown grid"),
        ({"thermal_sd": -1.0}, ">= 0"),
    ],
)
def test_bad_settings_raise_one_line(tmp_path, sim, message):
    with pytest.raises(FmrisynthError, match=message):
        simulate(_cfg(**sim), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(simulator, "write_evs", broken)  # hcp.write_evs, as the simulator calls it
    with pytest.raises(OSError):
        simulate(_cfg(), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FmrisynthError, match="not an empty directory"):
        simulate(_cfg(), tmp_path / "out", progress=False)


def test_cli_simulate(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "ds"), "--subjects", "1", "--tasks", "MOTOR", "--runs", "RL"]) == 0
    assert (_run(tmp_path / "ds", pe="RL") / "tfMRI_MOTOR_RL.nii.gz").is_file()
    capsys.readouterr()
    assert main(["simulate", "--out", str(tmp_path / "bad"), "--grid", "3cm"]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0

"""prepare(): real Haxby data, subject-wise splits, clip placement, rest clips, normalisation, the CLI."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from test_data_readers import GRID, bold, cfg, las_affine, make_hcp

from fmrisynth.cli import main
from fmrisynth.config import load_config
from fmrisynth.data.nifti import Run
from fmrisynth.data.prepare import REST, plan_clips, prepare, split_units
from fmrisynth.data.grid import get_grid
from fmrisynth.data.grid import resample
from fmrisynth.data.preprocess import in_mask, lattice_index, normalise
from fmrisynth.data.store import ClipStore

HAXBY_CATEGORIES = ["bottle", "cat", "chair", "face", "house", "scissors", "scrambledpix", "shoe"]


def test_haxby_clips_match_its_events(shared_data, tmp_path):
    root = shared_data / "haxby2001"
    with pytest.warns(UserWarning, match="is it in MNI space"):  # Haxby is in the subject's native space
        summary = prepare("bids", root, tmp_path / "store", load_config(), progress=False)  # bids: every condition
    assert summary["condition_set"] == "all" and summary["runs_off_mask"] == 12 and summary["min_mask_coverage"] < 0.8
    store = ClipStore(tmp_path / "store")
    m = store.manifest
    assert store.conditions == [f"objectviewing:{c}" for c in HAXBY_CATEGORIES]
    # 12 runs x 8 blocks, one block per category per run -> 12 clips per condition
    assert len(store) == 96 and m.condition.value_counts().to_dict() == dict.fromkeys(store.conditions, 12)
    assert (m.groupby("run").size() == 8).all() and m.run.nunique() == 12
    assert (m.label == m.condition.map(store.conditions.index)).all()
    # one subject: split by run, every run wholly in one split, train and test not empty
    assert summary["split_by"] == "run" and store.header["split_by"] == "run"
    assert (m.groupby("run").split.nunique() == 1).all() and {"train", "test"} <= set(m.split)
    # each clip really starts at its block: the events say where
    for row in m.itertuples():
        events = pd.read_csv(root / "sub-1/func" / f"sub-1_task-objectviewing_{row.run}_events.tsv", sep="\t")
        onset = events.onset[events.trial_type == row.condition.split(":")[1]].item()
        assert row.onset_s == pytest.approx(onset - row.start_frame * 2.5) and row.duration_s == 22.5
    assert store.item(0).shape == (20, int(store.mask.sum())) and summary["tr"] == 2.5
    assert yaml.safe_load((tmp_path / "store" / "config.yaml").read_text())["data"]["conditions"] == "auto"


def test_hcp_split_is_by_subject_and_seeded(tmp_path, rng):
    root = make_hcp(tmp_path / "hcp", rng, subjects=("a", "b", "c", "d", "e"))
    a = prepare("hcp", root, tmp_path / "s1", cfg("data.conditions=hcp24"), progress=False)
    prepare("hcp", root, tmp_path / "s2", cfg("data.conditions=hcp24"), progress=False)
    m1, m2 = ClipStore(tmp_path / "s1").manifest, ClipStore(tmp_path / "s2").manifest
    assert m1.drop(columns="source").equals(m2.drop(columns="source"))  # same seed, same store
    assert (m1.groupby("subject").split.nunique() == 1).all()  # no subject in two splits
    assert a["split_by"] == "subject" and set(m1.split) == {"train", "val", "test"}
    assert a["conditions"] == ["MOTOR:cue", "MOTOR:lf", "MOTOR:rh"]  # hcp24 order, only those present
    assert a["counts"]["MOTOR:rh"] == {"train": 12, "val": 4, "test": 4}  # 3/1/1 subjects x 2 runs x 2 blocks
    assert len(m1) == 5 * 2 * 4


def test_hcp7_keeps_only_its_conditions(tmp_path, rng):
    summary = prepare("hcp", make_hcp(tmp_path / "hcp", rng), tmp_path / "s", cfg(), progress=False)
    store = ClipStore(tmp_path / "s")
    assert store.conditions == ["MOTOR:rh"] and set(store.manifest.condition) == {"MOTOR:rh"}
    assert "WM:2bk_faces" in summary["missing_conditions"] and len(summary["missing_conditions"]) == 6


@pytest.mark.parametrize("n_units, expected", [(1, (1, 0, 0)), (2, (1, 0, 1)), (3, (1, 1, 1)), (10, (6, 2, 2))])
def test_split_units_never_leaves_train_or_test_empty(n_units, expected):
    units = [f"s{i}" for i in range(n_units)]
    splits = split_units(units, (0.6, 0.2, 0.2), seed=0)
    assert tuple(list(splits.values()).count(s) for s in ("train", "val", "test")) == expected
    assert split_units(units, (0.6, 0.2, 0.2), seed=0) == splits


def _run(events, n_frames=100, tr=1.0):
    return Run(path=None, dataset="d", subject="s", task="T", run="1", pe="", tr=tr,
               shape=(1, 1, 1, n_frames), affine=np.eye(4), events=events)  # fmt: skip


def test_block_onset_falls_in_the_jitter_window_or_the_clip_moves_inside_the_run():
    run = _run({"T:a": [(10.5, 8.0), (30.0, 8.0), (95.0, 5.0)]})
    onsets = {c.onset_s for seed in range(20) for c in plan_clips(run, ["T:a"], 20, 2, seed)[:2]}
    assert {np.floor(o) for o in onsets} == {0.0, 1.0, 2.0}  # onset frame uniform in [0, jitter]
    last = plan_clips(run, ["T:a"], 20, 2, 0)[-1]
    assert last.start_frame == 80 and last.onset_s == 15.0  # clamped to the run's end


def test_rest_clips_come_from_event_free_stretches():
    run = _run({"T:a": [(10.0, 20.0)], "T:b": [(60.0, 20.0)]})
    clips = plan_clips(run, ["T:a", REST], 10, 0, 0)
    rest = [c.start_frame for c in clips if c.condition == REST]
    assert rest == [0, 30, 40, 50, 80, 90]  # back to back in the free frames 0-9, 30-59 and 80-99
    assert all(c.duration_s == 10.0 for c in clips if c.condition == REST)


def test_runs_on_the_grid_lattice_are_picked_exactly_others_interpolated(rng):
    grid, data = get_grid(GRID), bold(rng, 5)  # (4, 4, 4, 5), x flipped
    mask = np.ones(grid.shape, bool)
    mask[0, 0, 0] = False
    shifted = las_affine()
    shifted[1, 3] += 10.0  # one voxel along y: the grid's y = 0 plane is outside the image
    for affine in (las_affine(), shifted):
        assert lattice_index(affine, data.shape, grid, mask) is not None
        x = in_mask(data, affine, grid, mask)  # (T, V)
        reference = resample(nib.Nifti1Image(data, affine), grid)[mask].T  # nilearn, linear
        known = reference[0] != 0  # nilearn also zeroes the image's edge plane when shifted
        assert known.sum() >= 32 and np.allclose(x[:, known], reference[:, known], atol=1e-3)
    outside = np.argwhere(mask)[:, 1] == 0
    assert (x[:, outside] == 0).all() and (x[:, ~outside] != 0).all()
    off = las_affine()
    off[2, 3] += 4.0  # 0.4 voxel: needs interpolation
    assert lattice_index(off, data.shape, grid, mask) is None
    assert np.allclose(in_mask(data, off, grid, mask), resample(nib.Nifti1Image(data, off), grid)[mask].T)


@pytest.mark.parametrize("how", ["zscore", "psc", "none"])
def test_normalise_per_voxel(how, rng):
    x = (500 + 20 * rng.standard_normal((50, 6))).astype(np.float32)
    x[:, 0] = 7.0  # a constant voxel carries no signal
    y = normalise(x.copy(), how)
    if how == "zscore":
        assert np.allclose(y[:, 1:].mean(0), 0, atol=1e-4) and np.allclose(y[:, 1:].std(0), 1, atol=1e-4)
    if how == "psc":
        expected = 100 * (x[:, 1:] - x[:, 1:].mean(0)) / x[:, 1:].mean(0)
        assert np.allclose(y[:, 1:], expected, atol=1e-3)
    if how == "none":
        assert np.array_equal(y, x)
    else:
        assert (y[:, 0] == 0).all()


def test_cli_prepare_prints_a_summary(tmp_path, rng, capsys):
    root = make_hcp(tmp_path / "hcp", rng)
    rc = main(["prepare", "--source", "hcp", str(root), "--out", str(tmp_path / "s"), "--grid", GRID,
               "--clip-len", "10", "--conditions", "all", "--quiet"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0 and "prepared 16 clips of 10 frames from 4 runs of 2 subject(s)" in out
    assert "MNI space" not in out and err == ""  # data on the MNI grid: no warning, nothing on stderr
    assert "MOTOR:rh" in out and "TR 0.72 s" in out and ClipStore(tmp_path / "s").item_shape[0] == 10

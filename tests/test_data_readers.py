"""HCP and BIDS readers, and every bad input failing in one clear line with nothing left behind.

The datasets are tiny synthetic trees (4x4x4 voxels at 10 mm, a few dozen frames) on the grid
``GRID``, written in LAS order like HCP/FSL so that reorientation is exercised too.
"""

import json
import re
import warnings

import nibabel as nib
import numpy as np
import pytest

from fmrisynth.config import load_config
from fmrisynth.data.bids import find_runs as bids_runs
from fmrisynth.data.grid import get_grid
from fmrisynth.data.hcp import find_runs as hcp_runs
from fmrisynth.data.hcp import write_run
from fmrisynth.data.prepare import prepare
from fmrisynth.errors import FmrisynthError

GRID = "10mm:4x4x4"
N_FRAMES = 40  # 28.8 s at HCP's TR


def las_affine() -> np.ndarray:
    """The grid's affine with x flipped (LAS), as HCP and FSL write MNI images."""
    a = get_grid(GRID).affine.copy()
    a[0, 3] += a[0, 0] * 3
    a[0, 0] *= -1
    return a


def bold(rng, n_frames=N_FRAMES) -> np.ndarray:
    return 1000 + 10 * rng.standard_normal((4, 4, 4, n_frames)).astype(np.float32)  # (X, Y, Z, T)


def make_hcp(root, rng, subjects=("100206", "100307"), events=None):
    """Two subjects x MOTOR LR/RL; rh and lf blocks of 4.32 s (6 frames)."""
    events = events or {"rh": [(2.16, 4.32), (15.84, 4.32)], "lf": [(8.64, 4.32)], "cue": [(0.72, 1.44)]}
    for s in subjects:
        for pe in ("LR", "RL"):
            write_run(root, s, "MOTOR", pe, bold(rng), las_affine(), events)
    return root


def make_bids(root, rng, tr=2.0, header_tr=2.0, n_runs=2):
    """One subject, a dataset-level sidecar, a subject-level override of nothing but TaskName."""
    func = root / "sub-01" / "func"
    func.mkdir(parents=True)
    (root / "task-look_bold.json").write_text(json.dumps({"RepetitionTime": tr}))
    (root / "sub-01" / "sub-01_task-look_bold.json").write_text(json.dumps({"TaskName": "look"}))
    for r in range(1, n_runs + 1):
        stem = func / f"sub-01_task-look_dir-AP_run-{r:02d}"
        img = nib.Nifti1Image(bold(rng, 20), las_affine())
        img.header.set_zooms((10.0, 10.0, 10.0, header_tr))
        nib.save(img, f"{stem}_bold.nii.gz")
        stem.with_name(stem.name + "_events.tsv").write_text(
            "onset\tduration\ttrial_type\n2.0\t6.0\tface\n14.0\t6.0\thouse\n30.0\t2.0\tn/a\n"
        )
    return root


def cfg(*overrides):
    return load_config(None, [f"data.grid={GRID}", "data.clip_len=8", *overrides])


def test_hcp_reader_finds_subjects_tasks_and_phase_encodings(tmp_path, rng):
    runs = hcp_runs(make_hcp(tmp_path / "hcp", rng))
    assert [(r.subject, r.task, r.pe) for r in runs] == [
        ("100206", "MOTOR", "LR"), ("100206", "MOTOR", "RL"), ("100307", "MOTOR", "LR"), ("100307", "MOTOR", "RL"),
    ]  # fmt: skip
    assert runs[0].tr == 0.72 and runs[0].n_frames == N_FRAMES
    assert runs[0].events["MOTOR:rh"] == [(2.16, 4.32), (15.84, 4.32)]
    assert set(runs[0].events) == {"MOTOR:rh", "MOTOR:lf", "MOTOR:cue"}


def test_hcp_header_tr_that_disagrees_warns_and_is_ignored(tmp_path, rng):
    root = make_hcp(tmp_path / "hcp", rng, subjects=("1",))
    path = root / "1/MNINonLinear/Results/tfMRI_MOTOR_LR/tfMRI_MOTOR_LR.nii.gz"
    img = nib.load(path)
    img = nib.Nifti1Image(img.get_fdata(), img.affine)
    img.header.set_zooms((10.0, 10.0, 10.0, 2.0))
    nib.save(img, path)
    with pytest.warns(UserWarning, match="header says TR 2 s, using 0.72"):
        runs = hcp_runs(root)
    assert all(r.tr == 0.72 for r in runs)


def test_bids_reader_uses_inherited_sidecar_and_warns_on_header_tr(tmp_path, rng):
    root = make_bids(tmp_path / "bids", rng, tr=2.0, header_tr=3.0)
    with pytest.warns(UserWarning, match="header says TR 3 s, using 2 s from sidecar"):
        runs = bids_runs(root)
    assert [(r.subject, r.task, r.run, r.pe, r.tr) for r in runs] == [
        ("01", "look", "dir-AP_run-01", "AP", 2.0), ("01", "look", "dir-AP_run-02", "AP", 2.0),
    ]  # fmt: skip
    assert runs[0].events == {"look:face": [(2.0, 6.0)], "look:house": [(14.0, 6.0)]}  # 'n/a' rows skipped
    # a deeper sidecar overrides the dataset-level one
    (root / "sub-01" / "sub-01_task-look_bold.json").write_text(json.dumps({"RepetitionTime": 1.5}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert bids_runs(root)[0].tr == 1.5


def test_partial_nans_are_masked_out_and_reported(tmp_path, rng):
    root = make_hcp(tmp_path / "hcp", rng)
    path = root / "100206/MNINonLinear/Results/tfMRI_MOTOR_LR/tfMRI_MOTOR_LR.nii.gz"
    img = nib.load(path)
    data = img.get_fdata(dtype=np.float32)
    data[1, 2, 2, 5] = np.nan  # one voxel, one frame
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    summary = prepare("hcp", root, tmp_path / "store", cfg("data.conditions=all"), progress=False)
    assert summary["nan_voxels_masked"] >= 1
    from fmrisynth.data.store import ClipStore

    store = ClipStore(tmp_path / "store")
    x = np.stack([store.item(i) for i in store.indices() if store.manifest.source[i] == str(path)])
    assert np.isfinite(x).all() and (x == 0).all(axis=(0, 1)).sum() >= 1  # the voxel is zero in that run


def _corrupt(path):
    path.write_bytes(b"this is not gzip" * 10)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _to_3d(path):
    img = nib.load(path)
    nib.save(nib.Nifti1Image(img.get_fdata()[..., 0], img.affine), path)


def _all_nan(path):
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.full(img.shape, np.nan, np.float32), img.affine, img.header), path)


def _shift_affine(path):
    img = nib.load(path)
    affine = img.affine.copy()
    affine[2, 3] += 10
    nib.save(nib.Nifti1Image(img.get_fdata(), affine, img.header), path)


def _event_past_end(path):
    (path.parent / "EVs" / "t.txt").write_text("8.64\t4.32\t1\n40\t4.32\t1\n")


HCP_RUN = "100307/MNINonLinear/Results/tfMRI_MOTOR_RL/tfMRI_MOTOR_RL.nii.gz"


@pytest.mark.parametrize(
    "damage, words, overrides",
    [
        (_corrupt, "not a readable NIfTI", []),
        (_truncate, "corrupt or truncated", []),
        (_to_3d, "image is 3D", []),
        (_all_nan, "every value of the run is NaN or Inf", []),
        (_shift_affine, "affine differs from the subject's other run", []),
        (_event_past_end, "ends after the run", []),
        (None, "none of the hcp7 conditions", ["data.conditions=hcp7"]),
        (None, "clips of 50 frames are longer than the run", ["data.clip_len=50"]),
        (None, "brain mask is empty", ["data.mask=EMPTY"]),
        (None, "unknown condition set", ["data.conditions=hcp9"]),
    ],
)
def test_bad_hcp_input_is_one_clear_error_and_leaves_nothing(tmp_path, rng, damage, words, overrides):
    root = make_hcp(tmp_path / "hcp", rng, events={"lf": [(2.16, 4.32)], "t": [(8.64, 4.32)]})
    if damage is not None:
        damage(root / HCP_RUN)
    if "data.mask=EMPTY" in overrides:  # a mask far away from the grid: nothing of it lands on the grid
        far = np.diag([10.0, 10.0, 10.0, 1.0])
        far[:3, 3] = 900.0
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), far), root / "mask.nii.gz")
        overrides = [f"data.mask={root / 'mask.nii.gz'}"]
    with pytest.raises(FmrisynthError, match=words) as e:
        prepare("hcp", root, tmp_path / "store", cfg("data.conditions=all", *overrides), progress=False)
    assert len(str(e.value).splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["hcp"]  # no store, no temporary directory


@pytest.mark.parametrize(
    "sidecar, words",
    [({"RepetitionTime": 0}, "repetition time is 0.0 s"), ({"RepetitionTime": -2}, "repetition time is -2.0 s"),
     ({}, "no repetition time")],
)  # fmt: skip
def test_bad_bids_tr_is_an_error(tmp_path, rng, sidecar, words):
    root = make_bids(tmp_path / "bids", rng)
    (root / "task-look_bold.json").write_text(json.dumps(sidecar))
    with pytest.raises(FmrisynthError, match=words):
        prepare("bids", root, tmp_path / "store", cfg("data.conditions=all"), progress=False)
    assert not (tmp_path / "store").exists()


def test_missing_and_empty_datasets_are_clear_errors(tmp_path):
    with pytest.raises(FmrisynthError, match="dataset root not found"):
        prepare("bids", tmp_path / "nowhere", tmp_path / "store", cfg(), progress=False)
    (tmp_path / "empty").mkdir()
    for source, words in [("hcp", "no HCP task runs found"), ("bids", "no BOLD runs with events found")]:
        with pytest.raises(FmrisynthError, match=words):
            prepare(source, tmp_path / "empty", tmp_path / "store", cfg(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# --- issue 14: events that are missing, stores without training clips, suspicious data ---------


def _no_evs_folder(root):
    import shutil

    shutil.rmtree(root / "100307/MNINonLinear/Results/tfMRI_MOTOR_RL/EVs")


def _placeholder_evs_only(root):
    evs = root / "100307/MNINonLinear/Results/tfMRI_MOTOR_RL/EVs"
    for f in evs.iterdir():
        f.write_text("0\t0\t0\n")  # HCP's all-zero placeholder row: no event


@pytest.mark.parametrize(
    "damage, words", [(_no_evs_folder, "task run without events: it has no EVs/ folder"),
                      (_placeholder_evs_only, "task run without events: its EVs/ folder holds no event")],
)  # fmt: skip
def test_hcp_run_without_events_is_refused_naming_it(tmp_path, rng, damage, words):
    root = make_hcp(tmp_path / "hcp", rng)
    damage(root)
    with pytest.raises(FmrisynthError, match=words) as e:
        prepare("hcp", root, tmp_path / "store", cfg("data.conditions=all"), progress=False)
    assert "tfMRI_MOTOR_RL" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["hcp"]


def test_bids_defaults_to_every_condition_hcp_to_hcp7(tmp_path, rng):
    summary = prepare("bids", make_bids(tmp_path / "bids", rng), tmp_path / "s", cfg(), progress=False)
    assert summary["condition_set"] == "all" and summary["conditions"] == ["look:face", "look:house"]
    summary = prepare("hcp", make_hcp(tmp_path / "hcp", rng), tmp_path / "s2", cfg(), progress=False)
    assert summary["condition_set"] == "hcp7" and summary["conditions"] == ["MOTOR:rh"]


def test_bids_conditions_flag_still_overrides(tmp_path, rng):
    root = make_bids(tmp_path / "bids", rng)
    with pytest.raises(FmrisynthError, match="none of the hcp7 conditions occur"):
        prepare("bids", root, tmp_path / "s", cfg("data.conditions=hcp7"), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["bids"]


def test_bids_task_run_without_events_is_refused_rest_run_skipped(tmp_path, rng):
    root = make_bids(tmp_path / "bids", rng)
    func = root / "sub-01" / "func"
    rest = func / "sub-01_task-rest_bold.nii.gz"
    nib.save(nib.Nifti1Image(bold(rng, 20), las_affine()), rest)
    (root / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 2.0}))
    with pytest.warns(UserWarning, match="resting-state run without events, skipped"):
        assert len(bids_runs(root)) == 2
    (func / "sub-01_task-look_dir-AP_run-02_events.tsv").unlink()
    with pytest.raises(FmrisynthError, match="task run without an events file") as e:
        prepare("bids", root, tmp_path / "store", cfg(), progress=False)
    assert "run-02_bold" in str(e.value) and not (tmp_path / "store").exists()
    (func / "sub-01_task-look_dir-AP_run-02_events.tsv").write_text("onset\tduration\ttrial_type\n30.0\t2.0\tn/a\n")
    with pytest.raises(FmrisynthError, match="events file has no event with a trial_type"):
        prepare("bids", root, tmp_path / "store", cfg(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bids"]


def test_a_store_without_training_clips_is_refused(tmp_path, rng):
    root = make_bids(tmp_path / "bids", rng, n_runs=1)  # one run: one unit to split
    with pytest.raises(FmrisynthError, match="no training clips"):
        prepare("bids", root, tmp_path / "store", cfg("data.split=0,0,1"), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["bids"]


def test_subjects_without_the_chosen_conditions_take_no_split_place(tmp_path, rng):
    root = make_hcp(tmp_path / "hcp", rng, subjects=("a", "b", "c", "d"))
    make_hcp(root, rng, subjects=("e", "f"), events={"lf": [(2.16, 4.32)]})  # no rh: nothing for hcp7
    summary = prepare("hcp", root, tmp_path / "s", cfg(), progress=False)
    assert summary["subjects"] == 4 and summary["counts"]["MOTOR:rh"]["train"] > 0


def test_an_all_zero_run_warns_naming_it(tmp_path, rng):
    root = make_hcp(tmp_path / "hcp", rng)
    path = root / HCP_RUN
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine, img.header), path)
    with pytest.warns(UserWarning, match="every value of the run is 0") as record:
        prepare("hcp", root, tmp_path / "store", cfg(), progress=False)
    assert any(str(path) in str(w.message) for w in record)


def test_data_off_the_mni_mask_warn_mni_data_do_not(tmp_path, rng):
    summary = prepare("hcp", make_hcp(tmp_path / "hcp", rng), tmp_path / "s", cfg(), progress=False)
    assert summary["min_mask_coverage"] == 1.0 and summary["runs_off_mask"] == 0
    shifted = tmp_path / "shifted"
    for s in ("1", "2"):
        for pe in ("LR", "RL"):
            affine = las_affine()
            affine[1, 3] += 20.0  # two voxels along y: the data's brain covers half of the mask
            write_run(shifted, s, "MOTOR", pe, bold(rng), affine, {"rh": [(2.16, 4.32)]})
    with pytest.warns(UserWarning, match=r"its brain covers only 50% of the MNI brain mask .* is it in MNI space"):
        summary = prepare("hcp", shifted, tmp_path / "s2", cfg(), progress=False)
    assert summary["runs_off_mask"] == 4 and summary["min_mask_coverage"] == 0.5
    from fmrisynth.data.prepare import format_summary

    assert "4 of 4 runs cover under 80% of the brain mask (lowest 50%)" in format_summary(summary)


def test_a_header_nibabel_repairs_is_one_warning_not_log_lines(tmp_path, rng, capsys):
    import gzip

    from fmrisynth.cli import main

    root = make_hcp(tmp_path / "hcp", rng)
    path = root / HCP_RUN
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[0] ^= 4  # sizeof_hdr 348 -> 344: nibabel fixes it and logs to stderr
    path.write_bytes(gzip.compress(bytes(raw)))
    assert main(["prepare", "--source", "hcp", str(root), "--out", str(tmp_path / "s"), "--grid", GRID, "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fmrisynth prepare: warning: {path}: header repaired on reading (sizeof_hdr should be 348; set sizeof_hdr to 348)"]


@pytest.mark.parametrize("text, message", [
    ("onset\tduration\ttrial_type\n2\t6\tface\n4\tsoon\thouse\n", "line 3: onset and duration must be numbers"),
    ("onset\ttrial_type\n1\tface\n", "events file lacks column(s) duration"),
    (b"\xff\xfe\x00onset", "not a readable events.tsv"),
])  # fmt: skip
def test_bids_events_and_designs_are_read_by_one_reader(tmp_path, text, message):
    """A dataset's events.tsv (``prepare``) and a design (``sample``/``simulate --events``) come through
    ``data.design.read_events_tsv``: the same rows, the same refusals."""
    from fmrisynth.data.bids import read_events
    from fmrisynth.data.design import Event, read_design, read_events_tsv

    good = tmp_path / "good_events.tsv"
    good.write_text("onset\tduration\ttrial_type\tmodulation\n14\t6\thouse\tn/a\n2\t6\tface\t2\n30\t2\tn/a\t1\n")
    assert read_events_tsv(good) == [(2, Event("house", 14.0, 6.0)), (3, Event("face", 2.0, 6.0, 2.0))]
    assert read_events(good, "look") == {"look:house": [(14.0, 6.0)], "look:face": [(2.0, 6.0)]}
    assert read_design(good, ["look:face", "look:house"], 1.0, 40, task="look") == [
        Event("look:face", 2.0, 6.0, 2.0), Event("look:house", 14.0, 6.0)]
    bad = tmp_path / "bad_events.tsv"
    bad.write_bytes(text) if isinstance(text, bytes) else bad.write_text(text)
    with pytest.raises(FmrisynthError, match=re.escape(message)):
        read_events(bad, "look")
    in_design = message.replace("onset and duration", "onset, duration and modulation")  # read_design reads modulation
    with pytest.raises(FmrisynthError, match=re.escape(in_design)):
        read_design(bad, ["look:face", "look:house"], 1.0, 40, task="look")

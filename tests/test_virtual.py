"""Virtual experiments: whole runs of any design as a BIDS dataset nilearn reads as it stands,
the simulator on the same design, and synthetic clips as a torch Dataset.

The tiny stage-2 run (conftest.stage2_run, trained once per session) and stand-in VQ-GAN of
test_diffusion_stage2 are reused; in a copy of the run the response model is rewritten with one
subject component, so that generated subjects differ in their maps.
"""

import dataclasses
import json
import shutil
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from test_diffusion_stage2 import AFFINE, CONDITIONS, GRID, TR, stand_in_vqgan

from fmrisynth.cli import main
from fmrisynth.data.design import read_design
from fmrisynth.data.store import ClipStore
from fmrisynth.errors import FmrisynthError
from fmrisynth.generate import SyntheticClips, codec
from fmrisynth.generate.bids import read_clips
from fmrisynth.generate.sample import sample, sample_runs
from fmrisynth.models.response import ResponseModel
from fmrisynth.models.response_fit import K

pytestmark = pytest.mark.slow  # seconds or more per test: `make test` runs it, `make test-fast` does not

FRAMES = 60
DESIGN = "onset\tduration\ttrial_type\n3\t8\tMOTOR:rh\n15\t8\tWM:2bk_faces\n27\t8\tMOTOR:rh\n35\t4\tWM:2bk_faces\n"
# README, "Virtual experiments": the arguments nilearn needs for these files
README_ARGS = dict(space_label="", derivatives_folder=".", signal_scaling=False)


@pytest.fixture(scope="module", autouse=True)
def fake_vqgan():
    """test_diffusion_stage2's stand-in VQ-GAN, for the whole module (the runs fixture is module-wide)."""
    with pytest.MonkeyPatch.context() as mp:
        stand_in_vqgan(mp)
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory, stage2_run, fake_vqgan):
    """The session's tiny run (conftest.stage2_run) copied, its response maps rewritten: population
    (2, K, V) canonical only, plus one strong subject component (sampling reads the latent store's)."""
    root = tmp_path_factory.mktemp("virtual") / "stage2"
    shutil.copytree(stage2_run, root)
    mask = ClipStore(root / "clips").mask
    n_vox = int(mask.sum())
    rng = np.random.default_rng(1)
    mean = np.zeros((2, K, n_vox), np.float32)
    mean[:, 0] = rng.normal(size=(2, n_vox)) * 20
    component = np.zeros((1, 2, K, n_vox), np.float32)
    component[0, :, 0] = rng.normal(size=(2, n_vox)) * 10
    ResponseModel(CONDITIONS, mean, component, {}, np.ones(n_vox, np.float32)).save(root / "latents" / "response.npz")
    (root / "design.tsv").write_text(DESIGN)
    return {"root": root, "run": root / "run", "mask": mask, "mean": mean, "component": component}


@pytest.fixture(scope="module")
def runs(model):
    """Two generated subjects of DESIGN, through the CLI."""
    out = model["root"] / "bids"
    args = ["sample", "--checkpoint", str(model["run"]), "--events", str(model["root"] / "design.tsv"), "--tr", str(TR),
            "--frames", str(FRAMES), "--subjects", "2", "--task", "motor", "--seed", "7", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


def _bold(root, subject, task="motor"):
    return root / f"sub-{subject}" / "func" / f"sub-{subject}_task-{task}_run-1_bold.nii.gz"


def test_runs_are_a_bids_derivative_dataset(runs, model):
    description = json.loads((runs / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Version"] and "step_" in description["GeneratedBy"][0]["Checkpoint"]
    img = nib.load(_bold(runs, "synth02"))
    assert img.shape == (*GRID, FRAMES) and img.get_data_dtype() == np.float32
    assert np.allclose(img.affine, AFFINE) and np.isclose(img.header.get_zooms()[3], TR)
    data = img.get_fdata()
    assert np.isfinite(data).all() and (data[~model["mask"]] == 0).all() and data[model["mask"]].std() > 0
    sidecar = json.loads(_bold(runs, "synth02").with_name("sub-synth02_task-motor_run-1_bold.json").read_text())
    assert sidecar["RepetitionTime"] == TR and sidecar["TaskName"] == "motor" and sidecar["seed"] == 7
    assert sidecar["generator"]["steps"] == 4 and sidecar["generator"]["frames"] == FRAMES  # the run's sample_steps
    events = pd.read_csv(_bold(runs, "synth02").with_name("sub-synth02_task-motor_run-1_events.tsv"), sep="\t")
    assert list(events.columns) == ["onset", "duration", "trial_type"]  # modulation only when one is not 1
    assert list(events["trial_type"]) == ["MOTOR:rh", "WM:2bk_faces", "MOTOR:rh", "WM:2bk_faces"]


def test_nilearn_analyses_the_output_as_it_stands(runs, model):
    """first_level_from_bids with the README's arguments, and FirstLevelModel on the files directly."""
    from nilearn.glm.first_level import FirstLevelModel, first_level_from_bids

    mask_file = _bold(runs, "synth01").with_name("sub-synth01_task-motor_run-1_desc-brain_mask.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to guess: TR, slice timing and subjects are all in the files
        models, imgs, events, confounds = first_level_from_bids(runs, "motor", mask_img=str(mask_file), **README_ARGS)
    assert [m.subject_label for m in models] == ["synth01", "synth02"] and models[0].t_r == TR
    effects = []
    for glm, img, ev, conf in zip(models, imgs, events, confounds):
        glm.fit(img, ev, confounds=conf)
        effects.append(np.stack([glm.compute_contrast(c, output_type="effect_size").get_fdata()[model["mask"]]
                                 for c in CONDITIONS]))  # fmt: skip  # (2, V)
    for c in range(2):  # each condition's map is the response model's, through the subject's own draw
        assert np.corrcoef(effects[0][c], model["mean"][c, 0])[0, 1] > 0.8
        diff = effects[0][c] - effects[1][c]  # subjects differ along the component
        assert abs(np.corrcoef(diff, model["component"][0, c, 0])[0, 1]) > 0.8
    direct = FirstLevelModel(t_r=TR, mask_img=str(mask_file), signal_scaling=False).fit(
        str(_bold(runs, "synth01")), events=pd.read_csv(str(_bold(runs, "synth01")).replace("bold.nii.gz", "events.tsv"), sep="\t"))
    z = direct.compute_contrast("MOTOR:rh").get_fdata()[model["mask"]]
    assert np.isfinite(z).all() and np.corrcoef(z, model["mean"][0, 0])[0, 1] > 0.7


def test_a_subject_is_its_seed_alone_and_modulation_scales_its_response(runs, model, tmp_path):
    """Subject 1 of one run is subject 1 of three; background fixed, the response is linear in modulation."""
    one = sample_runs(model["run"], model["root"] / "design.tsv", TR, FRAMES, tmp_path / "a", task="motor", seed=7)
    assert np.array_equal(nib.load(one[0]).get_fdata(), nib.load(_bold(runs, "synth01")).get_fdata())
    data = []
    for m in (1.0, 2.0, 3.0):  # (an events.tsv with modulation 1 everywhere is written without the column)
        (tmp_path / f"d{m}.tsv").write_text("onset\tduration\ttrial_type\tmodulation\n3\t8\tMOTOR:rh\t" + f"{m}\n")
        data.append(nib.load(sample_runs(model["run"], tmp_path / f"d{m}.tsv", TR, 30, tmp_path / f"m{m}")[0]).get_fdata())
    assert np.allclose(data[2] - data[0], 2 * (data[1] - data[0]), atol=1e-4) and np.abs(data[1] - data[0]).max() > 1


def test_any_length_in_one_pass(model, tmp_path):
    (tmp_path / "d.tsv").write_text("onset\tduration\ttrial_type\n0\t1\tWM:2bk_faces\n")
    for frames in (3, 17):
        assert nib.load(sample_runs(model["run"], tmp_path / "d.tsv", TR, frames, tmp_path / f"f{frames}")[0]).shape[3] == frames


@pytest.mark.parametrize(
    "design, extra, message",
    [
        ("onset\tduration\ttrial_type\n1\t2\tMOTOR:lf\n", [], "d.tsv: line 2: unknown trial_type 'MOTOR:lf'; known conditions: MOTOR:rh, WM:2bk_faces"),
        ("onset\tduration\ttrial_type\n40\t5\tMOTOR:rh\n", [], "d.tsv: line 2: the event at 40 s lasting 5 s ends after the run"),
        ("onset\tduration\ttrial_type\nsoon\t5\tMOTOR:rh\n", [], "d.tsv: line 2: onset, duration and modulation must be numbers"),
        ("onset\ttrial_type\n1\tMOTOR:rh\n", [], "d.tsv: events file lacks column(s) duration"),
        ("onset\tduration\ttrial_type\n1\t2\tMOTOR:rh\n", ["--task", "my-task"], "must be letters and digits"),
        ("onset\tduration\ttrial_type\n1\t2\tMOTOR:rh\n", ["--guidance", "2"], "--guidance belongs to clip mode"),
        ("onset\tduration\ttrial_type\n1\t2\tMOTOR:rh\n", ["--condition", "MOTOR:rh"], "--condition belongs to clip mode"),
    ],
)
def test_bad_designs_are_one_line_naming_the_file_and_write_nothing(model, tmp_path, capsys, design, extra, message):
    (tmp_path / "d.tsv").write_text(design)
    out = tmp_path / "out"
    args = ["sample", "--checkpoint", str(model["run"]), "--events", str(tmp_path / "d.tsv"), "--tr", str(TR),
            "--frames", "40", "--out", str(out), *extra]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() or not any(out.rglob("*"))


def test_existing_runs_and_models_without_a_response_are_refused(runs, model, tmp_path, monkeypatch):
    with pytest.raises(FmrisynthError, match="already holds sub-synth01/func/sub-synth01_task-motor_run-1"):
        sample_runs(model["run"], model["root"] / "design.tsv", TR, FRAMES, runs, task="motor")
    extras = codec.latent_extras  # a stage2.response: none model has no response model
    monkeypatch.setattr(codec, "latent_extras", lambda store: dataclasses.replace(extras(store), response=None))
    with pytest.raises(FmrisynthError, match="trained with stage2.response: none"):
        sample_runs(model["run"], model["root"] / "design.tsv", TR, FRAMES, tmp_path / "none")
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").rglob("*"))


def test_design_reader_accepts_bare_trial_types_skips_na_and_sorts(tmp_path):
    f = tmp_path / "e.tsv"
    f.write_text("onset\tduration\ttrial_type\tmodulation\n9\t1\trh\t0.5\n2\t0\tn/a\tn/a\n1\t2\tWM:2bk_faces\tn/a\n")
    events = read_design(f, CONDITIONS, 1.0, 10, task="MOTOR")
    assert events == [("WM:2bk_faces", 1.0, 2.0, 1.0), ("MOTOR:rh", 9.0, 1.0, 0.5)]
    with pytest.raises(FmrisynthError, match="unknown trial_type 'rh'"):
        read_design(f, CONDITIONS, 1.0, 10)


def test_evaluate_reads_clips_and_refuses_whole_runs(runs, model, tmp_path):
    clips = sample(model["run"], "MOTOR:rh", 2, tmp_path / "clips", steps=2)
    files, rows, checkpoints = read_clips(tmp_path / "clips")
    assert files == clips and rows[0]["condition"] == "MOTOR:rh" and len(checkpoints) == 1
    with pytest.raises(FmrisynthError, match="is a whole run of a design, not a clip"):
        read_clips(runs)


def test_synthetic_clips_are_a_torch_dataset_made_on_the_fly(model):
    data = SyntheticClips(model["run"], ["WM:2bk_faces", "MOTOR:rh"], n=3, seed=2)
    assert len(data) == 3 and [int(data.table[i][1]) for i in range(3)] == [1, 0, 1]
    clip, label = data[2]
    assert clip.shape == (4, *GRID) and clip.dtype == torch.float32 and int(label) == 1
    assert torch.equal(clip, data[2][0]) and not torch.equal(clip, data[0][0])
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    assert next(iter(loader))[0].shape == (2, 4, *GRID)
    with pytest.raises(FmrisynthError, match="unknown condition 'MOTOR:lf'"):
        SyntheticClips(model["run"], ["MOTOR:lf"], n=1)


def test_simulate_any_design_as_bids_with_truth_same_seed_same_bytes(tmp_path, capsys):
    """The yardstick: the simulator on an events.tsv; nilearn finds its truth map."""
    from nilearn.glm.first_level import first_level_from_bids

    (tmp_path / "d.tsv").write_text("onset\tduration\ttrial_type\n4\t12\tMOTOR:rh\n30\t12\tMOTOR:rh\n56\t12\tMOTOR:rh\n")
    args = ["simulate", "--events", str(tmp_path / "d.tsv"), "--tr", "0.72", "--frames", "110", "--subjects", "1",
            "--runs", "LR", "--task", "tap"]  # fmt: skip
    assert main(args + ["--out", str(tmp_path / "a")]) == 0 and main(args + ["--out", str(tmp_path / "b")]) == 0
    bold = tmp_path / "a" / "sub-sim001" / "func" / "sub-sim001_task-tap_run-1_bold.nii.gz"
    assert bold.read_bytes() == (tmp_path / "b" / bold.relative_to(tmp_path / "a")).read_bytes()
    assert np.isclose(nib.load(bold).header.get_zooms()[3], 0.72) and nib.load(bold).shape[3] == 110
    truth = nib.load(tmp_path / "a" / "sub-sim001" / "truth" / "MOTOR_rh.nii.gz").get_fdata()
    mask = tmp_path / "a" / "sub-sim001" / "truth" / "brain_mask.nii.gz"
    models, imgs, events, _ = first_level_from_bids(tmp_path / "a", "tap", mask_img=str(mask), **README_ARGS)
    z = models[0].fit(imgs[0], events[0]).compute_contrast("MOTOR:rh").get_fdata()
    inside = nib.load(mask).get_fdata() > 0
    assert np.corrcoef(z[inside], truth[inside])[0, 1] > 0.5
    assert main(["simulate", "--events", str(tmp_path / "d.tsv"), "--tr", "0.72", "--frames", "50",
                 "--out", str(tmp_path / "c")]) == 1  # fmt: skip
    assert "ends after the run" in capsys.readouterr().err and not (tmp_path / "c").exists()

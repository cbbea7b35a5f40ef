"""Paths a file records are relative to that file: a run folder can be moved or shared with what it
names, and nothing depends on the working directory (issue 20, item 6)."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import pytest
import numpy as np

from fmrisynth.cli import main
from fmrisynth.data.store import ClipStore
from fmrisynth.evaluate.references import truth_maps
from fmrisynth.generate import codec
from fmrisynth.publish import record_path, resolve_recorded

pytestmark = pytest.mark.slow  # seconds or more per test: `make test` runs it, `make test-fast` does not


def test_recorded_paths_are_relative_to_the_recording_file_and_old_absolute_ones_still_resolve(tmp_path):
    assert record_path(tmp_path / "a" / "vae", tmp_path / "b" / "stage2.json") == "../a/vae"
    assert resolve_recorded("../a/vae", tmp_path / "b" / "stage2.json") == tmp_path / "a" / "vae"
    assert resolve_recorded(str(tmp_path / "abs"), tmp_path / "b" / "stage2.json") == tmp_path / "abs"


def test_truth_is_found_from_any_working_directory_and_after_moving(tmp_path, rng, monkeypatch):
    from test_data_readers import GRID, make_hcp

    project = tmp_path / "project"
    sim = make_hcp(project / "sim", rng)
    monkeypatch.chdir(project)  # relative paths, as a user types them
    assert main(["prepare", "--source", "hcp", "sim", "--out", "store", "--grid", GRID, "--quiet"]) == 0
    assert json.loads(Path("store/store.json").read_text())["summary"]["root"] == "../sim"
    (sim / "simulation.json").write_text(json.dumps({"generator": "fmrisynth simulate"}))
    store = ClipStore("store")
    for subject in set(store.manifest["subject"].astype(str)):
        for condition in store.conditions:
            (sim / subject / "truth").mkdir(parents=True, exist_ok=True)
            ones = nib.Nifti1Image(np.ones(store.grid_shape, np.float32), store.affine)
            nib.save(ones, sim / subject / "truth" / f"{condition.replace(':', '_')}.nii.gz")
    shutil.move(project, tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    maps, source = truth_maps(ClipStore(tmp_path / "moved" / "store"), store.conditions)
    assert maps is not None and np.allclose(maps, 1) and Path(source) == tmp_path / "moved" / "sim"


def test_a_moved_run_folder_finds_its_stores_and_vqgan_from_anywhere(tmp_path, monkeypatch):
    from fmrisynth.generate.sample import load_generator
    from test_diffusion_stage2 import write_stores

    first = tmp_path / "first"
    first.mkdir()
    write_stores(first)  # the latent store names its VQ-GAN and clip store by absolute paths, as older versions did
    monkeypatch.chdir(first)
    sets = ["train.batch_size=4", "train.warmup_steps=1", "train.ckpt_every=1"]
    assert main(["train", "--latents", "latents", "--out", "run", "--steps", "1", "--quiet",
                 *[a for s in sets for a in ("--set", s)]]) == 0  # fmt: skip
    info = json.loads((first / "run" / "stage2.json").read_text())
    assert (info["latents"], info["clip_store"], info["vqgan_checkpoint"]) == ("../latents", "../clips", "../vqgan")
    shutil.move(first, tmp_path / "second")
    monkeypatch.chdir(tmp_path)
    loaded = []
    monkeypatch.setattr(codec, "load_vqgan", lambda checkpoint, mask: loaded.append(checkpoint) or mask.astype(np.float32))
    gen = load_generator(tmp_path / "second" / "run")
    assert loaded == [tmp_path / "second" / "vqgan"] and gen.info["clip_store"] == str(tmp_path / "second" / "clips")


def test_a_latent_store_records_its_vqgan_and_clip_store_relative_to_itself(tmp_path):
    from test_diffusion_stage2 import write_stores

    write_stores(tmp_path)
    header = codec._provenance(tmp_path / "vae" / "checkpoints" / "step_1", ClipStore(tmp_path / "clips"), tmp_path / "vae" / "latents")
    assert header["vqgan_checkpoint"] == "../checkpoints/step_1" and header["clip_store"] == "../../clips"


def test_samples_moved_with_their_run_still_name_it(tmp_path):
    from fmrisynth.generate.bids import DatasetWriter, read_clips

    ckpt = tmp_path / "first" / "run" / "checkpoints" / "step_000001"
    clip = {"condition": "MOTOR:rh", "onset_s": 0.0, "duration_s": 1.0, "tr": 1.0}
    for subject in ("synth01", "synth02"):  # the second run adds to the dataset the first one wrote
        with DatasetWriter(tmp_path / "first" / "samples", [(subject, "MOTORrh")], np.eye(4), np.ones((2, 2, 2), bool), ckpt) as w:
            w.add(subject, "MOTORrh", np.zeros((3, 8), np.float32), 1.0, [], clip)
    shutil.move(tmp_path / "first", tmp_path / "second")
    _, _, checkpoints = read_clips(tmp_path / "second" / "samples")
    assert checkpoints == [str(tmp_path / "second" / "run" / "checkpoints" / "step_000001")]

"""The yardsticks of evaluation v2: reference (never a test subject), codec reconstructions, truth."""

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from test_eval_run import AFFINE, CONDITIONS, GRID, MASK, T, TR, _clip, _good_samples, _patterns

from fmrisynth.config import Config, EvalConfig
from fmrisynth.data.store import ClipStore, StoreWriter
from fmrisynth.errors import FmrisynthError
from fmrisynth.evaluate.run import evaluate
from fmrisynth.run_info import RUN_INFO, write_run_info

pytestmark = pytest.mark.slow  # seconds or more per test: `make test` runs it, `make test-fast` does not


def build_store(path, rng, splits, per_subject=3, meta=None):
    """``splits``: subject -> split; every subject sees every condition ``per_subject`` times (runs 1-2)."""
    with StoreWriter(path, (T, int(MASK.sum())), AFFINE, GRID, CONDITIONS, mask=MASK, meta=meta) as w:
        for subject, split in splits.items():
            for c, pattern in enumerate(_patterns()):
                for k in range(per_subject):
                    w.add(_clip(rng, pattern, float(k % 3)), subject=subject, run=1 + k % 2, pe="LR",
                          condition=CONDITIONS[c], label=c, onset_s=float(k % 3), duration_s=8.0, tr=TR, split=split)
    return ClipStore(path)


TEST_SUBJECTS = {f"s{i}": "test" for i in range(4)}


def test_reference_is_other_subjects_as_many_per_condition_as_generated(tmp_path, rng):
    store = build_store(tmp_path / "store", rng, {**TEST_SUBJECTS, "s4": "train", "s5": "train"})
    samples = _good_samples(tmp_path / "samples", rng, n=4)
    m = evaluate(f"{store.path}:test", samples, tmp_path / "eval", Config())
    ref = m["reference"]
    assert ref["n_per_condition"] == dict.fromkeys(CONDITIONS, 4) and ref["n"] == 12 and ref["split_by"] == "subject"
    assert ref["map_corr_mean"] > 0.8 and ref["top1_map"] == 1.0  # real clips of other people: the same maps
    assert m["realism"]["c2st_reference"] is not None and m["realism"]["fc_corr_reference"] > 0.5
    again = evaluate(f"{store.path}:test", samples, tmp_path / "eval", Config())
    assert again["reference"] == ref  # seeded subsample


def test_no_test_subject_ever_enters_the_reference(tmp_path, rng, monkeypatch):
    import fmrisynth.evaluate.run as run

    store = build_store(tmp_path / "store", rng, {**TEST_SUBJECTS, "s4": "train"})
    # another store whose train split holds the test subjects under the same names, and one newcomer
    other = build_store(tmp_path / "other", rng, {"s1": "train", "s3": "train", "s9": "train"})
    chosen = {}
    original = run.reference_set

    def spy(*args, **kwargs):
        clips, info = original(*args, **kwargs)
        chosen["subjects"] = set(clips.table["subject"])
        return clips, info

    monkeypatch.setattr(run, "reference_set", spy)
    samples = _good_samples(tmp_path / "samples", rng, n=2)
    evaluate(f"{store.path}:test", samples, tmp_path / "e1", Config())
    assert chosen["subjects"] == {"s4"}
    evaluate(f"{store.path}:test", samples, tmp_path / "e2", Config(), reference=f"{other.path}:train")
    assert chosen["subjects"] == {"s9"}
    with pytest.raises(FmrisynthError, match="no clips of subjects outside the test set"):
        evaluate(f"{store.path}:test", samples, tmp_path / "e3", Config(), reference=f"{store.path}:test")
    with pytest.raises(FmrisynthError, match="name the split"):
        evaluate(f"{store.path}:test", samples, tmp_path / "e3", Config(), reference=str(other.path))
    with pytest.raises(FmrisynthError, match="no clip store for the reference"):
        evaluate(f"{store.path}:test", samples, tmp_path / "e3", Config(), reference=f"{tmp_path / 'none'}:train")
    assert not (tmp_path / "e3").exists()


def test_one_subject_takes_other_runs_and_no_train_split_means_no_reference(tmp_path, rng):
    with StoreWriter(tmp_path / "one", (T, int(MASK.sum())), AFFINE, GRID, CONDITIONS, mask=MASK) as w:
        for run in range(1, 5):
            for c, pattern in enumerate(_patterns()):
                w.add(_clip(rng, pattern, 0.0), subject="01", run=run, condition=CONDITIONS[c], label=c, onset_s=0.0,
                      duration_s=8.0, tr=TR, split="train" if run == 1 else "test")
    m = evaluate(f"{tmp_path / 'one'}:test", _good_samples(tmp_path / "s", rng, n=2), tmp_path / "e", Config())
    assert m["reference"]["split_by"] == "run" and m["reference"]["n"] == 3
    no_train = build_store(tmp_path / "no_train", rng, TEST_SUBJECTS)
    m = evaluate(f"{no_train.path}:test", tmp_path / "s", tmp_path / "e", Config())
    assert m["reference"] is None and any("no reference" in n for n in m["notes"])


class HalvingCodec(torch.nn.Module):
    """A stand-in VQ-GAN whose reconstruction is the clip at half amplitude."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.grid_shape = GRID

    def latent(self, x):
        return x

    def quantizer(self, z):
        return (z,)

    def decode(self, q):
        return q * self.scale


def test_codec_reconstructs_the_reference_through_the_generating_runs_vqgan(tmp_path, rng, monkeypatch):
    import fmrisynth.generate.codec as codec

    loaded = []
    monkeypatch.setattr(codec, "load_vqgan", lambda path, mask: loaded.append(path) or HalvingCodec())
    store = build_store(tmp_path / "store", rng, {**TEST_SUBJECTS, "s4": "train", "s5": "train"})
    run = tmp_path / "diffusion"
    (run / "checkpoints" / "step_10").mkdir(parents=True)
    paths = {"vqgan_checkpoint": tmp_path / "vae", "clip_store": store.path, "latents": tmp_path / "latents"}
    write_run_info(run, {**paths, "latent_shape": [1, 1, 1, 1], "conditions": CONDITIONS, "latent_mean": [0.0],
                         "latent_std": [1.0], "blocks": {}})
    samples = _good_samples(tmp_path / "samples", rng, n=4)
    for sidecar in samples.rglob("*_bold.json"):
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "checkpoint": str(run / "checkpoints" / "step_10")}))
    m = evaluate(f"{store.path}:test", samples, tmp_path / "eval", Config())
    assert loaded == [tmp_path / "vae"] and m["codec"]["vqgan_checkpoint"] == str(tmp_path / "vae")
    # halving every voxel leaves t maps and correlations alone and quarters the variance
    assert m["codec"]["map_corr_mean"] == pytest.approx(m["reference"]["map_corr_mean"], abs=1e-4)
    assert m["codec"]["variance_ratio"] == pytest.approx(m["realism"]["variance_ratio_reference"] / 4, rel=1e-3)
    off = evaluate(f"{store.path}:test", samples, tmp_path / "eval", replace(Config(), eval=EvalConfig(codec=False)))
    assert off["codec"] is None and "no codec reference: eval.codec is off" in off["notes"] and len(loaded) == 1
    (run / RUN_INFO).unlink()
    m = evaluate(f"{store.path}:test", samples, tmp_path / "eval", Config())
    assert m["codec"] is None and any("no codec reference" in n for n in m["notes"])


def test_truth_maps_are_found_through_the_store_provenance(tmp_path, rng):
    sim = tmp_path / "sim"
    subjects = {**TEST_SUBJECTS, "s4": "train"}
    affine_3mm = np.diag([3.0, 3.0, 3.0, 1.0])
    affine_3mm[:3, 3] = -1.5  # 2x2x2 blocks of 3 mm voxels share the centre of one 6 mm voxel
    for s in subjects:
        for c, pattern in zip(CONDITIONS, _patterns()):
            vol = np.zeros(GRID, np.float32)
            vol[MASK] = pattern
            fine = vol.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # the simulator's own (finer) grid
            (sim / s / "truth").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(fine, affine_3mm), sim / s / "truth" / f"{c.replace(':', '_')}.nii.gz")
    (sim / "simulation.json").write_text(json.dumps({"generator": "fmrisynth simulate"}))
    store = build_store(tmp_path / "store", rng, subjects, meta={"summary": {"source": "hcp", "root": str(sim)}})
    m = evaluate(f"{store.path}:test", _good_samples(tmp_path / "samples", rng, n=4), tmp_path / "eval", Config())
    truth = m["truth"]
    assert truth["source"] == str(sim) and set(truth) == {"real", "reference", "generated", "source"}
    assert truth["real"]["map_corr_mean"] > 0.9 and truth["generated"]["map_corr_mean"] > 0.7
    noise = _good_samples(tmp_path / "noise", np.random.default_rng(5), n=4)
    for f in noise.rglob("*_bold.nii.gz"):  # pure noise: no map at all
        img = nib.load(f)
        nib.save(nib.Nifti1Image(rng.normal(size=img.shape).astype(np.float32), img.affine), f)
    m = evaluate(f"{store.path}:test", noise, tmp_path / "eval", Config())
    assert abs(m["truth"]["generated"]["map_corr_mean"]) < 0.2 and m["truth"]["real"]["map_corr_mean"] > 0.9

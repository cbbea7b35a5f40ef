"""Stage 2 end to end on a tiny latent store: train (through the CLI), sample, and the BIDS output.

The VQ-GAN is replaced by a stand-in decoder (nearest upsampling of the latent channel mean), so
these tests check stage 2's own work: timing, determinism, file format and errors.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fmrisynth.generate import codec
from fmrisynth.cli import main
from fmrisynth.data.store import StoreWriter
from fmrisynth.errors import FmrisynthError
from fmrisynth.generate.sample import load_denoiser, sample
from fmrisynth.models.background import BACKGROUND, CODEC_RESIDUAL, PRIOR, GaussianBackground
from fmrisynth.models.response import Event, ResponseModel
from fmrisynth.models.response_fit import K
from fmrisynth.tasks import HRF_BASIS, design_regressors
from fmrisynth.models.diffusion import design_boxcar
from fmrisynth.training.diffusion import train_diffusion

pytestmark = pytest.mark.slow  # seconds or more per test: `make test` runs it, `make test-fast` does not

CONDITIONS = ["MOTOR:rh", "WM:2bk_faces"]
T, C, GRID, TR = 4, 2, (8, 8, 8), 0.72
AFFINE = np.diag([6.0, 6.0, 6.0, 1.0])


def write_stores(root):
    """A clip store (for the grid, affine and mask) and a latent store of 12 clips, 2 conditions."""
    mask = np.zeros(GRID, bool)
    mask[1:7, 1:7, 1:7] = True
    rows = [dict(label=k % 2, condition=CONDITIONS[k % 2], onset_s=0.72 * (k % 3), duration_s=1.5, tr=TR,
                 split="train" if k < 10 else "test") for k in range(12)]  # fmt: skip
    with StoreWriter(root / "clips", (T, int(mask.sum())), AFFINE, GRID, CONDITIONS, mask=mask) as w:
        for row in rows:
            w.add(np.zeros((T, int(mask.sum()))), **row)
    meta = {"vqgan_checkpoint": str(root / "vqgan"), "clip_store": str(root / "clips"), "response": "hrf",
            "latent_mean": [0.5, -0.5], "latent_std": [2.0, 1.0]}  # fmt: skip
    rng = np.random.default_rng(0)
    with StoreWriter(root / "latents", (T, C, 2, 2, 2), AFFINE, GRID, CONDITIONS, kind="latents", meta=meta) as w:
        for row in rows:
            w.add(rng.normal(size=(T, C, 2, 2, 2)) + row["label"], **row)
        n_vox = int(mask.sum())
        RESPONSE_MAPS[:] = rng.normal(size=(2, K, n_vox)) * np.array([20.0, 0.0, 0.0])[:, None]  # canonical HRF only
        ResponseModel(CONDITIONS, RESPONSE_MAPS.astype(np.float32), np.zeros((0, 2, K, n_vox), np.float32), {},
                      np.ones(n_vox, np.float32)).save(w.tmp / "response.npz")  # fmt: skip
        subjects = [f"s{k % 3}" for k in range(12)]
        for name, e, sd in ((BACKGROUND, n_vox, 0.1), (CODEC_RESIDUAL, n_vox, 0.1), (PRIOR, C * 8, 1.0)):
            GaussianBackground.fit(sd * rng.normal(size=(12, T, e)), subjects, components=3).save(w.tmp / name)
    return mask


RESPONSE_MAPS = np.zeros((2, K, 6 * 6 * 6))


STAGE2_SETS = ["train.batch_size=4", "train.log_every=1", "train.ckpt_every=2", "train.warmup_steps=1", "train.lr=1e-3",
               "diffusion.sample_steps=4", "diffusion.guidance=1.5"]  # fmt: skip


def train_tiny(root: Path) -> None:
    """``write_stores`` under ``root`` and 3 steps of the tiny preset on them (root/run), through the CLI."""
    write_stores(root)
    args = ["train", "--latents", str(root / "latents"), "--out", str(root / "run"), "--preset", "tiny", "--steps", "3", "--quiet"]
    assert main(args + [a for s in STAGE2_SETS for a in ("--set", s)]) == 0


@pytest.fixture
def run(stage2_run):
    """The session's tiny run (conftest.stage2_run, shared with test_virtual): read it, never write into it."""
    return stage2_run


def stand_in_vqgan(mp: pytest.MonkeyPatch) -> None:
    """Replace the VQ-GAN: the "model" is the mask, decoding upsamples the latent channel mean 4x."""

    def decode(model, z):  # (B, T, c, d, h, w) -> (B, T, D, H, W), zero outside the mask
        up = z.mean(2).repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)
        return up * torch.from_numpy(model)

    mp.setattr(codec, "load_vqgan", lambda checkpoint, mask: mask.astype(np.float32))
    mp.setattr(codec, "decode", decode)


@pytest.fixture(autouse=True)
def fake_vqgan(monkeypatch):
    stand_in_vqgan(monkeypatch)


def test_design_is_the_fraction_of_each_frame_inside_the_block():
    design = design_boxcar(torch.tensor([1.0, 0.5]), torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0]), frames=5)
    assert torch.allclose(design, torch.tensor([[0, 1, 1, 0, 0], [0.5, 0.5, 0, 0, 0]], dtype=torch.float32))


def test_training_writes_the_log_checkpoints_and_run_info(run):
    log = [json.loads(line) for line in (run / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    info = json.loads((run / "run" / "stage2.json").read_text())
    assert info["conditions"] == CONDITIONS and info["latent_shape"] == [T, C, 2, 2, 2]
    assert len(info["blocks"]["MOTOR:rh"]) == 5  # the train-split clips of that condition
    assert len(info["contexts"]["MOTOR:rh"]) == 5  # and the events each one's response shows
    assert len(info["x0_error"]) == 1000 and all(0 < e < 10 for e in info["x0_error"])  # measured after training
    den = load_denoiser(run / "run")
    assert den.checkpoint.name == "step_000003" and not den.model.training


def test_sample_writes_a_bids_dataset_one_run_per_clip_for_evaluation(run, capsys):
    out = run / "samples"
    args = ["sample", "--checkpoint", str(run / "run"), "--condition", "WM:2bk_faces", "--n", "3", "--seed", "4",
            "--onset", "0.5", "--duration", "1.0", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    stem = out / "sub-synth01" / "func" / "sub-synth01_task-WM2bkfaces_run-1"
    assert sorted(p.name for p in out.iterdir()) == [".bidsignore", "config.yaml", "dataset_description.json", "sub-synth01",
                                                     "sub-synth02", "sub-synth03"]  # fmt: skip
    assert sorted(p.name for p in stem.parent.iterdir()) == [f"{stem.name}_{s}" for s in
                                                            ("bold.json", "bold.nii.gz", "desc-brain_mask.nii.gz", "events.tsv")]  # fmt: skip
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "fmrisynth"
    img = nib.load(f"{stem}_bold.nii.gz")
    assert img.shape == (*GRID, T) and img.get_data_dtype() == np.float32
    assert np.allclose(img.affine, AFFINE) and np.isclose(img.header.get_zooms()[3], TR)
    assert np.isfinite(img.get_fdata()).all() and img.get_fdata()[0].max() == 0  # outside the brain mask
    sidecar = json.loads(Path(f"{stem}_bold.json").read_text())
    assert {"condition", "onset_s", "duration_s", "tr", "seed", "guidance", "sampler", "steps", "checkpoint",
            "RepetitionTime", "TaskName"} <= set(sidecar)  # fmt: skip
    assert sidecar["onset_s"] == 0.5 and sidecar["duration_s"] == 1.0 and sidecar["guidance"] == 1.5
    assert sidecar["steps"] == 4 and sidecar["sampler"] == "ddim" and sidecar["RepetitionTime"] == TR
    events = Path(f"{stem}_events.tsv").read_text().splitlines()
    assert events == ["onset\tduration\ttrial_type", "0.500\t1.000\tWM:2bk_faces"]
    assert main(args) == 1 and "already holds" in capsys.readouterr().err  # never overwritten


def test_generated_clips_carry_the_response_models_maps(run, tmp_path):
    """Residual + codec noise + the task response of the design: a GLM of the clips finds the maps."""
    paths = sample(run / "run", "WM:2bk_faces", 3, tmp_path / "s", onset_s=0.0, duration_s=2.0, steps=2)
    mask = nib.load(paths[0]).get_fdata()[..., 0] != 0
    x = design_regressors([0.0], [2.0], T, TR, HRF_BASIS)  # (T, K)
    x = np.hstack([x, np.ones((T, 1))])
    for p in paths:
        y = nib.load(p).get_fdata()[mask].T  # (T, V)
        beta = np.linalg.lstsq(x, y, rcond=None)[0]  # (K + 1, V)
        assert np.corrcoef(beta[0], RESPONSE_MAPS[1, 0])[0, 1] > 0.9


def test_samples_are_deterministic_by_seed_and_survive_the_checkpoint_round_trip(run, tmp_path):
    def clips(checkpoint, seed, out):
        paths = sample(checkpoint, "MOTOR:rh", 2, tmp_path / out, seed=seed, sampler="ddpm", steps=3)
        return np.stack([nib.load(p).get_fdata() for p in paths])

    checkpoint = sorted((run / "run" / "checkpoints").glob("step_*"))[-1]
    a, b, c = clips(run / "run", 0, "a"), clips(checkpoint, 0, "b"), clips(run / "run", 1, "c")
    assert np.array_equal(a, b) and not np.allclose(a, c)
    onsets = [json.loads(p.read_text())["onset_s"] for p in sorted((tmp_path / "a").rglob("*_bold.json"))]
    assert set(onsets) <= {0.0, 0.72, 1.44}  # default timings are drawn from the training blocks


def test_user_errors_are_clear_and_write_nothing(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(run / "run"), "--condition", "MOTOR:lf", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown condition 'MOTOR:lf'" in err and "MOTOR:rh" in err
    with pytest.raises(FmrisynthError, match="must start inside the clip"):
        sample(run / "run", "MOTOR:rh", 1, out, onset_s=T * TR)
    with pytest.raises(FmrisynthError, match="no checkpoint found"):
        sample(tmp_path / "nowhere", "MOTOR:rh", 1, out)

    def wrong_decoder(model, z):
        raise RuntimeError("expected input with 8 channels, got 2\nmore detail")

    monkeypatch.setattr(codec, "decode", wrong_decoder)
    with pytest.raises(FmrisynthError, match="VQ-GAN cannot decode"):
        sample(run / "run", "MOTOR:rh", 1, out)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(FmrisynthError, match="not a latent store"):
        train_diffusion(load_denoiser(run / "run").config, run / "clips", tmp_path / "run2")
    with pytest.raises(FmrisynthError, match="already has checkpoints"):
        train_diffusion(load_denoiser(run / "run").config, run / "latents", run / "run")


def _volumes(paths):
    return np.stack([nib.load(p).get_fdata() for p in paths])  # (n, D, H, W, T)


def test_each_clip_has_its_own_seed_whatever_n_the_batch_or_the_condition(run, tmp_path):
    """Clip k comes from (seed, condition, k): no two seeds or conditions share a clip, n and the batch do not matter."""
    nine = _volumes(sample(run / "run", "MOTOR:rh", 9, tmp_path / "nine", seed=0, steps=2))
    one = _volumes(sample(run / "run", "MOTOR:rh", 1, tmp_path / "one", seed=8, steps=2))
    assert not np.allclose(nine[8], one[0]) and not np.allclose(nine[0], one[0])  # seed + k is not another clip
    three = _volumes(sample(run / "run", "MOTOR:rh", 3, tmp_path / "three", seed=0, steps=2, batch_size=1))
    np.testing.assert_allclose(three, nine[:3], atol=1e-4)  # the first three, made one at a time
    other = _volumes(sample(run / "run", "WM:2bk_faces", 1, tmp_path / "wm", seed=0, steps=2))
    a, b = nine[0].ravel(), other[0].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.5  # two conditions, one seed: their own backgrounds


def test_gaussian_generator_samples_clips_without_a_network(run, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the Gaussian generator must not load the denoiser")

    import fmrisynth.generate.sample as gen_sample

    monkeypatch.setattr(gen_sample, "load_denoiser", no_network)
    paths = sample(run / "run", "WM:2bk_faces", 3, tmp_path / "g", onset_s=0.0, duration_s=2.0, kind="gaussian")
    sidecar = json.loads(Path(str(paths[0]).replace("_bold.nii.gz", "_bold.json")).read_text())
    assert sidecar["generator"] == "gaussian"
    mask = nib.load(paths[0]).get_fdata()[..., 0] != 0
    x = np.hstack([design_regressors([0.0], [2.0], T, TR, HRF_BASIS), np.ones((T, 1))])  # (T, K + 1)
    for p in paths:  # the background is the fitted Gaussian, the task the response model's maps
        beta = np.linalg.lstsq(x, nib.load(p).get_fdata()[mask].T, rcond=None)[0]
        assert np.corrcoef(beta[0], RESPONSE_MAPS[1, 0])[0, 1] > 0.9
    with pytest.raises(FmrisynthError, match="unknown generator"):
        sample(run / "run", "WM:2bk_faces", 1, tmp_path / "x", kind="gan")


def test_trial_gains_vary_each_events_amplitude_only_when_asked(run):
    import dataclasses

    from fmrisynth.generate.sample import load_generator

    gen = load_generator(run / "run", kind="gaussian")
    gen.extras.response.trial_sd = np.full(len(CONDITIONS), 0.5, np.float32)
    args = (np.array([1]), np.zeros((1, T), np.float32), [[Event("WM:2bk_faces", 0.0, 2.0)]], np.array([TR]), [7], 1, "ddim", 1.0)
    off = gen.clips(*args)
    on_cfg = dataclasses.replace(gen.config, stage2=dataclasses.replace(gen.config.stage2, trial_gains=True))
    on = dataclasses.replace(gen, config=on_cfg).clips(*args)
    response = gen.extras.response.predict([Event("WM:2bk_faces", 0.0, 2.0)], TR, T)  # (T, V) population response
    np.testing.assert_array_equal(off, gen.clips(*args))  # deterministic by seed
    assert not np.allclose(on, off)
    gain = np.linalg.lstsq(response.reshape(-1, 1), (on - off).reshape(-1), rcond=None)[0][0]
    assert abs(gain) > 0.01  # the difference is the response scaled: the event's drawn gain

"""Exact resume for both training verbs, damaged checkpoints, refused resumes, guards.

"Killed at step 25, resumed from the step-20 checkpoint" is played by an objective that raises at
step 25 (train_log.jsonl then holds rows 21-25 past the checkpoint, as after a real kill). The toy
``Denoise`` objective draws its noise the way a diffusion objective does, through the run's
generator (``self.randint / randn / rand``), plus dropout from torch's global RNG.
"""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fmrisynth.checkpoint import load_checkpoint
from fmrisynth.cli import main
from fmrisynth.config import Config, TrainConfig, VQGANConfig
from fmrisynth.data.store import StoreWriter
from fmrisynth.errors import FmrisynthError
from fmrisynth.publish import HOST
from fmrisynth.training.loop import Objective, fit
from fmrisynth.training.vqgan import VQGANObjective, train_vae

pytestmark = pytest.mark.slow  # seconds or more per test: `make test` runs it, `make test-fast` does not


class Clips(torch.utils.data.Dataset):
    """36 fake latent clips (2, 4) with a label: 4 full batches of 8 per epoch, so epochs turn often."""

    def __init__(self, n=36):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 2, 4, generator=g)
        self.label = torch.arange(n) % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": self.label[i]}


class Denoise(Objective):
    """A diffusion-like objective: random timestep, Gaussian noise, label dropped 10 % of the time."""

    config_sections = ("model",)

    def __init__(self, width=16, dropout=0.0, stop_at=None):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8 + 1 + 3, width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, 8))
        self.stop_at = stop_at

    def forward(self, batch, step, part):
        if step == self.stop_at:
            raise KeyboardInterrupt  # "killed"
        x = batch["x"].flatten(1)  # (B, 8)
        b = x.shape[0]
        t = self.randint(100, b).float() / 100  # (B,)
        noise = self.randn(b, 8)  # (B, 8)
        keep = (self.rand(b) >= 0.1).float()  # (B,)
        cond = nn.functional.one_hot(batch["label"], 3).float() * keep[:, None]  # (B, 3)
        xt = (1 - t[:, None]).sqrt() * x + t[:, None].sqrt() * noise
        loss = ((self.model(torch.cat([xt, t[:, None], cond], 1)) - noise) ** 2).mean()
        return loss, {"mse": loss.item()}


def cfg(**kw):
    base = dict(steps=40, batch_size=8, lr=3e-3, warmup_steps=5, ema_decay=0.9, log_every=1, ckpt_every=10, keep_ckpts=10)
    return TrainConfig(**{**base, **kw})


def rows(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def curve(out, key="loss"):
    return [(r["step"], r[key]) for r in rows(out)]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def train_toy(out, stop_at=None, resume=False, seed=3, **kw):
    torch.manual_seed(1)
    obj = Denoise(dropout=0.2, stop_at=stop_at)
    try:
        fit(obj, Clips(), cfg(**kw), out, seed=seed, resume=resume, config=Config(), progress=False)
    except KeyboardInterrupt:
        pass
    return obj


@pytest.fixture(scope="module")
def toy_full(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "full"
    train_toy(out)
    return out


def test_train_resumes_bit_for_bit_after_a_kill(toy_full, tmp_path):
    out = tmp_path / "killed"
    train_toy(out, stop_at=25)
    assert [r["step"] for r in rows(out)] == list(range(1, 26)) and load_checkpoint(out).step == 20
    train_toy(out, resume=True)
    assert [r["step"] for r in rows(out)] == list(range(1, 41))  # one row per step: rows 21-25 replaced
    a, b = load_checkpoint(toy_full), load_checkpoint(out)
    dloss = max(abs(x[1] - y[1]) for x, y in zip(curve(toy_full), curve(out)))
    dweight, dema = max_diff(a.weights, b.weights), max_diff(a.ema, b.ema)
    print(f"train resume: max |dloss| {dloss:.3g}, max |dweight| {dweight:.3g}, max |dema| {dema:.3g}")
    assert curve(out) == curve(toy_full) and curve(out, "mse") == curve(toy_full, "mse")
    assert dweight == 0 and dema == 0


@pytest.mark.parametrize("damage", ["truncate weights", "truncate ema", "truncate state", "empty state",
                                    "missing state", "flip a bit in weights"])  # fmt: skip
def test_damaged_newest_checkpoint_falls_back_to_an_intact_one(toy_full, tmp_path, damage):
    out = tmp_path / "run"
    train_toy(out, steps=30)
    newest = out / "checkpoints" / "step_000030"
    name = {"weights": "weights.safetensors", "ema": "ema.safetensors"}.get(damage.split()[-1], "state.pt")
    path = newest / name
    data = path.read_bytes()
    if damage.startswith("truncate"):
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty state":
        path.write_bytes(b"")
    elif damage == "missing state":
        path.unlink()
    else:
        flipped = bytearray(data)
        flipped[-3] ^= 0x40  # inside the last tensor: the header stays valid
        path.write_bytes(bytes(flipped))
    with pytest.warns(UserWarning, match="step_000030.*resuming from an older checkpoint"):
        train_toy(out, resume=True)
    assert curve(out) == curve(toy_full)  # resumed from step 20, exactly
    assert max_diff(load_checkpoint(out).weights, load_checkpoint(toy_full).weights) == 0


def test_changed_weights_are_refused_on_load(tmp_path):
    out = tmp_path / "run"
    train_toy(out, steps=10)
    ema = out / "checkpoints" / "step_000010" / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-3] ^= 0x40
    ema.write_bytes(bytes(data))
    with pytest.raises(FmrisynthError, match=r"ema\.safetensors: file is damaged or was changed") as e:
        load_checkpoint(out)
    assert "\n" not in str(e.value)
    for f in (out / "checkpoints" / "step_000010").iterdir():
        f.write_bytes(b"")
    with pytest.raises(FmrisynthError, match="every checkpoint is damaged"), pytest.warns(UserWarning, match="damaged"):
        train_toy(out, resume=True, steps=20)


def test_resume_refuses_another_batch_size_seed_or_model(tmp_path):
    out = tmp_path / "run"
    train_toy(out, steps=10)
    before = rows(out)
    with pytest.raises(FmrisynthError, match=r"batch_size 4 x grad_accum 1 x 1 ranks.*trained with 8 x 1 x 1"):
        train_toy(out, resume=True, batch_size=4)
    with pytest.raises(FmrisynthError, match="seed 4, but the checkpoint was trained with seed 3"):
        train_toy(out, resume=True, seed=4)
    with pytest.raises(FmrisynthError, match="model.preset=s3m, but the checkpoint was trained with model.preset=tiny"):
        fit(Denoise(), Clips(), cfg(), out, seed=3, resume=True, config=Config(model=Config().model.__class__(preset="s3m")),
            progress=False)
    with pytest.raises(FmrisynthError, match=r"does not match this model \(model\.0\.bias: \(16,\) in the checkpoint"):
        fit(Denoise(width=32), Clips(), cfg(), out, seed=3, resume=True, progress=False)
    assert rows(out) == before  # nothing touched


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_toy(out, steps=10)
    root = out / "checkpoints"
    host = socket.gethostname()
    dead, legacy, alive = (root / f".tmp_step_000011-{host}-{2**22 + 12345}", root / ".tmp_step_000012",
                           root / f".tmp_step_000013-{host}-{os.getpid()}")  # fmt: skip  (older versions' names)
    now_dead, now_alive = (root / f".step_000014.tmp-{HOST}-{2**22 + 12345}",
                           root / f".step_000015.tmp-{HOST}-{os.getpid()}")  # fmt: skip
    for d in (dead, legacy, alive, now_dead, now_alive):
        d.mkdir()
    staged_in, save = [], torch.save  # where checkpoints are staged: publish's temp_path
    monkeypatch.setattr(torch, "save", 
                        lambda obj, f, *a, **k: staged_in.append(Path(f).parent.name) or save(obj, f, *a, **k))
    with pytest.warns(UserWarning, match="removed the temporary output of process"):
        train_toy(out, resume=True, steps=20)
    assert not dead.exists() and not legacy.exists() and alive.exists()
    assert not now_dead.exists() and now_alive.exists()  # the scheme of fmrisynth.publish
    assert f".step_000020.tmp-{HOST}-{os.getpid()}" in staged_in


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", 0, "train.batch_size: must be an integer >= 1, got 0"),
    ("steps", 1.5, "train.steps: must be an integer >= 1, got 1.5"),
    ("lr", float("nan"), "train.lr: must be a finite number > 0, got nan"),
    ("lr", float("inf"), "train.lr: must be a finite number > 0, got inf"),
    ("ema_decay", 1.0, r"train.ema_decay: must be in \[0, 1\)"),
    ("amp", "fp8", "train.amp: must be auto, bf16 or off"),
])  # fmt: skip
def test_bad_train_settings_are_refused_before_anything_is_written(tmp_path, key, value, message):
    """fit checks the config's training rules again (config.validate_train), for a TrainConfig made in
    Python, which never passed load_config: the cases load_config cannot meet (a float step count, an
    infinite rate); and a run directory that is a file."""
    with pytest.raises(FmrisynthError, match=message):
        fit(Denoise(), Clips(), cfg(**{key: value}), tmp_path / "run", seed=0, progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(FmrisynthError, match="--out is a file"):
        fit(Denoise(), Clips(), cfg(steps=1), tmp_path / "file", seed=0, progress=False)


# --- train-vae --------------------------------------------------------------------------------------

GRID, T = (12, 12, 12), 2  # the smallest grid the 2-layer patch discriminator takes


def make_store(path, nan_clip=None):
    """12 clips of 2 smooth 12x12x12 frames (8 train, 4 test); ``nan_clip`` gets one NaN voxel."""
    rng = np.random.default_rng(0)
    mask = np.zeros(GRID, bool)
    mask[1:11, 1:11, 1:11] = True
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in GRID], indexing="ij"), -1)[mask]  # (V, 3)
    bumps = np.exp(-((grid[None] - np.array([[4, 4, 4], [7, 6, 5]])[:, None]) ** 2).sum(-1) / 8.0)  # (2, V)
    with StoreWriter(path, (T, int(mask.sum())), np.eye(4), GRID, ["A:a", "B:b"], mask=mask, meta={"grid": "test"}) as w:
        for i in range(12):
            clip = (rng.normal(size=(T, 2)) @ bumps + 0.05 * rng.normal(size=(T, len(grid)))).astype(np.float32)
            if i == nan_clip:
                clip[1, 7] = np.nan
            w.add(clip, subject=f"s{i % 4}", condition="AB"[i % 2] + ":" + "ab"[i % 2], label=i % 2,
                  onset_s=0.0, duration_s=1.0, tr=1.0, split="train" if i < 8 else "test")  # fmt: skip
    return path


def vae_config(steps=40, batch_size=8, disc_start=10, **train):
    train = TrainConfig(**{**dict(steps=steps, batch_size=batch_size, lr=2e-3, warmup_steps=5, log_every=1, ckpt_every=10,
                                  keep_ckpts=10, ema_decay=0.0), **train})  # fmt: skip
    return Config(vae=VQGANConfig(codebook_size=16, disc_start=disc_start), vae_train=train)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("vq") / "clips")


def test_train_vae_resumes_bit_for_bit_after_a_kill(store, tmp_path, monkeypatch):
    full, killed = tmp_path / "full", tmp_path / "killed"
    train_vae(vae_config(), store, full, progress=False)
    forward = VQGANObjective.forward

    def dies_at_25(self, batch, step, part):
        if step == 25:
            raise KeyboardInterrupt
        return forward(self, batch, step, part)

    monkeypatch.setattr(VQGANObjective, "forward", dies_at_25)
    with pytest.raises(KeyboardInterrupt):
        train_vae(vae_config(), store, killed, progress=False)
    monkeypatch.setattr(VQGANObjective, "forward", forward)
    train_vae(vae_config(), store, killed, resume=True, progress=False)
    assert [r["step"] for r in rows(killed)] == list(range(1, 41)) and "d_loss" in rows(killed)[-1]
    dloss = max(abs(x[1] - y[1]) for x, y in zip(curve(full), curve(killed)))
    dweight = max_diff(load_checkpoint(full).weights, load_checkpoint(killed).weights)
    print(f"train-vae resume: max |dloss| {dloss:.3g}, max |dweight| {dweight:.3g}")
    assert curve(killed) == curve(full) and dweight == 0
    with pytest.raises(FmrisynthError, match="vae.codebook_size=32, but the checkpoint was trained with vae.codebook_size=16"):
        bigger = vae_config(steps=50)
        bigger.vae.codebook_size = 32
        train_vae(bigger, store, killed, resume=True, progress=False)


def test_a_nan_clip_is_refused_in_one_line(tmp_path, capsys):
    bad = make_store(tmp_path / "nan", nan_clip=5)
    with pytest.raises(FmrisynthError, match=r"nan: clip 5 \(subject s1, B:b\) has non-finite values"):
        train_vae(vae_config(steps=2), bad, tmp_path / "run", progress=False)
    rc = main(["train-vae", "--store", str(bad), "--out", str(tmp_path / "run"), "--steps", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "clip 5" in err
    assert not (tmp_path / "run").exists()


def test_a_non_finite_latent_is_refused_where_it_is_read(tmp_path):
    from fmrisynth.data.dataset import ClipDataset

    with StoreWriter(tmp_path / "lat", (2, 4, 1, 1, 1), np.eye(4), (4, 4, 4), ["a"], kind="latents") as w:
        for i in range(3):
            z = np.full((2, 4, 1, 1, 1), np.inf if i == 1 else 0.5, np.float32)  # (T, c, d, h, w)
            w.add(z, subject="s", condition="a", label=0, onset_s=0.0, duration_s=1.0, tr=1.0, split="train")
    data = ClipDataset(tmp_path / "lat", split="train")
    assert torch.equal(data[0]["x"], torch.full((2, 4, 1, 1, 1), 0.5))
    for read in (lambda: data[1], data.check_finite):
        with pytest.raises(FmrisynthError, match=r"lat: clip 1 \(subject s, a\) has non-finite values"):
            read()

"""The shared training loop on a toy objective: learning, EMA, checkpoints, resume, budget, and the
helpers the stages share (noise slices, autocast, device). Resume in depth: test_resume.py; torchrun:
test_torchrun.py."""

import json

import pytest
import torch
from torch import nn

from fmrisynth.checkpoint import latest_checkpoint, load_checkpoint
from fmrisynth.config import Config, TrainConfig
from fmrisynth.distributed import autocast, default_device, main_only
from fmrisynth.errors import FmrisynthError
from fmrisynth.training import loop
from fmrisynth.training.loop import Objective, fit


class Points(torch.utils.data.Dataset):
    """y = 3x - 1 with a little noise."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, generator=g)
        self.y = 3 * self.x - 1 + 0.01 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class Regression(Objective):
    def __init__(self):
        super().__init__()
        self.model = nn.Linear(1, 1)

    def forward(self, batch, step, part):
        loss = ((self.model(batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {"mse": loss.item()}


def _cfg(**kw):
    base = dict(steps=60, batch_size=8, lr=0.1, warmup_steps=5, ema_decay=0.9, log_every=5, ckpt_every=20, keep_ckpts=5)
    return TrainConfig(**{**base, **kw})


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_fit_learns_logs_and_checkpoints(tmp_path):
    obj = Regression()
    ckpt = fit(obj, Points(), _cfg(), tmp_path, seed=0, config=Config(), progress=False)
    rows = _log(tmp_path)
    assert rows[-1]["step"] == 60 and rows[-1]["loss"] < 0.1 * rows[0]["loss"]
    assert {"step", "loss", "lr", "clips_per_s", "mse"} <= set(rows[0])
    assert ckpt.name == "step_000060" and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000020", "step_000040", "step_000060"]
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 60 and loaded.config == Config()
    assert torch.equal(loaded.module_state("model", ema=False)["weight"], obj.model.weight.detach())
    assert not torch.equal(loaded.module_state("model", ema=True)["weight"], obj.model.weight.detach())  # EMA lags
    assert (tmp_path / "config.yaml").is_file()


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    torch.manual_seed(1)
    full = Regression()
    fit(full, Points(), _cfg(), tmp_path / "full", seed=3, progress=False)
    torch.manual_seed(1)
    part = Regression()
    fit(part, Points(), _cfg(steps=40), tmp_path / "part", seed=3, progress=False)  # "interrupted" at 40
    resumed = Regression()
    fit(resumed, Points(), _cfg(), tmp_path / "part", seed=3, resume=True, progress=False)
    assert torch.allclose(resumed.model.weight, full.model.weight) and torch.allclose(resumed.model.bias, full.model.bias)
    a = load_checkpoint(tmp_path / "full").module_state("model")
    b = load_checkpoint(tmp_path / "part").module_state("model")
    assert torch.allclose(a["weight"], b["weight"])  # the EMA too


def test_same_seed_same_curve(tmp_path):
    for name in ("a", "b"):
        torch.manual_seed(5)
        fit(Regression(), Points(), _cfg(steps=20), tmp_path / name, seed=7, progress=False)
    strip = lambda rows: [(r["step"], r["loss"]) for r in rows]  # noqa: E731
    assert strip(_log(tmp_path / "a")) == strip(_log(tmp_path / "b"))


def test_refuses_to_overwrite_and_reports_bad_checkpoints(tmp_path):
    fit(Regression(), Points(), _cfg(steps=20), tmp_path, seed=0, progress=False)
    with pytest.raises(FmrisynthError, match="--resume"):
        fit(Regression(), Points(), _cfg(steps=20), tmp_path, seed=0, progress=False)
    (latest_checkpoint(tmp_path) / "weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FmrisynthError, match="damaged"):
        load_checkpoint(tmp_path)
    with pytest.raises(FmrisynthError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


def test_time_budget_stops_cleanly_with_a_checkpoint(tmp_path):
    fit(Regression(), Points(), _cfg(steps=10_000, ckpt_every=10_000, max_minutes=1e-9), tmp_path, seed=0, progress=False)
    assert load_checkpoint(tmp_path).step == 1


def test_each_rank_draws_its_slice_of_the_global_batch_noise(monkeypatch):
    obj = Objective()
    draws = lambda: (obj.randn(4, 3), obj.rand(4), obj.randint(10, 4, 2))  # noqa: E731
    obj.generator.manual_seed(5)
    monkeypatch.setattr(loop, "rank_and_world", lambda: (0, 1))
    n, u, k = obj.randn(8, 3), obj.rand(8), obj.randint(10, 8, 2)  # one process, global batch 8
    for rank in (0, 1):
        obj.generator.manual_seed(5)
        monkeypatch.setattr(loop, "rank_and_world", lambda: (rank, 2))
        for mine, full in zip(draws(), (n, u, k)):
            assert torch.equal(mine, full[4 * rank : 4 * rank + 4])
    assert k.dtype == torch.int64 and 0 <= k.min() and k.max() < 10


def test_one_rule_for_device_and_autocast():
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    for amp, on in (("auto", False), ("off", False), ("bf16", True)):
        with autocast("cpu", amp):
            assert torch.is_autocast_enabled("cpu") == on
    with pytest.raises(FmrisynthError, match="amp must be"):
        autocast("cpu", "fp16")
    assert main_only(lambda x: x + 1, 1) == 2  # a single process is rank 0

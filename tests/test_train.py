"""The shared training loop on a toy objective: learning, EMA, checkpoints, exact resume, budget, DDP."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from fmrisynth.config import Config, TrainConfig
from fmrisynth.errors import FmrisynthError
from fmrisynth.training.loop import Objective, fit, latest_checkpoint, load_checkpoint


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
    fit(Regression(), Points(), _cfg(steps=10_000, ckpt_every=10_000, max_minutes=0.0), tmp_path, seed=0, progress=False)
    assert load_checkpoint(tmp_path).step == 1


def test_two_process_ddp_on_cpu(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch
        from test_train import Points, Regression, _cfg
        from fmrisynth.training.loop import fit
        torch.manual_seed(0)
        fit(Regression(), Points(), _cfg(steps=30), {str(tmp_path / "run")!r}, seed=0, progress=False)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", str(script)],
                   check=True, env=env, capture_output=True, timeout=120)
    rows = _log(tmp_path / "run")
    assert rows[-1]["step"] == 30 and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["clips_per_s"] > 0 and load_checkpoint(tmp_path / "run").step == 30

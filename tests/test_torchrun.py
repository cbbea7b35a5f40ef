"""torchrun on CPU (gloo): 2 processes x batch 4 train like 1 process x batch 8, and only rank 0 writes.

One torchrun launch (two processes, about 20 s on two shared cores) runs both training verbs: the CLI's
``train-vae`` (which also encodes the latent store, on rank 0 only) and the diffusion-like ``Denoise``
objective of test_resume.py, then a refused second ``train-vae`` into the same directory (every rank
must get the refusal, none may hang). The single-process runs at batch 8 are made in this process.

The VQ-GAN is compared over its first 10 steps, before ``disc_start``. Its curves agree to ~5e-7
there; from about step 11 a latent whose two nearest codes are within float rounding of each other
(all-reduced sums differ from one process's in the last bit) changes code and the curves part by
1e-5 to 1e-4: the argmin, not the loop. Once the adversarial loss is on, the patch discriminator's
BatchNorm and the adaptive weight see the local batch, not the global one (curves differ by ~1e-2).
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fmrisynth.cli import main
from fmrisynth.config import Config
from fmrisynth.data.store import ClipStore
from fmrisynth.checkpoint import load_checkpoint
from fmrisynth.training.loop import fit

sys.path.insert(0, os.path.dirname(__file__))
from test_resume import Clips, Denoise, cfg, make_store, max_diff, rows  # noqa: E402

pytestmark = pytest.mark.slow
TOL = 1e-5


def vae_args(store, out, batch):
    sets = [f"vae_train.batch_size={batch}", "vae_train.lr=2e-3", "vae_train.warmup_steps=3", "vae_train.log_every=1",
            "vae_train.ckpt_every=5", "vae.codebook_size=16", "vae.disc_start=100"]  # fmt: skip
    return ["train-vae", "--store", str(store), "--out", str(out), "--steps", "10", "--quiet",
            *[a for s in sets for a in ("--set", s)]]  # fmt: skip


def toy_cfg(batch):
    return cfg(steps=20, batch_size=batch, grad_accum=2, ckpt_every=10)


SCRIPT = """
import sys; sys.path.insert(0, {tests!r})
import torch
from test_torchrun import toy_cfg, vae_args
from test_resume import Clips, Denoise
from fmrisynth.cli import main
from fmrisynth.config import Config
from fmrisynth.distributed import rank_and_world
from fmrisynth.training.loop import fit

rc = main(vae_args({store!r}, {out!r} + "/vae", 4))
torch.manual_seed(1)
fit(Denoise(), Clips(), toy_cfg(4), {out!r} + "/toy", seed=3, config=Config(), progress=False)
again = main(vae_args({store!r}, {out!r} + "/vae", 4))
sys.stdout.write(f"rank {{rank_and_world()[0]}} of {{rank_and_world()[1]}}: rc {{rc}}, again {{again}}\\n")  # one write
sys.stdout.flush()
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    store = make_store(root / "clips")
    script = root / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=os.path.dirname(__file__), store=str(store), out=str(root / "two"))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(vae_args(store, root / "one" / "vae", 8)) == 0
        torch.manual_seed(1)
        fit(Denoise(), Clips(), toy_cfg(8), root / "one" / "toy", seed=3, config=Config(), progress=False)
    finally:
        torch.set_num_threads(n)
    return root, proc


def _compare(one: Path, two: Path, verb: str, weight_tol: float) -> None:
    a, b = rows(one), rows(two)
    assert [r["step"] for r in b] == [r["step"] for r in a]  # one row per step: only rank 0 logs
    dloss = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    dweight = max_diff(load_checkpoint(one).weights, load_checkpoint(two).weights)
    print(f"{verb}: 2 x batch 4 vs 1 x batch 8 over {len(a)} steps: max |dloss| {dloss:.3g}, max |dweight| {dweight:.3g}")
    assert dloss < TOL and dweight < weight_tol
    assert len({r["loss"] for r in a}) > 1  # the curves move
    assert not list((two / "checkpoints").glob(".tmp*"))


def test_train_vae_two_processes_match_one(runs):
    root, proc = runs
    # Weights: AdamW's first steps move each weight by about lr x sign(gradient); for the many
    # weights whose gradient is rounding noise (e.g. biases before a GroupNorm, ~1e-10) the sign
    # follows the last bit of the all-reduce, so weights part by up to ~lr per step while the loss
    # agrees to 1e-6. Bound: 10 steps x lr 2e-3.
    _compare(root / "one" / "vae", root / "two" / "vae", "train-vae", weight_tol=10 * 2e-3)
    assert proc.stdout.count("latent store:") == 1  # rank 0 prints
    assert ClipStore(root / "two" / "vae" / "latents").kind == "latents"
    assert not [p for p in (root / "two" / "vae").iterdir() if ".tmp" in p.name]  # encoded once, by rank 0


def test_diffusion_like_objective_two_processes_match_one(runs):
    root, _ = runs
    _compare(root / "one" / "toy", root / "two" / "toy", "train (toy diffusion, grad_accum 2)", weight_tol=TOL)


def test_a_refusal_on_rank_0_reaches_every_rank(runs):
    _, proc = runs
    # the two ranks share one stdout pipe, so their lines can interleave (CI saw "...again 1rank 1 of 2...")
    lines = sorted(re.findall(r"rank \d+ of \d+: rc \d+, again \d+", proc.stdout))
    assert lines == ["rank 0 of 2: rc 0, again 1", "rank 1 of 2: rc 0, again 1"]
    assert "already has checkpoints; pass --resume" in proc.stderr
    assert [r["step"] for r in rows(runs[0] / "two" / "vae")] == list(range(1, 11))  # the refused run wrote nothing

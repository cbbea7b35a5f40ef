"""GPU check: the reference grid's speed, memory and MFU, sampling time and a 2-minute training, in one run.

Writes benchmarks/results/gpu_<device>.json (e.g. gpu_h100.json) with

* ``device``: name, torch/CUDA versions, the bf16 peak that MFU is taken against (datasheet, dense:
  989 TFLOP/s for the H100 SXM and the H200) and a measured 8192^3 bf16 matmul for comparison;
* ``latent``: the 2 mm latent shape, derived from the config (data grid 96x112x96, the VQ-GAN's
  4x downsampling per axis and its 4 latent channels: (T, c, d, h, w) = (20, 4, 24, 28, 24));
* ``speed``: per preset s38m ... s463m and the MONAI baseline at matched size (monai-237m, matched
  in parameters to s237m): seconds per training step (loss, backward, AdamW, bf16 autocast),
  clips/s, model TFLOP per step, MFU, seconds per sampled clip (the denoiser's ``--sample-steps``
  guided DDIM steps, linear in them; VQ-GAN decoding not included) and peak memory
  (torch.cuda.max_memory_allocated over training and sampling). MFU is nanoGPT's estimate_mfu:
  model FLOPs per step / step time / peak, where a step costs 3 forward passes (forward + backward)
  and a forward pass is what ``presets.gflops`` counts (FlopCounterMode, attention included). A size
  that runs out of memory is retried at half the batch (``oom_batches`` lists the ones that failed);
  any other failure becomes ``{"arm": ..., "error": ...}`` and the script goes on;
* ``pure_training``: ``fmrisynth``'s own chain on a small simulated 2 mm dataset (2 subjects, the
  MOTOR task, one LR run each, every condition: about 40 clips, all for training), a VQ-GAN trained
  for 1 minute to encode it (so the latents are real encodings, if rough ones), then s38m in the
  pure mode (``stage2.response: none``) for 2 minutes (batch 4, lr 3e-4), with its loss curve
  against ``ref_loss_gaussian`` (the expected loss of the best denoiser of independent Gaussian
  latents; below it, the model has learnt structure).

Usage, on a machine with one GPU (about 6-8 minutes; see README "Scale and speed")::

    python benchmarks/gpu_check.py [--out FILE] [--sizes s38m,s85m] [--batch 4] [--train-minutes 2]
    python benchmarks/gpu_check.py --dry-run        # the same code on the CPU at tiny sizes, in seconds

The script uses whichever torch is installed (the device image brings a CUDA build); it needs only
fmrisynth's own code and its dependencies beyond torch (monai for the baseline, nibabel and nilearn
for the simulated data). A missing one fails its section, not the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import measure  # noqa: E402  (benchmarks/ is no package)

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = ("s38m", "s85m", "s152m", "s237m", "s340m", "s463m")
BASELINE = "monai-237m"  # the reference's baseline, 237.7M parameters: matched to s237m
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s, datasheets (SXM)
DRY = dict(sizes=("tiny", "s0.3m"), baseline="monai-tiny", batch=2, steps=1, sample_steps=2)

# The small simulated 2 mm dataset of the training check, and its dry-run stand-in (a 12 mm grid).
DATA = ["sim.subjects=2", "sim.tasks=MOTOR", "sim.runs=[LR]", "data.conditions=all", "data.split=[1.0,0.0,0.0]",
        "vae.preset=tiny"]
GPU_DATA = ["sim.grid=2mm", "data.grid=2mm", "vae_train.steps=100000", "vae_train.max_minutes=1.0",
            "vae_train.batch_size=8", "vae_train.ckpt_every=100000"]  # fmt: skip
DRY_DATA = ["sim.grid=12mm:16x20x16", "data.grid=12mm:16x20x16", "vae_train.steps=3", "vae_train.ckpt_every=100"]


def device_info(device: torch.device, dry: bool) -> dict:
    """Name, versions, the bf16 peak MFU is taken against, and a measured large matmul.

    Where no datasheet peak is known (the CPU of a dry run, an unlisted GPU) the measured matmul
    stands in for it, so MFU is always a number; ``peak_source`` says which.
    """
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    dtype, n = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 512)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    measured = 2 * n**3 * reps / (time.perf_counter() - t0)
    sheet = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return {"name": name, "torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": dry,
            "peak_flops": sheet or measured, "peak_source": "datasheet bf16 dense" if sheet else "measured matmul",
            f"matmul_{str(dtype).split('.')[1]}_tflops": measured / 1e12,
            "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(device: torch.device) -> None:
    """Free what a finished or failed section left, so that the next one starts with the whole device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_entry(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:400]


def latent_shape(cfg) -> tuple[int, ...]:
    """(T, c, d, h, w) of a latent clip of ``cfg``: the clip, the VQ-GAN's channels, the grid / downsampling."""
    from fmrisynth.data.grid import get_grid

    return (cfg.data.clip_len, cfg.vae.latent_channels, *(-(-n // cfg.vae.downsample) for n in get_grid(cfg.data.grid).shape))


def speed(arm: str, shape: tuple[int, ...], batch: int, steps: int, sample_steps: int, device: torch.device,
          peak: float) -> dict:  # fmt: skip
    """``model_speed.measure`` of one arm plus clips/s and MFU, halving the batch on out-of-memory."""
    ooms = []
    while True:
        try:
            row = measure(arm, shape, batch, steps, device, sample_steps=sample_steps)
            break
        except torch.cuda.OutOfMemoryError:
            ooms.append(batch)
            if batch == 1:
                raise
        release(device)  # outside the except block: the traceback no longer holds the failed step's tensors
        batch //= 2
    flops = 3 * row["gflops"] * 1e9 * batch  # forward + backward = 3 forward passes (nanoGPT's estimate_mfu)
    row.update(clips_per_s=batch / row["s_per_step"], model_tflop_per_step=flops / 1e12,
               mfu=flops / row["s_per_step"] / peak, oom_batches=ooms)  # fmt: skip
    return row


def pure_training(overrides: list[str], work: Path, minutes: float | None, steps: int) -> dict:
    """simulate -> prepare -> VQ-GAN -> latents -> s38m (pure mode) for ``minutes``; the loss against the Gaussian reference."""
    from fmrisynth.config import load_config
    from fmrisynth.data.store import ClipStore
    from fmrisynth.pipeline import prepare_latents
    from fmrisynth.training.diffusion import train_diffusion
    from fmrisynth.training.run_log import read_log

    limit = [f"train.max_minutes={minutes}"] if minutes else []
    cfg = load_config(overrides=[*overrides, "stage2.response=none", f"train.steps={steps}", "train.log_every=10",
                                 "train.ckpt_every=100000", "train.batch_size=4", "train.lr=3e-4", "train.warmup_steps=50",
                                 *limit])  # fmt: skip
    t0 = time.perf_counter()
    latents = prepare_latents(cfg, work, fresh=True, log=print)
    data_s = time.perf_counter() - t0
    out = work / "train"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    train_diffusion(cfg, latents, out, progress=False)
    losses = [r for r in read_log(out) if "loss" in r]
    ref = losses[-1]["ref_loss_gaussian"]
    tail = [r["loss"] for r in losses[-max(1, len(losses) // 10):]]  # the last tenth of the logged steps
    return {"preset": cfg.model.preset, "response": cfg.stage2.response, "prior": cfg.stage2.prior,
            "latent_shape": list(latent_shape(cfg)), "train_clips": len(ClipStore(latents).manifest),
            "batch": cfg.train.batch_size, "lr": cfg.train.lr,
            "data_and_vqgan_s": data_s, "train_s": time.perf_counter() - t0, "steps": losses[-1]["step"],
            "ref_loss_gaussian": ref, "ref_loss_white": losses[-1].get("ref_loss_white"),
            "loss_first": losses[0]["loss"], "loss_last_tenth": sum(tail) / len(tail),
            "loss_over_ref": sum(tail) / len(tail) / ref,
            "curve": [[r["step"], r["loss"]] for r in losses]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes, in seconds")
    parser.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/gpu_<device>.json)")
    parser.add_argument("--sizes", help=f"comma-separated presets (default {','.join(SIZES)},{BASELINE})")
    parser.add_argument("--batch", type=int, default=4, help="clips per training step (halved on out-of-memory)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per size, after 2 warm-up steps")
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of the timed sample (cost is linear in them)")
    parser.add_argument("--train-minutes", type=float, default=2.0)
    parser.add_argument("--work", type=Path, help="scratch folder for the simulated data (default: a temporary one)")
    args = parser.parse_args(argv)
    from fmrisynth.config import load_config

    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest 3D convolutions
    info = device_info(device, dry)
    print(f"{info['name']}: peak {info['peak_flops'] / 1e12:.0f} TFLOP/s ({info['peak_source']}), torch {info['torch']}")
    data = DATA + (DRY_DATA if dry else GPU_DATA)
    shape = latent_shape(load_config(overrides=data))
    arms = args.sizes.split(",") if args.sizes else [*(DRY["sizes"] if dry else SIZES), DRY["baseline"] if dry else BASELINE]
    batch, steps = (DRY["batch"], DRY["steps"]) if dry else (args.batch, args.steps)
    sample_steps = DRY["sample_steps"] if dry else args.sample_steps
    result = {"device": info, "latent": {"grid": load_config(overrides=data).data.grid, "shape": list(shape)},
              "load_average": list(os.getloadavg()), "speed": [], "pure_training": None}  # fmt: skip
    print(f"{'arm':<12}{'params':>9}{'batch':>6}{'s/step':>9}{'clips/s':>9}{'MFU':>7}{'s/clip':>9}{'peak GiB':>9}  latent {shape}")
    for arm in arms:
        try:
            r = speed(arm, shape, batch, steps, sample_steps, device, info["peak_flops"])
            print(f"{arm:<12}{r['params'] / 1e6:>8.1f}M{r['batch']:>6}{r['s_per_step']:>9.3f}{r['clips_per_s']:>9.2f}"
                  f"{r['mfu']:>7.1%}{r['s_per_clip_sampled']:>9.2f}{r['peak_gib']:>9.1f}")  # fmt: skip
        except Exception as e:  # one size failing (memory, a missing monai) must not lose the others
            r = {"arm": arm, "error": error_entry(e)}
            print(f"{arm:<12} failed: {r['error']}")
        result["speed"].append(r)
        release(device)
    work = Path(args.work or tempfile.mkdtemp(prefix="fmrisynth_gpu_check_"))
    try:
        result["pure_training"] = pure_training(data + [f"model.preset={'tiny' if dry else 's38m'}"], work,
                                                None if dry else args.train_minutes, 4 if dry else 100000)  # fmt: skip
        p = result["pure_training"]
        print(f"pure mode {p['preset']}: {p['steps']} steps in {p['train_s']:.0f} s, loss {p['loss_last_tenth']:.4f} "
              f"= {p['loss_over_ref']:.3f} x ref_loss_gaussian ({p['ref_loss_gaussian']:.4f})")  # fmt: skip
    except Exception as e:
        traceback.print_exc()
        result["pure_training"] = {"error": error_entry(e)}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    slug = next((k.lower() for k in PEAK_BF16 if k in info["name"]), re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-"))
    out = args.out or RESULTS / f"gpu_{'dry-run' if dry else slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()

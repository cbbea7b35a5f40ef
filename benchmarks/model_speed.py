"""Stage-2 model speed: seconds per training step and peak memory, per preset, on this machine.

A step is what the training loop does: the diffusion loss (forward), backward and an AdamW update,
under bf16 autocast on a GPU. Each preset runs at its own latent size (``fmrisynth presets``) with
random latents; the first steps are warm-up and not timed. Prints a table and writes
benchmarks/results/model_speed.json.

    .venv/bin/python benchmarks/model_speed.py [--presets tiny,s1m] [--batch 8] [--steps 5]

Default presets: the CPU sizes on a CPU, every size on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from fmrisynth.config import Config, ModelConfig
from fmrisynth.models.diffusion import Diffusion
from fmrisynth.models.presets import LATENT_SHAPES, PRESETS, build_denoiser, count_params, gflops

RESULTS = Path(__file__).resolve().parent / "results" / "model_speed.json"


def step_time(preset: str, batch: int, steps: int, device: torch.device) -> dict:
    """Mean seconds per training step after two warm-up steps, and peak memory in GiB."""
    shape = LATENT_SHAPES[PRESETS[preset].grid]
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(preset=preset), shape, n_classes=7).to(device)
    diffusion = Diffusion(Config().diffusion, null_label=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, shape[0] * shape[1], *shape[2:], device=device)  # (B, T*c, d, h, w)
    label, design = torch.randint(0, 7, (batch,), device=device), torch.rand(batch, shape[0], device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = diffusion.loss(model, x, label, design)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # fmt: skip
    return {"preset": preset, "latent_shape": list(shape), "batch": batch, "params": count_params(model),
            "gflops": gflops(model, shape), "s_per_step": sum(times[2:]) / steps, "peak_gib": peak}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", help="comma-separated (default: by device)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = [p for p, spec in PRESETS.items() if device.type == "cuda" or spec.grid == "6mm"]
    presets = args.presets.split(",") if args.presets else default
    rows = []
    print(f"{'preset':<24}{'params':>10}{'GFLOPs':>10}{'s/step':>10}{'peak GiB':>10}   batch {args.batch} on {device}")
    for p in presets:
        r = step_time(p, args.batch, args.steps, device)
        rows.append(r)
        print(f"{p:<24}{r['params'] / 1e6:>9.2f}M{r['gflops']:>10.1f}{r['s_per_step']:>10.3f}{r['peak_gib']:>10.2f}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"device": name, "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()

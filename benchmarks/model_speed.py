"""Stage-2 model speed: a training step and sampling one clip, ours vs the MONAI U-Net, in one run.

A step is what the training loop does: the diffusion loss (forward), backward and an AdamW update,
under bf16 autocast on a GPU. Sampling is ``diffusion.sample_steps`` DDIM steps with guidance
(two forward passes each) for one clip. Every arm runs at its latent size with random latents; the
first steps are warm-up and not timed. The MONAI baseline is paired with the preset of ours
nearest to it in parameters and the one nearest in GFLOPs, and the table gives ours' speed-up
over it for each pair. Prints a table and writes benchmarks/results/model_speed.json.

    .venv/bin/python benchmarks/model_speed.py [--arms tiny,s1m,s10m,monai-tiny] [--batch 8] [--steps 5]

Default arms: the CPU sizes and monai-tiny on a CPU; every size and both baselines on a GPU.
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
from fmrisynth.models.baseline import BASELINE_PRESETS
from fmrisynth.models.diffusion import Diffusion
from fmrisynth.models.presets import LATENT_SHAPES, PRESETS, build_denoiser, count_params, gflops

RESULTS = Path(__file__).resolve().parent / "results" / "model_speed.json"


def model_config(arm: str) -> ModelConfig:
    return ModelConfig("monai-unet", arm) if arm in BASELINE_PRESETS else ModelConfig(preset=arm)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` calls after two warm-up calls."""
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(times[2:]) / repeats


def measure(arm: str, shape: tuple[int, ...], batch: int, steps: int, device: torch.device) -> dict:
    """Seconds per training step, seconds per sampled clip, and peak memory (GiB) of one arm."""
    torch.manual_seed(0)
    cfg = Config().diffusion
    model = build_denoiser(model_config(arm), shape, n_classes=7).to(device)
    diffusion = Diffusion(cfg, null_label=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, *shape, device=device)  # (B, T, c, d, h, w)
    label, design = torch.randint(0, 7, (batch,), device=device), torch.rand(batch, shape[0], device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step() -> None:
        with amp:
            loss = diffusion.loss(model, x, label, design)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample_clip() -> None:
        with amp:
            diffusion.sample(model.eval(), label[:1], design[:1], shape, cfg.sample_steps, "ddim", cfg.guidance)
        model.train()

    step_s = timed(train_step, steps, device)
    sample_s = timed(sample_clip, 1, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # fmt: skip
    return {"arm": arm, "latent_shape": list(shape), "batch": batch, "params": count_params(model),
            "gflops": gflops(model, shape), "s_per_step": step_s, "s_per_clip_sampled": sample_s, "peak_gib": peak}  # fmt: skip


def pairs(rows: list[dict]) -> list[dict]:
    """Each baseline against the preset of ours nearest in parameters and nearest in GFLOPs."""
    out = []
    ours = [r for r in rows if r["arm"] not in BASELINE_PRESETS]
    for base in (r for r in rows if r["arm"] in BASELINE_PRESETS):
        same = [r for r in ours if r["latent_shape"] == base["latent_shape"]]
        for key in ("params", "gflops"):
            if same:
                mine = min(same, key=lambda r: abs(r[key] / base[key] - 1))
                out.append({"baseline": base["arm"], "ours": mine["arm"], "matched_on": key,
                            "step_speedup": base["s_per_step"] / mine["s_per_step"],
                            "sample_speedup": base["s_per_clip_sampled"] / mine["s_per_clip_sampled"]})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", help="comma-separated presets of ours and of the baseline (default: by device)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grids = ("6mm", "2mm") if device.type == "cuda" else ("6mm",)
    default = [p for p, spec in PRESETS.items() if spec.grid in grids] + \
        (list(BASELINE_PRESETS) if device.type == "cuda" else ["monai-tiny"])  # fmt: skip
    arms = args.arms.split(",") if args.arms else default
    rows = []
    print(f"{'arm':<24}{'params':>10}{'GFLOPs':>10}{'s/step':>10}{'s/clip':>10}{'peak GiB':>10}   batch {args.batch} on {device}")
    for arm in arms:
        grid = "2mm" if arm == "monai-237m" else PRESETS[arm].grid if arm in PRESETS else "6mm"
        r = measure(arm, LATENT_SHAPES[grid], args.batch, args.steps, device)
        rows.append(r)
        print(f"{arm:<24}{r['params'] / 1e6:>9.2f}M{r['gflops']:>10.1f}{r['s_per_step']:>10.3f}"
              f"{r['s_per_clip_sampled']:>10.2f}{r['peak_gib']:>10.2f}")  # fmt: skip
    matched = pairs(rows)
    for m in matched:
        print(f"ours {m['ours']} vs {m['baseline']} (matched {m['matched_on']}): "
              f"{m['step_speedup']:.2f}x per step, {m['sample_speedup']:.2f}x per sampled clip")  # fmt: skip
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"device": name, "threads": torch.get_num_threads(), "rows": rows,
                                   "pairs": matched}, indent=1))  # fmt: skip
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()

"""Stage-2 model speed: a training step and sampling one clip, ours vs the MONAI U-Net, in one run.

A step is what the training loop does: the diffusion loss (forward), backward and an AdamW update,
under bf16 autocast on a GPU. Sampling is ``diffusion.sample_steps`` DDIM steps with guidance
(two forward passes each) for one clip. Every arm runs at its latent size with random latents; the
first steps are warm-up and not timed. The MONAI baseline is paired with the preset of ours
nearest to it in parameters and the one nearest in GFLOPs, and the table gives ours' speed-up
over it for each pair. Prints a table and writes benchmarks/results/model_speed.json.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/model_speed.py [--arms tiny,s1m,monai-tiny] [--batch 8]
        [--steps 5] [--sample-steps 10] [--before REV] [--profile tiny,s1m]

``--before REV`` also times ours as the backbone was at git revision REV (models/backbone.py and
models/blocks.py from that commit) in the same process. The arms take turns, one training step
each per round, so that a speed-up is measured under the same machine load. On a shared machine wall time swings with the
other jobs; each row also gives the process CPU time per step and the load average is recorded.
``--profile`` writes the top operators of one training step (torch.profiler) per arm.

Default arms: the CPU sizes and monai-tiny on a CPU; every size and both baselines on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from fmrisynth.config import Config, ModelConfig
from fmrisynth.models.baseline import BASELINE_PRESETS
from fmrisynth.models.diffusion import Diffusion
from fmrisynth.models.presets import LATENT_SHAPES, PRESETS, build_denoiser, count_params, gflops

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "model_speed.json"


def model_config(arm: str) -> ModelConfig:
    return ModelConfig("monai-unet", arm) if arm in BASELINE_PRESETS else ModelConfig(preset=arm)


def backbone_at(rev: str) -> type:
    """The ``Backbone`` class as models/backbone.py and models/blocks.py were at git revision ``rev``.

    Both files are executed as modules of their own (``blocks`` first, the backbone importing it),
    so the old code runs beside the current one in the same process and under the same load.
    """
    def load(name: str, path: str, source_fix: tuple[str, str] = ("", "")) -> types.ModuleType:
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
        module = types.ModuleType(name)
        sys.modules[name] = module
        exec(compile(text.replace(*source_fix), f"{rev}:{path}", "exec"), module.__dict__)
        return module

    load(f"blocks_{rev}", "src/fmrisynth/models/blocks.py")
    backbone = load(f"backbone_{rev}", "src/fmrisynth/models/backbone.py",
                    ("from fmrisynth.models.blocks import", f"from blocks_{rev} import"))  # fmt: skip
    return backbone.Backbone


def build(arm: str, shape: tuple[int, ...]) -> torch.nn.Module:
    """An arm's denoiser for 7 conditions: a preset of ours, a baseline, or ``preset@REV`` (ours at a revision)."""
    if "@" in arm:
        preset, rev = arm.split("@")
        return backbone_at(rev)(int(shape[1]), 7, **PRESETS[preset].arch)
    return build_denoiser(model_config(arm), shape, n_classes=7)


def timed(fn, repeats: int, device: torch.device, warmup: int = 2) -> tuple[float, float]:
    """Mean wall and process-CPU seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    wall, cpu = [], []
    for _ in range(repeats + warmup):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return sum(wall[warmup:]) / repeats, sum(cpu[warmup:]) / repeats


def top_ops(fn, n: int = 12) -> list[dict]:
    """The ``n`` operators with the most self CPU time in one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:n]
    return [{"op": e.key, "shapes": str(e.input_shapes)[:120], "calls": e.count,
             "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total} for e in rows]  # fmt: skip


class Arm:
    """One arm ready to time: its model (built on ``device`` directly: initialising the largest
    presets on the CPU first takes longer than timing them), AdamW, random latents and labels, and
    its training step and one-clip sampling as calls. ``sample_steps`` overrides the config's DDIM steps."""

    def __init__(self, arm: str, shape: tuple[int, ...], batch: int, device: torch.device, sample_steps: int | None = None):
        torch.manual_seed(0)
        self.cfg, self.arm, self.shape, self.batch, self.device = Config().diffusion, arm, shape, batch, device
        self.sample_steps = sample_steps or self.cfg.sample_steps
        with device:
            self.model = build(arm, shape)
        self.diffusion = Diffusion(self.cfg, null_label=7)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(batch, *shape, device=device)  # (B, T, c, d, h, w)
        self.label, self.design = torch.randint(0, 7, (batch,), device=device), torch.rand(batch, shape[0], device=device)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step(self) -> None:
        with self.amp:
            loss = self.diffusion.loss(self.model, self.x, self.label, self.design)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def sample_clip(self) -> None:
        with self.amp:
            self.diffusion.sample(self.model.eval(), self.label[:1], self.design[:1], self.shape, self.sample_steps, "ddim",
                                  self.cfg.guidance)  # fmt: skip
        self.model.train()

    def row(self, step: tuple[float, float], sample_s: float, profile: bool) -> dict:
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # fmt: skip
        row = {"arm": self.arm, "latent_shape": list(self.shape), "batch": self.batch, "params": count_params(self.model),
               "gflops": gflops(self.model, self.shape), "s_per_step": step[0], "cpu_s_per_step": step[1],
               "s_per_clip_sampled": sample_s, "sample_steps": self.sample_steps, "peak_gib": peak}  # fmt: skip
        if profile:
            row["top_ops"] = top_ops(self.train_step)
        return row


def measure(arm: str, shape: tuple[int, ...], batch: int, steps: int, device: torch.device,
            sample_steps: int | None = None, profile: bool = False) -> dict:  # fmt: skip
    """Seconds per training step, seconds per sampled clip, and peak memory (GiB) of one arm on its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    a = Arm(arm, shape, batch, device, sample_steps)
    step, (sample_s, _) = timed(a.train_step, steps, device), timed(a.sample_clip, 1, device, warmup=1)
    return a.row(step, sample_s, profile)


def measure_interleaved(arms: list[tuple[str, tuple[int, ...]]], batch: int, steps: int, device: torch.device,
                        sample_steps: int | None, profiled: set[str]) -> list[dict]:  # fmt: skip
    """``measure`` of several arms in turn, one call each per round (two warm-up rounds), so that a
    change of load on a shared machine hits every arm alike. Peak memory is then the process's."""
    ready = [Arm(arm, shape, batch, device, sample_steps) for arm, shape in arms]
    steps_s = [[timed(a.train_step, 1, device, warmup=0) for a in ready] for _ in range(steps + 2)][2:]
    samples_s = [[timed(a.sample_clip, 1, device, warmup=0)[0] for a in ready] for _ in range(2)][1:]
    return [a.row((sum(r[i][0] for r in steps_s) / steps, sum(r[i][1] for r in steps_s) / steps), samples_s[0][i],
                  a.arm.split("@")[0] in profiled) for i, a in enumerate(ready)]  # fmt: skip


def pairs(rows: list[dict]) -> list[dict]:
    """Each baseline against the preset of ours nearest in parameters and nearest in GFLOPs.

    Speed-ups are the baseline's time over ours, in wall time and in process CPU time (steadier on
    a shared machine); where ``preset@REV`` was timed too, the same for ours at that revision.
    """
    out = []
    ours = [r for r in rows if r["arm"] not in BASELINE_PRESETS and "@" not in r["arm"]]
    for base in (r for r in rows if r["arm"] in BASELINE_PRESETS):
        same = [r for r in ours if r["latent_shape"] == base["latent_shape"]]
        for key in ("params", "gflops"):
            if same:
                mine = min(same, key=lambda r: abs(r[key] / base[key] - 1))
                pair = {"baseline": base["arm"], "ours": mine["arm"], "matched_on": key}
                for name, r in [("", mine)] + [(f"_at_{b['arm'].split('@')[1]}", b) for b in rows
                                               if b["arm"].split("@")[0] == mine["arm"] and "@" in b["arm"]]:  # fmt: skip
                    pair.update({f"step_speedup{name}": base["s_per_step"] / r["s_per_step"],
                                 f"step_speedup_cpu{name}": base["cpu_s_per_step"] / r["cpu_s_per_step"],
                                 f"sample_speedup{name}": base["s_per_clip_sampled"] / r["s_per_clip_sampled"]})  # fmt: skip
                out.append(pair)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", help="comma-separated presets of ours and of the baseline (default: by device)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sample-steps", type=int, help="DDIM steps per sampled clip (default: the config's)")
    parser.add_argument("--before", metavar="REV", help="also time ours as it was at this git revision")
    parser.add_argument("--profile", default="", help="comma-separated presets whose top operators are recorded (at REV too)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grids = ("6mm", "2mm") if device.type == "cuda" else ("6mm",)
    default = [p for p, spec in PRESETS.items() if spec.grid in grids] + \
        (list(BASELINE_PRESETS) if device.type == "cuda" else ["monai-tiny"])  # fmt: skip
    arms = args.arms.split(",") if args.arms else default
    if args.before:  # each preset of ours at REV just before its current version
        rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.strip()  # fmt: skip
        arms = [a for arm in arms for a in ([f"{arm}@{rev}"] if arm in PRESETS else []) + [arm]]
    profiled = set(args.profile.split(",")) - {""}
    load_before = os.getloadavg()
    print(f"{'arm':<24}{'params':>10}{'GFLOPs':>10}{'s/step':>10}{'cpu s':>10}{'s/clip':>10}{'peak GiB':>10}"
          f"   batch {args.batch} on {device}, load {load_before[0]:.1f}")  # fmt: skip
    def grid(arm: str) -> str:
        preset = arm.split("@")[0]
        return "2mm" if arm == "monai-237m" else PRESETS[preset].grid if preset in PRESETS else "6mm"

    shapes = [(arm, LATENT_SHAPES[grid(arm)]) for arm in arms]
    if device.type == "cpu":  # shared cores: take turns; a GPU is not shared, and could not hold every size at once
        rows = measure_interleaved(shapes, args.batch, args.steps, device, args.sample_steps, profiled)
    else:
        rows = [measure(arm, shape, args.batch, args.steps, device, args.sample_steps, arm in profiled) for arm, shape in shapes]
    for r in rows:
        print(f"{r['arm']:<24}{r['params'] / 1e6:>9.2f}M{r['gflops']:>10.1f}{r['s_per_step']:>10.3f}{r['cpu_s_per_step']:>10.3f}"
              f"{r['s_per_clip_sampled']:>10.2f}{r['peak_gib']:>10.2f}")  # fmt: skip
    matched = pairs(rows)
    for m in matched:
        print(f"ours {m['ours']} vs {m['baseline']} (matched {m['matched_on']}): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in m.items() if "speedup" in k))  # fmt: skip
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "device": name, "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cores": os.cpu_count(), "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "note": "machine shared with other jobs: wall times swing with their load; cpu_s_per_step is this process's "
                "CPU time" if device.type == "cpu" else "",
        "rows": rows, "pairs": matched}, indent=1))  # fmt: skip
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()

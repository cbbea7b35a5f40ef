"""Ours vs the MONAI diffusion U-Net vs the ablations of ours, trained and evaluated on equal terms.

The reference compares its hybrid CNN->Transformer (0.83 map r / 0.98 RSA / 1.00 top-1 at 463M)
against a MONAI diffusion U-Net (~237M: 0.50 / 0.80 / 0.40) and ablates its own design at ~236M:
all-CNN, all-Transformer, AdaLN-Zero only, cross-attention only. This script reruns that comparison
on the embedded simulator. Every arm gets the same data (simulate -> prepare -> VQ-GAN -> latents,
done once and shared), the same seed, steps, batch, learning rate, sampler, guidance and number of
generated clips (as many per condition as the held-out split has), and the same evaluation.

    python benchmarks/compare.py --arms ours,monai-unet --data runs/demo   # CPU: 6 min of training per arm
    python benchmarks/compare.py --gpu             # reference sizes at the 2 mm grid, one GPU
    python benchmarks/compare.py --arms ours,monai-unet --set train.max_minutes=20

Per arm it writes ``<out>/<arm>/diffusion`` (checkpoints, train_log.jsonl) and
``<out>/<arm>/results/eval/metrics.json``; finished stages are reused when rerun (``--fresh`` redoes
them). ``--data`` reuses the data stages (sim, store, vae) of a finished demo or scale run. The
Gaussian background model of the same data is sampled and evaluated alike as a last row: the
training-free peer every deep generator has to beat. The table is printed and written to
``benchmarks/results/compare_<profile>.json``: params, GFLOPs per forward pass, steps, train step
time, sampling time per clip, the final loss against an independent Gaussian's, map correlation,
RSA, top-1 (map and clip), HRF r and the realism figures (C2ST linear / quadratic / statistics,
global signal, autocorrelation, FC, variance), with the noise ceiling (two halves of the real
held-out subjects) beside them.

Timings are of the denoiser alone: step time is the median over logged training windows; sampling
time generates one batch of latent clips with the run's sampler, steps and guidance (decoding is the
same VQ-GAN for every arm and is left out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fmrisynth.config import Config, ModelConfig, load_config, packaged_config, save_config, to_dict
from fmrisynth.evaluate.summary import result_row
from fmrisynth.generate.fit import encode_and_fit
from fmrisynth.pipeline import final_loss, prepare_latents, read_metrics, sample_and_evaluate, stage
from fmrisynth.publish import staged_file
from fmrisynth.training.run_log import read_log

ABLATIONS = ("all-cnn", "all-transformer", "adaln-only", "xattn-only")


@dataclass(frozen=True)
class Arm:
    """One contestant: a denoiser and what it diffuses ("hrf": clip - task response; "none": whole clips)."""

    model: ModelConfig
    response: str = "hrf"


@dataclass(frozen=True)
class Profile:
    """Overrides of the demo recipe (applied before the user's ``--set``) and the arms: name -> Arm.

    Both profiles start from the demo recipe (``src/fmrisynth/configs/demo.yaml``): 20 simulated
    subjects of which 8 are held out, so that the real maps, and with them the noise ceiling, are
    reliable. The CPU profile gives every arm the same wall-clock budget (the issue's terms: which
    denoiser is better for the minutes a user has); the GPU profile gives the same steps.
    """

    overrides: tuple[str, ...]
    arms: dict[str, Arm]


PROFILES = {
    # ours (tiny, 0.09M, 0.42 GFLOPs per clip) and the ablations (variants of it) against the MONAI
    # U-Net whose first level is T*c = 80 wide (7.3M, 3.4 GFLOPs): 6 minutes of training each; each
    # with the response model (hrf) and as the reference's pure conditional latent diffusion (none).
    "cpu": Profile(
        overrides=("train.steps=1000000", "train.max_minutes=6"),
        arms={"ours": Arm(ModelConfig("ours", "tiny")), "ours-none": Arm(ModelConfig("ours", "tiny"), "none"),
              "monai-unet": Arm(ModelConfig("monai-unet", "monai-tiny")),
              "monai-unet-none": Arm(ModelConfig("monai-unet", "monai-tiny"), "none"),
              **{v: Arm(ModelConfig("ours", "tiny", v)) for v in ABLATIONS}},
    ),
    # The reference's sizes at 2 mm: ours at 463M and at 237M (the size of its baseline and
    # ablations), the 237M MONAI U-Net, and the ablations re-widened to ~236.5M each. The simulated
    # dataset and clip store take about 45 GB of disk.
    "gpu": Profile(
        overrides=("sim.grid=2mm", "data.grid=2mm", "vae.preset=base", "vae_train.steps=20000",
                   "vae_train.batch_size=16", "vae_train.lr=1e-4", "vae_train.warmup_steps=500",
                   "vae_train.ckpt_every=2000", "train.steps=20000", "train.batch_size=8", "train.lr=1e-4",
                   "train.ema_decay=0.9999", "train.ckpt_every=2000", "diffusion.sample_steps=50", "train.amp=bf16"),
        arms={"ours": Arm(ModelConfig("ours", "s463m")), "ours-237m": Arm(ModelConfig("ours", "s237m")),
              "ours-237m-none": Arm(ModelConfig("ours", "s237m"), "none"),
              "monai-unet": Arm(ModelConfig("monai-unet", "monai-237m")),
              "monai-unet-none": Arm(ModelConfig("monai-unet", "monai-237m"), "none"),
              **{v: Arm(ModelConfig("ours", f"s237m-{v}")) for v in ABLATIONS}},
    ),
}  # fmt: skip

COLUMNS = {  # row key -> table header
    "response": "response",
    "params": "params", "gflops": "GFLOPs", "steps": "steps", "step_s": "step s", "sample_s_per_clip": "sample s/clip",
    "loss_vs_gaussian": "loss/Gauss", "map_corr_mean": "map r", "rsa": "RSA", "top1_map": "top1 map",
    "top1_clip": "top1 clip", "hrf_corr_mean": "HRF r", "c2st_accuracy": "C2ST lin", "c2st_quadratic": "C2ST quad",
    "c2st_stats": "C2ST stats", "global_signal_ratio": "GS ratio", "autocorr_max_diff": "AC diff", "fc_corr": "FC r",
    "variance_ratio": "var ratio",
}  # fmt: skip


def profile_config(name: str, overrides: list[str] = ()) -> Config:
    """The resolved config of a profile: the demo recipe, the profile's overrides, then ``overrides``."""
    return load_config(None, [*PROFILES[name].overrides, *overrides], base=packaged_config("demo"))


def step_seconds(run: Path, cfg: Config) -> float:
    """Median seconds per optimiser step over the logged windows (the first, warm-up window skipped)."""
    rows = read_log(run)
    clips_per_step = cfg.train.batch_size * cfg.train.grad_accum
    return statistics.median(clips_per_step / r["clips_per_s"] for r in rows[1:] or rows)


def sampling_seconds_per_clip(run: Path, cfg: Config, n: int = 8) -> float:
    """Seconds to generate one latent clip, timed on a batch of ``n`` after a one-step warm-up."""
    import torch

    from fmrisynth.generate.sample import load_denoiser

    den = load_denoiser(run)  # no prior: the network's sampling alone
    frames = den.info["latent_shape"][0]
    labels, designs = torch.zeros(n, dtype=torch.long), torch.zeros(n, frames)  # cost is condition-free
    d = cfg.diffusion

    def generate(steps: int) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(i) for i in range(n)]
        return den.generate(labels, designs, steps, d.sampler, d.guidance, generators, subjects=[], zeta=np.zeros(n))

    generate(1)
    t0 = time.perf_counter()  # generate() returns CPU tensors, so the GPU has finished when it returns
    generate(d.sample_steps)
    return (time.perf_counter() - t0) / n


def run_arm(cfg: Config, name: str, latents: Path, store: Path, out: Path, fresh: bool, log) -> dict:
    """Train one arm, time it, sample and evaluate it; return its row of the table."""
    from fmrisynth.training.diffusion import train_diffusion
    from fmrisynth.models.presets import describe

    run = out / name
    train, results = run / "diffusion", run / "results"
    info = describe(cfg.model, latents)
    stage(f"train {name}", train, fresh, lambda d: train_diffusion(cfg, latents, d, resume=True), log)
    stage(f"sample+evaluate {name}", results, fresh, lambda d: sample_and_evaluate(cfg, train, store, d, log), log)
    metrics = read_metrics(results)
    return {
        "arm": name, "backbone": cfg.model.backbone, "preset": cfg.model.preset, "variant": info["variant"],
        "params": info["params"], "gflops": info["gflops"],
        "step_s": step_seconds(train, cfg), "sample_s_per_clip": sampling_seconds_per_clip(train, cfg),
        "response": cfg.stage2.response, **final_loss(train), **result_row(metrics),
        # evaluation v2: real clips of other subjects, what decoding loses, the simulator's truth, realism
        **{k: metrics.get(k) for k in ("reference", "codec", "truth", "realism")},
        # the real data's own halves; for HRF r, how well the real ROI time course follows the canonical HRF
        "ceiling": {**{k: metrics["ceiling"][k] for k in ("map_corr_mean", "rsa", "top1_map")},
                    "hrf_corr_mean": metrics.get("hrf_corr_real_mean")},
        "n_real": metrics["n_real"], "n_generated": metrics["n_generated"],
        # wall seconds of the stages (their last run, if resumed), from their .done markers
        "train_s": float((train / ".done").read_text()), "eval_s": float((results / ".done").read_text()),
    }  # fmt: skip


def gaussian_row(cfg: Config, first: Path, store: Path, out: Path, fresh: bool, log) -> dict:
    """The Gaussian background model that the first arm's run fitted, sampled and evaluated like an arm."""
    results = out / "gaussian"
    stage("sample+evaluate gaussian", results, fresh,
           lambda d: sample_and_evaluate(cfg, first, store, d, log, kind="gaussian"), log)  # fmt: skip
    metrics = read_metrics(results)
    return {"arm": "gaussian", "backbone": None, "params": 0, "steps": 0, "response": cfg.stage2.response,
            **result_row(metrics), **{k: metrics.get(k) for k in ("reference", "codec", "truth", "realism")},
            "eval_s": float((results / ".done").read_text())}  # fmt: skip


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if key == "params":
        return f"{value / 1e6:.2f}M"
    if key == "steps":
        return str(int(value))
    return f"{value:.4g}" if key in ("gflops", "step_s", "sample_s_per_clip") else f"{value:.3f}"


def table(rows: list[dict]) -> str:
    """The comparison as plain text, one arm a line, the noise ceiling last (the same real data for all)."""
    header = ["arm", *COLUMNS.values()]
    lines = [[r["arm"], *(_cell(k, r.get(k)) for k in COLUMNS)] for r in rows]
    ceiling = rows[0]["ceiling"]
    lines.append(["noise ceiling", *(_cell(k, ceiling.get(k)) for k in COLUMNS)])
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    return "\n".join("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(line, widths)))
                     for line in [header, *lines])  # fmt: skip


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "gpu": gpu, "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the reference sizes at the 2 mm grid (default: CPU, tiny)")
    parser.add_argument("--out", type=Path, help="working directory (default runs/compare_<profile>)")
    parser.add_argument("--arms", help=f"a subset of the profile's arms (CPU: {','.join(PROFILES['cpu'].arms)})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.steps=2000")
    parser.add_argument("--data", type=Path, help="reuse the data stages (sim, store, vae) of a finished demo or scale "
                        "run, e.g. runs/demo (default: make them in OUT/data)")
    parser.add_argument("--no-gaussian", action="store_true", help="leave out the Gaussian background model's row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="redo finished stages (and accept a changed config)")
    parser.add_argument("--json", type=Path, help="table to write (default benchmarks/results/compare_<profile>.json)")
    args = parser.parse_args(argv)

    name = "gpu" if args.gpu else "cpu"
    profile = PROFILES[name]
    arms = args.arms.split(",") if args.arms else list(profile.arms)
    unknown = sorted(set(arms) - set(profile.arms))
    if unknown:
        parser.error(f"unknown arm {unknown[0]!r}; the {name} profile has {', '.join(profile.arms)}")
    cfg = profile_config(name, [f"seed={args.seed}", *args.set])
    out = args.out or Path("runs") / f"compare_{name}"
    saved = out / "config.yaml"
    if saved.is_file() and not args.fresh and load_config(saved) != cfg:
        parser.error(f"{out} holds a comparison run with another config; pass --fresh or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)

    t0 = time.perf_counter()
    data = args.data or out / "data"
    # a --data folder is read, never redone: --fresh redoes only what this comparison made itself
    latents = {"hrf": prepare_latents(replace(cfg, stage2=replace(cfg.stage2, response="hrf")), data, args.fresh and not args.data, print)}
    rows = []
    for a in arms:
        arm = profile.arms[a]
        arm_cfg = replace(cfg, model=arm.model, stage2=replace(cfg.stage2, response=arm.response))
        if arm.response not in latents:  # the same clips and VQ-GAN, encoded whole
            latents[arm.response] = stage(f"encode ({arm.response})", out / f"latents-{arm.response}", args.fresh,
                                           lambda d: encode_and_fit(data / "vae", data / "store", d, arm_cfg.stage2,
                                                                    cfg.seed, splits=("train",)), print)  # fmt: skip
        rows.append(run_arm(arm_cfg, a, latents[arm.response], data / "store", out, args.fresh, print))
    if not args.no_gaussian:
        rows.append(gaussian_row(cfg, out / arms[0] / "diffusion", data / "store", out, args.fresh, print))
    print("\n" + table(rows))

    result = {"profile": name, "rows": rows, "minutes": (time.perf_counter() - t0) / 60, "machine": machine(),
              "config": to_dict(cfg)}  # fmt: skip
    path = args.json or Path(__file__).resolve().parent / "results" / f"compare_{name}.json"
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(f"\ntable: {path}   ({result['minutes']:.0f} min)")
    return result


if __name__ == "__main__":
    main()

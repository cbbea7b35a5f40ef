"""The whole chain as one call: ``fmrisynth demo`` and the scaling study ``fmrisynth scale``.

The demo runs simulate → prepare → train-vae (+ latent cache) → train → sample → evaluate → report
in one output directory, one sub-directory per stage. A stage that finished leaves a ``.done``
marker and is reused by the next run (``fresh=True`` redoes everything); an interrupted training
stage resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from fmrisynth.config import Config, save_config
from fmrisynth.errors import FmrisynthError
from fmrisynth.publish import staged_file

# The demo's time budget: the VQ-GAN gets a fixed share; the diffusion model gets whatever is left
# after the data stages, less a reserve for sampling, evaluation and the report.
VAE_SHARE, RESERVE_SHARE = 0.25, 0.35


def final_loss(run: Path, share: float = 0.1, upto: int | None = None) -> dict:
    """The last logged step and the mean training loss over the last ``share`` of train_log.jsonl (of its
    rows up to step ``upto``), beside the loss an independent Gaussian of the same data scores
    (``ref_loss_gaussian``) and their ratio (< 1: ahead of it)."""
    from fmrisynth.training.run_log import read_log

    rows = [r for r in read_log(run) if "loss" in r and (upto is None or r["step"] <= upto)]
    tail = rows[-max(1, round(share * len(rows))):]
    loss = sum(r["loss"] for r in tail) / len(tail)
    ref = tail[-1].get("ref_loss_gaussian")
    return {"steps": tail[-1]["step"], "loss": loss, "ref_loss_gaussian": ref, "loss_vs_gaussian": loss / ref if ref else None}


def stage(name: str, out: Path, fresh: bool, run: Callable[[Path], object], log: Callable[[str], None]) -> Path:
    """Run ``run(out)`` unless a previous run finished it; mark it done on success."""
    marker = out / ".done"
    if marker.exists() and not fresh:
        log(f"[{name}] reusing {out}")
        return out
    if fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    log(f"[{name}] → {out}")
    run(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{time.perf_counter() - t0:.1f}\n")
    log(f"[{name}] done in {time.perf_counter() - t0:.0f} s")
    return out


def train_codec(cfg: Config, store: Path, out: Path, resume: bool = False, progress: bool = True,
                splits: tuple[str, ...] | None = None) -> tuple[Path, Path]:  # fmt: skip
    """``fmrisynth train-vae``: the VQ-GAN of ``cfg.vae`` on a clip store, then its latent store
    ``out/latents`` (of ``splits``) with the models fitted on it (``generate.fit.encode_and_fit``).

    Under torchrun every rank trains and rank 0 alone writes the latent store while the others
    wait. Returns (the last checkpoint, the latent store).
    """
    from fmrisynth.distributed import main_only
    from fmrisynth.generate.fit import encode_and_fit
    from fmrisynth.training.vqgan import train_vae

    checkpoint, latents = train_vae(cfg, store, out, resume=resume, progress=progress), Path(out) / "latents"

    def encode() -> None:
        if resume:  # latents of an earlier checkpoint are stale
            shutil.rmtree(latents, ignore_errors=True)
        encode_and_fit(checkpoint, store, latents, cfg.stage2, cfg.seed, splits=splits, progress=progress)

    main_only(encode)
    return checkpoint, latents


def prepare_latents(cfg: Config, out: Path, fresh: bool = False, log: Callable[[str], None] = print) -> Path:
    """simulate → prepare → train-vae → latent cache; returns the latent store (reused when done)."""
    from fmrisynth.data.prepare import prepare
    from fmrisynth.data.simulator import simulate

    def simulate_into(d: Path) -> None:
        if d.exists():  # an interrupted simulate leaves no valid dataset: start over
            shutil.rmtree(d)
        simulate(cfg, d, progress=True)

    def prepare_into(d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)
        prepare("hcp", out / "sim", d, cfg, progress=True)

    def vae_into(d: Path) -> None:  # the held-out clips' latents: nothing downstream reads them
        train_codec(cfg, out / "store", d, resume=True, splits=("train",))

    stage("simulate", out / "sim", fresh, simulate_into, log)
    stage("prepare", out / "store", fresh, prepare_into, log)
    stage("train-vae", out / "vae", fresh, vae_into, log)
    return out / "vae" / "latents"


def sample_and_evaluate(cfg: Config, checkpoint: Path, store: Path, out: Path, log: Callable[[str], None] = print,
                        kind: str = "ours") -> dict:  # fmt: skip
    """Sample every condition as often as the held-out set has clips of it; evaluate against them.

    ``kind`` "gaussian" samples the run's Gaussian background model instead of the deep generator.
    """
    from fmrisynth.data.store import ClipStore
    from fmrisynth.evaluate.run import evaluate
    from fmrisynth.generate.sample import sample

    real = ClipStore(store)
    samples = out / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    for condition in real.conditions:
        n = len(real.indices(split="test", condition=condition))
        if n:
            sample(checkpoint, condition, n, samples, guidance=cfg.diffusion.guidance, steps=cfg.diffusion.sample_steps,
                   sampler=cfg.diffusion.sampler, seed=cfg.seed, kind=kind)  # fmt: skip
    log(f"[sample {kind}] {len(list(samples.rglob('*_bold.nii.gz')))} clips → {samples}")
    return evaluate(f"{store}:test", samples, out / "eval", cfg)


def metric_table(metrics: dict, peers: dict[str, dict] | None = None) -> str:
    """The closing table (evaluation v3): generated | gaussian | reference | ceiling | codec | truth rows,
    the realism figures beside the real test set's, and one line naming the figure furthest short."""
    from fmrisynth.evaluate.summary import text_table

    return text_table(metrics, peers=peers)


def demo(cfg: Config, out: Path, minutes: float = 10.0, fresh: bool = False, log: Callable[[str], None] = print) -> dict:
    """The whole chain on the embedded simulator within about ``minutes`` of wall-clock time.

    Beside the deep generator it samples and evaluates the run's Gaussian background model
    (``results/gaussian/``): the training-free peer that the closing table shows next to it.
    """
    from fmrisynth.training.diffusion import train_diffusion
    from fmrisynth.evaluate.report import write_report

    t0 = time.perf_counter()
    cfg = replace(cfg, vae_train=replace(cfg.vae_train, max_minutes=VAE_SHARE * minutes))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    latents = prepare_latents(cfg, out, fresh, log)
    left = max(1.0, (1 - RESERVE_SHARE) * minutes - (time.perf_counter() - t0) / 60)
    cfg = replace(cfg, train=replace(cfg.train, max_minutes=left))
    stage("train", out / "diffusion", fresh, lambda d: train_diffusion(cfg, latents, d, resume=True), log)
    results = out / "results"

    def evaluate_into(d: Path) -> None:
        sample_and_evaluate(cfg, out / "diffusion", out / "store", d / "gaussian", log, kind="gaussian")
        sample_and_evaluate(cfg, out / "diffusion", out / "store", d, log)
        write_report(d / "eval", d / "report.html", peers={"gaussian": read_metrics(d / "gaussian")})

    stage("sample+evaluate", results, fresh, evaluate_into, log)
    metrics = read_metrics(results)
    log("\n" + metric_table(metrics, {"gaussian": read_metrics(results / "gaussian")}))
    log(f"\nreport: {results / 'report.html'}   ({(time.perf_counter() - t0) / 60:.1f} min)")
    return metrics


def read_metrics(results: Path) -> dict:
    """metrics.json of a ``sample_and_evaluate`` output folder (``results/eval/``)."""
    return json.loads((results / "eval" / "metrics.json").read_text())


def _latent_shape(cfg: Config) -> tuple[int, ...]:
    """(T, c, d, h, w) of the latents ``cfg`` will make: a clip's frames, the VQ-GAN's channels and grid."""
    from fmrisynth.data.grid import get_grid

    return (cfg.data.clip_len, cfg.vae.latent_channels, *(s // cfg.vae.downsample for s in get_grid(cfg.data.grid).shape))


def _steps_for(budget: str, gflops: float, batch_size: int) -> int:
    """A budget of ``N`` steps, or ``<N>flops`` converted with 3 forward-equivalents per sample-step."""
    try:
        if budget.endswith("flops"):
            flops = float(budget[: -len("flops")])
            if math.isfinite(flops) and flops > 0:
                return max(1, math.floor(flops / (3 * gflops * 1e9 * batch_size)))
        elif int(budget) >= 1:
            return int(budget)
    except ValueError:
        pass
    raise FmrisynthError(f"budget {budget!r}: give a step count >= 1 (2000) or FLOPs > 0 (3e13flops)")


def scale(cfg: Config, sizes: list[str], budget: str, out: Path, log: Callable[[str], None] = print) -> dict:
    """Train each preset in ``sizes`` under one budget, evaluate it, fit metric vs parameters.

    Writes ``out/scaling.json``: {"rows": [{preset, params, gflops, steps, train_s, loss, ref_loss_gaussian,
    task and realism figures}], "gaussian": the Gaussian background model's figures on the same data,
    "fits": {metric: fit_scaling(...)}}; the data stages are shared by all sizes.
    """
    from fmrisynth.training.diffusion import train_diffusion
    from fmrisynth.models.presets import describe
    from fmrisynth.evaluate.scaling import fit_scaling
    from fmrisynth.evaluate.summary import ROW_FIGURES, result_row

    if len(sizes) < 2:
        raise FmrisynthError("scale needs at least two --sizes")
    for preset in sizes:  # every size and the budget, before the data stages or any size trains
        _steps_for(budget, describe(replace(cfg.model, preset=preset), _latent_shape(cfg))["gflops"], cfg.train.batch_size)
    save_config(cfg, out / "config.yaml")
    latents = prepare_latents(cfg, out / "data", False, log)
    described = {preset: describe(replace(cfg.model, preset=preset), latents) for preset in sizes}
    store, rows = out / "data" / "store", []
    for preset in sizes:
        info = described[preset]
        steps = _steps_for(budget, info["gflops"], cfg.train.batch_size)
        run_cfg = replace(cfg, model=replace(cfg.model, preset=preset), train=replace(cfg.train, steps=steps))
        run = out / preset
        t0 = time.perf_counter()
        stage(f"train {preset}", run / "diffusion", False, lambda d: train_diffusion(run_cfg, latents, d, resume=True), log)
        train_s = float((run / "diffusion" / ".done").read_text())
        stage(f"sample+evaluate {preset}", run / "results", False,
               lambda d: sample_and_evaluate(run_cfg, run / "diffusion", store, d, log), log)  # fmt: skip
        rows.append({"preset": preset, "params": info["params"], "gflops": info["gflops"], "steps": steps, "train_s": train_s,
                     **final_loss(run / "diffusion"), **result_row(read_metrics(run / "results"))})  # fmt: skip
        log(f"[scale] {preset}: {info['params'] / 1e6:.2f}M params, map r {rows[-1]['map_corr_mean']:.3f}, "
            f"C2ST {rows[-1]['c2st_accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)")
    # the training-free peer: the Gaussian background model the first run fitted, sampled and evaluated alike
    first = out / sizes[0] / "diffusion"
    stage("sample+evaluate gaussian", out / "gaussian", False,
           lambda d: sample_and_evaluate(cfg, first, store, d, log, kind="gaussian"), log)  # fmt: skip
    fits = {}
    for key in (*ROW_FIGURES, "loss_vs_gaussian"):
        try:
            fits[key] = fit_scaling([r["params"] for r in rows], [_number(r.get(key)) for r in rows])
        except FmrisynthError:
            continue
    result = {"budget": budget, "rows": rows, "gaussian": result_row(read_metrics(out / "gaussian")), "fits": fits}
    with staged_file(out / "scaling.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    return result


def _number(value) -> float:
    return float("nan") if value is None else float(value)

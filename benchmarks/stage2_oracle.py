"""A perfect latent generator: where does stage 2 lose realism, in the denoiser or after it?

Takes a trained stage-2 run and, instead of sampling latents, uses the stored latents of real
training clips (the residuals the denoiser learns to make). They go through the same finish as
generated ones (``Generator.finish``: decode, + codec residual, + the block's response through a
freshly drawn subject, for the events the real clip showed: its block and the tails before it) and are evaluated by protocol v2 against the real test clips, exactly as
the generated set is. The gap between this oracle and the generated set is the denoiser's; the gap
between the oracle and the reference is the codec's and the response model's.

    .venv/bin/python benchmarks/stage2_oracle.py RUN [--out runs/oracle] [--n 288]

RUN is a stage-2 run (e.g. runs/demo/diffusion). Writes the oracle clips as a BIDS dataset,
evaluates them and writes benchmarks/results/stage2_oracle.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fmrisynth.data.design import Event
from fmrisynth.data.store import ClipStore
from fmrisynth.evaluate.run import evaluate
from fmrisynth.generate.bids import DatasetWriter, condition_task
from fmrisynth.generate.sample import load_generator
from fmrisynth.data.run_events import read_run_events
from fmrisynth.models.response import context_events

RESULTS = Path(__file__).resolve().parent / "results" / "stage2_oracle.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/oracle"))
    parser.add_argument("--n", type=int, default=288, help="oracle clips (drawn from the training latents)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    gen = load_generator(args.run)
    info, latents = gen.info, ClipStore(gen.info["latents"])
    rng = np.random.default_rng(args.seed)
    rows = rng.choice(latents.indices(split="train"), min(args.n, len(latents.indices(split="train"))), replace=False)
    m = latents.manifest
    run_events = read_run_events(ClipStore(info["clip_store"]))[0]
    known = gen.extras.response.conditions + gen.extras.response.nuisance
    runs = [(f"oracle{k:03d}", condition_task(m.iloc[i]["condition"])) for k, i in enumerate(rows)]
    with DatasetWriter(args.out / "samples", runs, gen.affine, gen.mask, gen.source,
                       name="fmrisynth stage-2 oracle") as writer:  # fmt: skip
        for (subject, task), i in zip(runs, rows):
            row = m.iloc[i]
            z = torch.from_numpy(latents.item(int(i)).astype(np.float32))[None]  # (1, T, c, d, h, w)
            events = context_events(row, run_events, known, latents.item_shape[0])  # as the clip's response
            clip = gen.finish(z, [events], np.array([row["tr"]]), [rng], [str(row["subject"])],
                              rng.standard_normal(1))[0]  # fmt: skip  # (T, V): its own subject's codec residual
            sidecar = {"condition": row["condition"], "onset_s": float(row["onset_s"]), "duration_s": float(row["duration_s"]),
                       "tr": float(row["tr"]), "seed": args.seed, "oracle_of": int(i)}  # fmt: skip
            design = [Event(row["condition"], float(row["onset_s"]), float(row["duration_s"]))]
            writer.add(subject, task, clip, float(row["tr"]), design, sidecar)
    cfg = gen.config
    cfg = replace(cfg, eval=replace(cfg.eval, codec=False))
    metrics = evaluate(f"{info['clip_store']}:test", args.out / "samples", args.out / "eval", cfg)
    realism = metrics.get("realism") or {}
    result = {"run": str(args.run), "n": len(rows), "seconds": time.perf_counter() - t0,
              **{k: metrics.get(k) for k in ("map_corr_mean", "rsa", "top1_map", "top1_clip", "reference")},
              "realism": realism}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1, default=float))
    keys = ("variance_ratio", "global_signal_ratio", "autocorr_max_diff", "fc_corr", "c2st_accuracy")
    print("oracle (stored latents through the generator's finish) vs real test")
    for k in keys:
        print(f"  {k:<22}{realism.get(k, float('nan')):>8.3f}")
    print(f"  map r {metrics['map_corr_mean']:.3f}  ->  {RESULTS}")


if __name__ == "__main__":
    main()

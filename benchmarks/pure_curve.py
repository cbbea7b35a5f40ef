"""How far CPU training takes the reference's pure mode: map r and top-1 against training steps.

The pure mode (``stage2.response: none``) is the reference's method: the denoiser diffuses whole
latent clips, task included, conditioned on the condition and guided (classifier-free, ``--guidance``).
With the response model (the default) the task figures come from the response model whatever the
denoiser learns; here they come from the denoiser alone, so this curve shows what training buys.

One run of ``--preset`` is trained on the demo's data in increments (``--steps 500,1000,2000,3000``);
after each it is sampled and evaluated like the demo (as many clips per condition as the held-out
split has, evaluation protocol v3). The learning rate is constant after warm-up and resuming is exact,
so the run at 3000 steps is the same as one uninterrupted 3000-step run.

    .venv/bin/python benchmarks/pure_curve.py --data runs/demo [--steps 500,1000,2000,3000] [--out runs/pure_curve]

``--data`` is a finished demo or scale data folder (sim, store, vae); its clip store is encoded whole
once more (no response subtracted) into ``OUT/latents``. Prints a table and writes
``benchmarks/results/pure_curve.json`` (rows: steps, loss against an independent Gaussian's, task
and realism figures). A rerun resumes: finished evaluations are reused, training continues from the
newest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path

from fmrisynth.config import load_config, packaged_config, to_dict
from fmrisynth.evaluate.summary import result_row
from fmrisynth.generate.fit import encode_and_fit
from fmrisynth.pipeline import final_loss, read_metrics, sample_and_evaluate, stage
from fmrisynth.publish import staged_file
from fmrisynth.training.run_log import read_log

RESULTS = Path(__file__).resolve().parent / "results" / "pure_curve.json"
COLUMNS = ["steps", "loss_vs_gaussian", "map_corr_mean", "rsa", "top1_map", "top1_clip", "c2st_accuracy",
           "global_signal_ratio", "fc_corr"]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="data folder of a finished demo or scale run")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", default="500,1000,2000,3000", help="comma-separated, increasing")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance (the reference's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/pure_curve"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    if steps != sorted(set(steps)) or steps[0] < 1:
        parser.error(f"--steps {args.steps!r}: give increasing step counts >= 1")
    overrides = ["stage2.response=none", f"model.preset={args.preset}", f"diffusion.guidance={args.guidance}", *args.set]
    cfg = load_config(None, overrides, base=packaged_config("demo"))
    store, run = args.data / "store", args.out / "diffusion"
    latents = stage("encode (none)", args.out / "latents", False,
                     lambda d: encode_and_fit(args.data / "vae", store, d, cfg.stage2, cfg.seed, splits=("train",)),
                     print)  # fmt: skip

    from fmrisynth.training.diffusion import train_diffusion

    rows = []
    for n in steps:
        step_cfg, results = replace(cfg, train=replace(cfg.train, steps=n)), args.out / f"step_{n}"
        if not (results / ".done").exists():  # else this step was trained and evaluated by an earlier run
            if read_log(run) and final_loss(run)["steps"] > n:  # it would sample a later model
                parser.error(f"{run} has trained past {n} steps; remove {args.out} or leave {n} out of --steps")
            train_diffusion(step_cfg, latents, run, resume=True)  # resumes from the newest checkpoint
            stage(f"sample+evaluate {n} steps", results, False, lambda d: sample_and_evaluate(step_cfg, run, store, d), print)
        metrics = read_metrics(results)
        rows.append({"steps": n, **final_loss(run, upto=n), **result_row(metrics),
                     "reference": {k: metrics["reference"].get(k) for k in ("map_corr_mean", "rsa", "top1_map", "top1_clip")}})
        print(f"[pure] {n} steps: map r {metrics['map_corr_mean']:.3f}, top-1 {metrics['top1_map']:.3f}", flush=True)

    print("  ".join(f"{c:>16}" for c in COLUMNS))
    for r in rows:
        print("  ".join(f"{r[c]:>16.3f}" if isinstance(r[c], float) else f"{r[c]!s:>16}" for c in COLUMNS))
    result = {"preset": args.preset, "guidance": args.guidance, "rows": rows, "machine": platform.platform(),
              "config": to_dict(cfg)}  # fmt: skip
    with staged_file(args.json) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(f"table: {args.json}")
    return result


if __name__ == "__main__":
    main()

"""Does the trained denoiser add to the Gaussian prior it starts from?

With ``stage2.prior: gaussian`` the denoiser diffuses latents whitened by a Gaussian model of the
training latents, and its output layer starts at zero: untrained ("step 0") it generates exactly
that Gaussian, coloured back, decoded, plus the codec residual and the response. This benchmark
samples and evaluates, by protocol v3 against the real test clips, with the same seeds:

* ``trained``: the run's EMA weights;
* ``step0``: the same run with a freshly built network (zero output), i.e. the prior alone;
* ``gaussian``: the Gaussian generator in voxels (no network, no VQ-GAN): the peer.

    .venv/bin/python benchmarks/prior_step0.py RUN [--out runs/prior_step0]

RUN is a stage-2 run (e.g. runs/demo/diffusion) on a store whose test split is the real set.
Prints one table and writes benchmarks/results/prior_step0.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from fmrisynth.data.store import ClipStore
from fmrisynth.evaluate.run import evaluate
from fmrisynth.generate.sample import load_generator, sample
from fmrisynth.models.diffusion import Diffusion
from fmrisynth.models.presets import build_denoiser

RESULTS = Path(__file__).resolve().parent / "results" / "prior_step0.json"
FIGURES = ["c2st_accuracy", "c2st_quadratic", "c2st_stats", "variance_ratio", "global_signal_ratio",
           "autocorr_max_diff", "fc_corr", "fwhm_generated_mm"]  # fmt: skip
TASK = ["map_corr_mean", "rsa", "top1_map", "top1_clip"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/prior_step0"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    trained = load_generator(args.run)
    den = trained.denoiser
    fresh = build_denoiser(den.config.model, den.info["latent_shape"], len(trained.conditions))  # zero output layer
    untrained = Diffusion(den.config.diffusion, len(trained.conditions))  # x0 error 1: the untrained model's own
    step0 = replace(trained, denoiser=replace(den, model=fresh.to(next(den.model.parameters()).device).eval(),
                                              diffusion=untrained))  # fmt: skip
    generators = {"trained": trained, "step0": step0, "gaussian": load_generator(args.run, kind="gaussian")}
    store = ClipStore(trained.info["clip_store"])
    d = den.config.diffusion
    rows = {}
    for name, gen in generators.items():
        t0 = time.perf_counter()
        for condition in store.conditions:
            n = len(store.indices(split="test", condition=condition))
            if n:
                sample(gen, condition, n, args.out / name / "samples", guidance=d.guidance, steps=d.sample_steps,
                       sampler=d.sampler, seed=args.seed)  # fmt: skip
        m = evaluate(f"{store.path}:test", args.out / name / "samples", args.out / name / "eval", den.config)
        rows[name] = {**{k: m["realism"].get(k) for k in FIGURES}, **{k: m.get(k) for k in TASK},
                      "seconds": time.perf_counter() - t0}  # fmt: skip
    twin = {"c2st_accuracy": "c2st_reference", "fwhm_generated_mm": "fwhm_reference_mm"}  # the others: <key>_reference
    reference = {k: m["realism"].get(twin.get(k, f"{k}_reference")) for k in FIGURES}
    print(f"{'figure':<22}" + "".join(f"{name:>10}" for name in rows) + f"{'reference':>11}")
    for k in FIGURES + TASK:
        ref = reference.get(k)
        print(f"{k:<22}" + "".join(f"{r[k]:>10.3f}" if r[k] is not None else f"{'-':>10}" for r in rows.values())
              + (f"{ref:>11.3f}" if isinstance(ref, float) else f"{'':>11}"))  # fmt: skip
    RESULTS.write_text(json.dumps({"run": str(args.run), "sampler": d.sampler, "steps": d.sample_steps,
                                   "rows": rows, "reference": reference}, indent=1))  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

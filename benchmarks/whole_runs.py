"""Whole runs: the slow dynamics of generated runs against simulated runs of the same design.

Clips of 14 s cannot show a model the slow fluctuations of a 3-5 minute run. This benchmark makes
whole runs of one design (the MOTOR:rh blocks of an HCP MOTOR schedule, 284 frames at TR 0.72 s)
three ways: the simulator (``simulate --events``, subjects the model never saw: the yardstick),
the deep generator and the Gaussian generator (``sample --events``, each run a new subject), and
compares each generated set with the simulated one by ``evaluate/runs.py`` (residuals of design
and cosine drift: autocorrelation at lags 1-5, power below 0.05 Hz, global-signal share, spectrum
distance, FC).

    .venv/bin/python benchmarks/whole_runs.py RUN [--subjects 4] [--out runs/whole_runs]

RUN is a stage-2 run with ``stage2.response: hrf`` (e.g. runs/demo/diffusion). Prints one table
and writes benchmarks/results/whole_runs.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fmrisynth.config import load_config, packaged_config
from fmrisynth.data.design import Event, design_tsv
from fmrisynth.data.sim_events import simulate_design
from fmrisynth.evaluate.runs import compare_folders
from fmrisynth.generate.sample import sample_runs
from fmrisynth.tasks import HCP_TR, PARADIGMS

RESULTS = Path(__file__).resolve().parent / "results" / "whole_runs.json"
FRAMES = 284
FIGURES = [("lag-1 autocorrelation", lambda r, k: r[f"autocorr_{k}"][0]),
           ("low-frequency (< 0.05 Hz) share", lambda r, k: r[f"low_freq_share_{k}"]),
           ("global-signal share", lambda r, k: r[f"global_signal_share_{k}"])]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/whole_runs"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    schedule = PARADIGMS["MOTOR"].schedule(np.random.default_rng(args.seed))["rh"]
    events = args.out / "motor.tsv"
    events.write_text(design_tsv([Event("MOTOR:rh", o, d) for o, d in schedule]))
    cfg = load_config(packaged_config("demo"))
    cfg = replace(cfg, sim=replace(cfg.sim, subjects=args.subjects, runs=("LR",)))
    t0 = time.perf_counter()
    simulate_design(cfg, args.out / "simulated", events, HCP_TR, FRAMES, task="motor", first_subject=20, progress=False)
    rows, seconds = {}, {"simulated": time.perf_counter() - t0}
    for kind in ("ours", "gaussian"):
        t0 = time.perf_counter()
        sample_runs(args.run, events, HCP_TR, FRAMES, args.out / kind, subjects=args.subjects, task="motor",
                    seed=args.seed, kind=kind)  # fmt: skip
        seconds[kind] = time.perf_counter() - t0
        rows[kind] = compare_folders(args.out / "simulated", args.out / kind, args.seed)
    print(f"{'whole runs (' + str(args.subjects) + ' x ' + str(FRAMES) + ' frames)':<34}{'simulated':>10}"
          + "".join(f"{k:>10}" for k in rows))  # fmt: skip
    for name, get in FIGURES:
        print(f"{name:<34}{get(rows['ours'], 'real'):>10.3f}" + "".join(f"{get(r, 'generated'):>10.3f}" for r in rows.values()))
    print(f"{'spectrum distance (halves)':<34}{rows['ours']['psd_distance_real_halves']:>10.3f}"
          + "".join(f"{r['psd_distance']:>10.3f}" for r in rows.values()))  # fmt: skip
    print(f"{'FC r with simulated':<34}{1.0:>10.3f}" + "".join(f"{r['fc_corr']:>10.3f}" for r in rows.values()))
    RESULTS.write_text(json.dumps({"run": str(args.run), "frames": FRAMES, "subjects": args.subjects,
                                   "seconds": seconds, "rows": rows}, indent=1, default=float))  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

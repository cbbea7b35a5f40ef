"""Speed of ``fmrisynth simulate``: wall and CPU seconds for a dataset, and how much of it is gzip.

    .venv/bin/python benchmarks/simulator_speed.py [--subjects 10] [--grid 6mm|2mm]

Targets on 2 cores: 10 subjects x 7 tasks x 2 PE in < 1 min at 6 mm and < 10 min at 2 mm. The
machine's load average is recorded beside the times, since a shared machine inflates wall time;
CPU seconds (all threads) are the steadier figure. Writes benchmarks/results/simulator_speed_<grid>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from fmrisynth.config import Config, SimConfig
from fmrisynth.data.simulator import simulate

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--grid", default="6mm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        load_before = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        summary = simulate(Config(sim=SimConfig(subjects=args.subjects, grid=args.grid)), Path(tmp) / "sim")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        files = list((Path(tmp) / "sim").rglob("*.nii.gz"))
        size = sum(f.stat().st_size for f in files)
        # gzip share: recompress one WM run (the longest) at nibabel's level 1
        wm = next(f for f in files if f.name == "tfMRI_WM_LR.nii.gz")
        raw = np.asarray(nib.load(wm).dataobj).tobytes()
        started = time.process_time()
        zlib.compress(raw, 1)
        gzip_wm = time.process_time() - started
    result = {
        "grid": args.grid,
        "subjects": args.subjects,
        "runs": summary["runs"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "wall_s_per_run": round(wall / summary["runs"], 3),
        "gzip_cpu_s_one_wm_run": round(gzip_wm, 2),
        "dataset_gb": round(size / 1e9, 2),
        "load_average_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "cores": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"simulator_speed_{args.grid}.json").write_text(json.dumps(result, indent=1))
    for key, value in result.items():
        print(f"{key:<28} {value}")


if __name__ == "__main__":
    main()

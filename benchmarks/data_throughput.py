"""Data-layer throughput: prepare (volumes/s, peak memory) and random clip reads (clips/s).

Writes a small synthetic HCP-layout dataset (MNI 2 mm, 91x109x91, LAS, as HCP ships it), prepares
it onto each grid in a child process (so its peak RSS is prepare's alone), then reads random clips
from the store: raw in-mask items, clips on the grid, and through ClipDataset. Prints a table and
writes benchmarks/results/data_throughput.json.

    .venv/bin/python benchmarks/data_throughput.py [--grids 6mm,2mm] [--runs 4] [--frames 120]

Targets on 2 cores: >= 200 clips/s at 6mm (32x40x32x20), >= 20 clips/s at 2mm (96x112x96x20);
prepare's memory about two runs whatever the number of runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "data_throughput.json"
HCP_SHAPE = (91, 109, 91)


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def hcp_affine() -> np.ndarray:
    """HCP's MNINonLinear 2 mm affine (x flipped: LAS)."""
    return np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])


def make_dataset(root: Path, n_runs: int, n_frames: int, seed: int = 0) -> int:
    """n_runs MOTOR runs (two per subject) of a brain-shaped baseline plus noise; returns bytes per run (float32)."""
    from nibabel.openers import Opener
    from nilearn import datasets, image

    from fmrisynth.data.hcp import write_run
    from fmrisynth.tasks import HCP_TR

    Opener.default_compresslevel = 1  # the benchmark measures prepare, not gzip -9 of its input
    rng = np.random.default_rng(seed)
    mni = datasets.load_mni152_brain_mask(resolution=2)
    brain = image.resample_img(mni, hcp_affine(), HCP_SHAPE, interpolation="nearest", force_resample=True, copy_header=True)
    baseline = 1000.0 * np.asarray(brain.dataobj, dtype=np.float32)  # (X, Y, Z)
    n_blocks = int((n_frames * HCP_TR - 8.0) // 20.0)  # 12 s blocks every 20 s after 8 s of lead-in
    events = {ev: [(8.0 + 20.0 * k, 12.0) for k in range(n_blocks) if k % 2 == i] for i, ev in enumerate(["rh", "lf"])}
    for r in range(n_runs):
        noise = rng.standard_normal((*HCP_SHAPE, n_frames), dtype=np.float32)  # (X, Y, Z, T)
        data = baseline[..., None] + 10.0 * noise
        write_run(root, f"{100000 + r // 2}", "MOTOR", ("LR", "RL")[r % 2], data, hcp_affine(), events)
    return int(np.prod(HCP_SHAPE)) * n_frames * 4


def prepare_in_child(root: Path, out: Path, grid: str) -> tuple[dict, float]:
    """Run prepare in a fresh interpreter; returns its summary and its peak RSS in MiB."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from data_throughput import peak_rss_mib\n"
        "from fmrisynth.config import load_config\n"
        "from fmrisynth.data.prepare import prepare\n"
        f"cfg = load_config(None, ['data.grid={grid}', 'data.conditions=all'])\n"
        f"s = prepare('hcp', {str(root)!r}, {str(out)!r}, cfg, progress=False)\n"
        "print(json.dumps({'summary': s, 'rss': peak_rss_mib()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["summary"], result["rss"]


def reads_per_s(read, n_items: int, n: int, seed: int = 0) -> float:
    """Random-access reads per second of ``read(i)`` (one warm-up pass first: the page cache is warm)."""
    order = np.random.default_rng(seed).integers(0, n_items, size=n)
    for i in range(n_items):
        read(i)
    t0 = time.perf_counter()
    for i in order:
        read(int(i))
    return n / (time.perf_counter() - t0)


def bench_grid(root: Path, tmp: Path, grid: str, run_bytes: int, n_reads: int) -> dict:
    from fmrisynth.data.dataset import ClipDataset
    from fmrisynth.data.store import ClipStore

    out = tmp / f"store-{grid}"
    summary, rss_mib = prepare_in_child(root, out, grid)
    store = ClipStore(out)
    dataset = ClipDataset(store, split=None)
    frames = ClipDataset(store, split=None, frames=True)
    T = store.item_shape[0]
    return {
        "grid": grid,
        "clip_shape": [T, *store.grid_shape],
        "runs": summary["runs"],
        "clips": summary["clips"],
        "prepare_s": summary["seconds"],
        "prepare_volumes_per_s": summary["volumes_per_s"],
        "prepare_peak_rss_mib": round(rss_mib, 1),
        "run_mib": round(run_bytes / 2**20, 1),
        "prepare_rss_in_runs": round(rss_mib * 2**20 / run_bytes, 2),
        "item_reads_per_s": round(reads_per_s(store.item, len(store), n_reads), 1),
        "clip_reads_per_s": round(reads_per_s(store.clip, len(store), n_reads), 1),
        "dataset_clips_per_s": round(reads_per_s(dataset.__getitem__, len(dataset), n_reads), 1),
        "dataset_frames_per_s": round(reads_per_s(frames.__getitem__, len(frames), n_reads), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", default="6mm,2mm")
    p.add_argument("--runs", type=int, default=4, help="runs in the synthetic dataset (two per subject)")
    p.add_argument("--frames", type=int, default=120, help="frames per run")
    p.add_argument("--reads", type=int, default=200, help="random reads per measurement")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        run_bytes = make_dataset(tmp / "hcp", args.runs, args.frames)
        print(f"synthetic dataset: {args.runs} runs x {args.frames} frames of {HCP_SHAPE} ({time.perf_counter() - t0:.1f} s)", flush=True)
        rows = [bench_grid(tmp / "hcp", tmp, g, run_bytes, args.reads) for g in args.grids.split(",")]

    cols = [
        ("grid", "grid"), ("prepare_volumes_per_s", "prep vol/s"), ("prepare_peak_rss_mib", "prep RSS MiB"),
        ("prepare_rss_in_runs", "RSS/run"), ("item_reads_per_s", "items/s"), ("clip_reads_per_s", "clips/s"),
        ("dataset_clips_per_s", "Dataset clips/s"), ("dataset_frames_per_s", "Dataset frames/s"),
    ]  # fmt: skip
    print("  ".join(f"{h:>16}" for _, h in cols))
    for r in rows:
        print("  ".join(f"{r[k]:>16}" for k, _ in cols))
    peak = peak_rss_mib()
    print(f"peak RSS of this process (dataset generation and reads): {peak:.0f} MiB")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
        "dataset": {"runs": args.runs, "frames_per_run": args.frames, "source_shape": list(HCP_SHAPE)},
        "process_peak_rss_mib": round(peak, 1),
        "grids": rows,
    }, indent=1))  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

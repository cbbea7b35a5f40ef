"""Evaluation speed: the batched GLM against a per-clip nilearn loop, and a full 2 mm evaluation.

1. GLM at 6 mm (100 clips, the demo grid) and 2 mm (16 clips): the same clips fitted by ``fmrisynth.evaluate.glm`` (design + batched OLS) and by
   the loops a user would write with nilearn: per clip ``make_first_level_design_matrix`` +
   ``run_glm`` (OLS) + ``compute_contrast``, and per clip a ``FirstLevelModel`` on the in-memory
   image (OLS, no signal scaling); the t maps are checked to agree.
2. The DESIGN.md scale: 7 conditions x 100 clips at 2 mm (96x112x96, T=20, the MNI brain mask)
   against as many generated clips (a store) plus 100 training clips, run as ``fmrisynth evaluate``
   in a subprocess: wall time and peak resident memory.

Usage: ``python benchmarks/eval_speed.py [--clips 100] [--workdir DIR]``; prints a table and writes
benchmarks/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from fmrisynth.data.grid import brain_mask, get_grid
from fmrisynth.data.store import StoreWriter
from fmrisynth.evaluate.glm import clip_glm, design_matrices
from fmrisynth.tasks import HCP7, HCP_TR, block_regressor

T = 20


def glm_speed(n_clips: int, mask: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> dict:
    """Seconds per clip: ours, nilearn's ``run_glm`` loop, and a ``FirstLevelModel`` loop (in-memory images)."""
    import nibabel as nib
    import pandas as pd
    from nilearn.glm import compute_contrast
    from nilearn.glm.first_level import FirstLevelModel, make_first_level_design_matrix, run_glm

    n_vox = int(mask.sum())
    onsets = rng.integers(0, 3, n_clips) * HCP_TR
    y = rng.standard_normal((n_clips, T, n_vox), dtype=np.float32)  # (N, T, V)
    events = [pd.DataFrame({"onset": [o], "duration": [12.0], "trial_type": ["task"]}) for o in onsets]
    def ours():
        return clip_glm(y, design_matrices(onsets, np.full(n_clips, 12.0), np.full(n_clips, HCP_TR), T))[1]

    def run_glm_loop():
        for n in range(n_clips):
            x = make_first_level_design_matrix(np.arange(T) * HCP_TR, events[n], drift_model="polynomial", drift_order=1)
            labels, results = run_glm(y[n].astype(float), x.to_numpy(), noise_model="ols")
            t = compute_contrast(labels, results, (x.columns == "task").astype(float), "t").stat()
        return t


    mask_img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    images = []
    for n in range(n_clips):
        vol = np.zeros(mask.shape + (T,), np.float32)  # (D, H, W, T)
        vol[mask] = y[n].T
        images.append(nib.Nifti1Image(vol, affine))
    def first_level_model_loop():
        warnings.filterwarnings("ignore", message=".*mask was given at masker creation")
        for n in range(n_clips):
            model = FirstLevelModel(t_r=HCP_TR, drift_model="polynomial", drift_order=1, mask_img=mask_img,
                                    noise_model="ols", signal_scaling=False, minimize_memory=True)
            stat = model.fit(images[n], events=events[n]).compute_contrast("task", stat_type="t")
        return stat.get_fdata()[mask]

    out = {"clips": n_clips, "voxels": n_vox}
    t_maps = {}
    for name, fn in (("batched", ours), ("run_glm_loop", run_glm_loop), ("first_level_model_loop", first_level_model_loop)):
        wall, cpu = time.perf_counter(), time.process_time()
        t_maps[name] = fn()
        out[f"{name}_s"], out[f"{name}_cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
    ours_last = t_maps["batched"][-1]
    for name in ("run_glm_loop", "first_level_model_loop"):
        out[f"speedup_vs_{name}"] = out[f"{name}_s"] / out["batched_s"]
        out[f"cpu_speedup_vs_{name}"] = out[f"{name}_cpu_s"] / out["batched_cpu_s"]
        out[f"t_map_r_{name}"] = float(np.corrcoef(ours_last, t_maps[name])[0, 1])  # last clip, pure noise
    return out


def write_store(path: Path, splits: dict[str, int], mask: np.ndarray, affine: np.ndarray, seed: int) -> None:
    """Clips of the 7 HCP conditions: a condition pattern times the block response, plus noise."""
    rng = np.random.default_rng(seed)
    n_vox = int(mask.sum())
    patterns = np.random.default_rng(0).standard_normal((len(HCP7), n_vox), dtype=np.float32)
    response = block_regressor([1.44], [12.0], T, HCP_TR).astype(np.float32)[:, None]  # (T, 1)
    with StoreWriter(path, (T, n_vox), affine, mask.shape, list(HCP7), mask=mask) as w:
        for split, per_condition in splits.items():
            for c, condition in enumerate(HCP7):
                for k in range(per_condition):
                    y = rng.standard_normal((T, n_vox), dtype=np.float32) + response * patterns[c]  # (T, V)
                    w.add(y, subject=f"s{k % 10}", pe="LR" if k % 2 else "RL", run=k % 2, condition=condition,
                          label=c, onset_s=1.44, duration_s=12.0, tr=HCP_TR, split=split)


def full_scale(n_clips: int, workdir: Path) -> dict:
    grid = get_grid("2mm")
    mask = brain_mask(grid)
    t0 = time.perf_counter()
    write_store(workdir / "real", {"test": n_clips, "train": max(1, n_clips // 7)}, mask, grid.affine, 1)
    write_store(workdir / "gen", {"test": n_clips}, mask, grid.affine, 2)
    build = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "fmrisynth.cli", "evaluate", "--real", str(workdir / "real"),
           "--generated", str(workdir / "gen"), "--out", str(workdir / "eval")]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    return {"grid": "2mm", "voxels": int(mask.sum()), "frames": T, "conditions": len(HCP7),
            "clips_per_condition": n_clips, "n_real": metrics["n_real"], "n_generated": metrics["n_generated"],
            "build_stores_s": build, "evaluate_s": wall, "evaluate_cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_gib": usage.ru_maxrss / 2**20,  # ru_maxrss is in KiB on Linux
            "map_corr_mean": metrics["map_corr_mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=100, help="clips per condition at 2 mm")
    parser.add_argument("--workdir", type=Path, help="scratch space (about 15 GB at the default size)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    glm = [glm_speed(n, brain_mask(grid), grid.affine, rng) for n, grid in ((100, get_grid("6mm")), (16, get_grid("2mm")))]
    workdir = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        full = full_scale(args.clips, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for g in glm:
        print(f"GLM of {g['clips']} clips, T={T}, {g['voxels']:,} voxels    wall s  speedup   CPU s  speedup   t r")
        for name, label in (("batched", "fmrisynth batched GLM"), ("run_glm_loop", "nilearn run_glm per clip"),
                            ("first_level_model_loop", "nilearn FirstLevelModel per clip")):
            speed = [f"{g.get(f'{k}speedup_vs_{name}', 1):>7.1f}x" for k in ("", "cpu_")]
            r = f"{g[f't_map_r_{name}']:>8.4f}" if name != "batched" else ""
            print(f"  {label:<34}{g[f'{name}_s']:>7.2f}{speed[0]}{g[f'{name}_cpu_s']:>8.2f}{speed[1]}{r}")
    print(f"\nevaluate 2 mm, {full['conditions']} x {full['clips_per_condition']} real + generated clips, "
          f"{full['voxels']:,} voxels: {full['evaluate_s']:.1f} s wall ({full['evaluate_cpu_s']:.1f} s CPU), "
          f"peak RSS {full['peak_rss_gib']:.2f} GiB")
    out = Path(__file__).parent / "results" / "eval_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"glm": glm, "evaluate_2mm": full}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

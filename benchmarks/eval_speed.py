"""Evaluation speed: the batched GLM against per-clip nilearn loops, and whole v2 evaluations.

1. GLM at 6 mm (100 clips, the demo grid) and 2 mm (16 clips): the same clips fitted by
   ``fmrisynth.evaluate.glm`` (design + batched OLS) and by the loops a user would write with
   nilearn: per clip ``make_first_level_design_matrix`` + ``run_glm`` (OLS) + ``compute_contrast``,
   and per clip a ``FirstLevelModel`` on the in-memory image; the t maps are checked to agree.
2. The demo's evaluation: 6 mm, 288 real test clips against a sample directory of 288 generated
   clips (gzipped NIfTI + sidecars, as ``fmrisynth sample`` writes them), with the reference (288
   training clips of other subjects) and every realism figure. Goal: 60 s on 2 cores.
3. The docs/design.md scale: 2 mm (96x112x96, T=20, the MNI brain mask), 7 conditions x 100 real test
   clips, as many generated clips (a store) and as many reference clips. Goal: 3 min on 2 cores.

Evaluations run as ``fmrisynth evaluate`` in a subprocess (imports included): wall time, CPU time
and peak resident memory. Usage: ``python benchmarks/eval_speed.py [--clips 100] [--workdir DIR]
[--skip-glm]``; writes benchmarks/results/eval_speed.json (2 mm needs about 20 GB of scratch).
"""

from __future__ import annotations

import argparse
import json
import os
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
    """Seconds per clip: ours, nilearn's ``run_glm`` loop, and a ``FirstLevelModel`` loop (in-memory images).

    All three fit [task, intercept, linear drift], the design nilearn users reach for.
    """
    import nibabel as nib
    import pandas as pd
    from nilearn.glm import compute_contrast
    from nilearn.glm.first_level import FirstLevelModel, make_first_level_design_matrix, run_glm

    n_vox = int(mask.sum())
    onsets = rng.integers(0, 3, n_clips) * HCP_TR
    y = rng.standard_normal((n_clips, T, n_vox), dtype=np.float32)  # (N, T, V)
    events = [pd.DataFrame({"onset": [o], "duration": [12.0], "trial_type": ["task"]}) for o in onsets]

    def ours():
        return clip_glm(y, design_matrices(onsets, np.full(n_clips, 12.0), np.full(n_clips, HCP_TR), T, drift_order=1))[1]

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


def _clips(n_total: int, n_vox: int, seed: int):
    """(condition index, (T, V) clip) for ``n_total`` clips, conditions in turn: pattern x block response + noise.

    The noise of each clip is one of a few stored draws rolled by a random number of voxels:
    drawing 4.7 M normals per 2 mm clip would dominate building the stores, not the evaluation.
    """
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(0).standard_normal((len(HCP7), n_vox), dtype=np.float32)
    response = block_regressor([1.44], [12.0], T, HCP_TR).astype(np.float32)[:, None]  # (T, 1)
    pool = rng.standard_normal((4, T, n_vox), dtype=np.float32)
    for k in range(n_total):
        c = k % len(HCP7)
        yield c, np.roll(pool[k % 4], int(rng.integers(n_vox)), axis=1) + response * patterns[c]


def write_store(path: Path, splits: dict[str, int], grid, mask: np.ndarray, seed: int) -> None:
    """A clip store of the 7 HCP conditions; ``splits`` gives the number of clips per split."""
    meta = {"grid": grid.name}  # as `prepare` records it: an MNI grid, so FC uses the Glasser parcels
    with StoreWriter(path, (T, int(mask.sum())), grid.affine, mask.shape, list(HCP7), mask=mask, meta=meta) as w:
        for split, n_total in splits.items():
            for k, (c, y) in enumerate(_clips(n_total, int(mask.sum()), seed + len(split))):
                w.add(y, subject=f"{split}{k % 10}", pe="LR" if k % 2 else "RL", run=k % 2, condition=HCP7[c],
                      label=c, onset_s=1.44, duration_s=12.0, tr=HCP_TR, split=split)


def write_samples(root: Path, n_total: int, mask: np.ndarray, affine: np.ndarray, seed: int) -> None:
    """A dataset laid out as ``fmrisynth sample`` writes it (generate/bids.py): one float32
    (D, H, W, T) .nii.gz and a sidecar per clip, each clip its own subject."""
    import nibabel as nib

    from fmrisynth.generate.bids import condition_task, run_stem

    for k, (c, y) in enumerate(_clips(n_total, int(mask.sum()), seed)):
        stem = root / run_stem(f"synth{k:04d}", condition_task(HCP7[c]))
        stem.parent.mkdir(parents=True)
        vol = np.zeros(mask.shape + (T,), np.float32)
        vol[mask] = y.T
        nib.save(nib.Nifti1Image(vol, affine), f"{stem}_bold.nii.gz")
        sidecar = {"condition": HCP7[c], "onset_s": 1.44, "duration_s": 12.0, "tr": HCP_TR}
        Path(f"{stem}_bold.json").write_text(json.dumps(sidecar))


def timed_evaluate(real: str, generated: str, out: Path) -> dict:
    """``fmrisynth evaluate`` in a fresh process: wall and CPU seconds, peak RSS, the metrics."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fmrisynth.cli", "evaluate", "--real", real, "--generated", generated,
                           "--out", str(out)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"evaluate failed: {done.stderr.strip()}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = json.loads((out / "metrics.json").read_text())
    return {"evaluate_s": wall, "evaluate_cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "peak_rss_gib": after.ru_maxrss / 2**20,  # ru_maxrss is in KiB on Linux (the largest child so far)
            "n_real": m["n_real"], "n_generated": m["n_generated"], "n_reference": m["reference"]["n"],
            "map_corr_mean": m["map_corr_mean"], "c2st_accuracy": m["realism"]["c2st_accuracy"]}


def evaluation_speed(grid_name: str, n_real: int, workdir: Path, samples: bool) -> dict:
    """Build the stores (and a sample directory), then time one evaluation."""
    grid = get_grid(grid_name)
    mask = brain_mask(grid)
    t0 = time.perf_counter()
    write_store(workdir / "real", {"test": n_real, "train": n_real}, grid, mask, 1)
    if samples:
        write_samples(workdir / "gen", n_real, mask, grid.affine, 2)
    else:
        write_store(workdir / "gen", {"test": n_real}, grid, mask, 2)
    build = time.perf_counter() - t0
    result = timed_evaluate(f"{workdir / 'real'}:test", str(workdir / "gen"), workdir / "eval")
    return {"grid": grid_name, "voxels": int(mask.sum()), "frames": T, "conditions": len(HCP7),
            "generated_as": "sample directory" if samples else "store", "build_s": build, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=100, help="clips per condition at 2 mm")
    parser.add_argument("--workdir", type=Path, help="scratch space (about 20 GB at the default size)")
    parser.add_argument("--skip-glm", action="store_true", help="only the whole evaluations")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    glm = [] if args.skip_glm else [glm_speed(n, brain_mask(grid), grid.affine, rng)
                                    for n, grid in ((100, get_grid("6mm")), (16, get_grid("2mm")))]
    results = {"cpus": os.cpu_count(), "glm": glm}
    for key, grid, n, samples in (("evaluate_demo_6mm", "6mm", 288, True), ("evaluate_2mm", "2mm", 7 * args.clips, False)):
        workdir = Path(tempfile.mkdtemp(dir=args.workdir))
        try:
            results[key] = evaluation_speed(grid, n, workdir, samples)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    for g in glm:
        print(f"GLM of {g['clips']} clips, T={T}, {g['voxels']:,} voxels    wall s  speedup   CPU s  speedup   t r")
        for name, label in (("batched", "fmrisynth batched GLM"), ("run_glm_loop", "nilearn run_glm per clip"),
                            ("first_level_model_loop", "nilearn FirstLevelModel per clip")):
            speed = [f"{g.get(f'{k}speedup_vs_{name}', 1):>7.1f}x" for k in ("", "cpu_")]
            r = f"{g[f't_map_r_{name}']:>8.4f}" if name != "batched" else ""
            print(f"  {label:<34}{g[f'{name}_s']:>7.2f}{speed[0]}{g[f'{name}_cpu_s']:>8.2f}{speed[1]}{r}")
    for key, goal in (("evaluate_demo_6mm", 60), ("evaluate_2mm", 180)):
        e = results[key]
        print(f"evaluate {e['grid']}: {e['n_real']} real + {e['n_generated']} generated ({e['generated_as']}) + "
              f"{e['n_reference']} reference clips, {e['voxels']:,} voxels: {e['evaluate_s']:.1f} s wall "
              f"({e['evaluate_cpu_s']:.1f} s CPU; goal {goal} s), peak RSS {e['peak_rss_gib']:.2f} GiB")
    out = Path(__file__).parent / "results" / "eval_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

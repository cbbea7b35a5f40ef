"""Stage-1 quality and speed: does the VQ-GAN keep the task signal of held-out subjects?

On the held-out split of a clip store, every clip is encoded, quantised and decoded, and compared with
the original inside the brain mask:

* fidelity: spatial correlation per frame, temporal correlation per voxel, PSNR (peak = the clip's
  range), fraction of variance explained;
* codebook: perplexity and fraction of codes used over all held-out frames;
* task signal, the one that matters: per condition, the group GLM t map (docs/design.md protocol, via
  fmrisynth.evaluate.glm) of the reconstructions against that of the originals (goal r >= 0.95); for
  scale, the same correlation for originals blurred by half a voxel, and the real maps' own split-half
  reliability (held-out vs validation subjects): where the latter is low, voxel-level noise dominates
  the maps and no compressing autoencoder can reproduce it;
* speed: encode and decode throughput (volumes/s) and peak RSS at the demo grid and at 2 mm, each
  measured in a child process with random weights.

    .venv/bin/python benchmarks/vqgan_quality.py --store STORE --run RUN [--train-minutes 3] [--set k=v ...]

``--train-minutes`` first trains RUN (``fmrisynth train-vae`` without the latent store) within that
budget. Writes benchmarks/results/vqgan_quality.json and vqgan_quality_{maps,bars}.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _corr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of matching rows of a and b (n, k) -> (n,)."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-12)


def reconstruct(model, store, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Original and reconstructed in-mask clips (N, T, V), and the code index counts over all frames."""
    import torch

    originals, recons, counts = [], [], np.zeros(model.quantizer.size, np.int64)
    with torch.no_grad():
        for i in indices:
            x = torch.from_numpy(store.clip(int(i)))[:, None]  # (T, 1, D, H, W)
            quant, _, info = model.encode(x)
            recons.append(model.decode(quant)[:, 0].numpy()[:, store.mask])  # (T, V)
            originals.append(store.item(int(i)))
            counts += np.bincount(info["indices"].flatten().numpy(), minlength=len(counts))
    return np.stack(originals), np.stack(recons), counts


def group_maps(store, indices: np.ndarray, clips: np.ndarray, conditions: list[str]) -> np.ndarray:
    """Group one-sample t map per condition (C, V) of clips (N, T, V) with the manifest rows ``indices``."""
    from fmrisynth.evaluate.glm import GroupMap, clip_glm, design_matrices

    rows = store.manifest.iloc[indices]
    designs = design_matrices(rows["onset_s"].to_numpy(float), rows["duration_s"].to_numpy(float),
                              rows["tr"].to_numpy(float), clips.shape[1])  # fmt: skip
    beta, _ = clip_glm(clips, designs)  # (N, V)
    maps = []
    for c in conditions:
        g = GroupMap(clips.shape[2])
        g.add(beta[(rows["condition"] == c).to_numpy()])
        maps.append(g.t)
    return np.stack(maps)


def quality(run: Path, store_path: Path, split: str) -> tuple[dict, dict]:
    """Fidelity, codebook and GLM-map metrics on ``split``; also the arrays the figures need."""
    from fmrisynth.data.store import ClipStore
    from fmrisynth.generate.codec import load_vqgan

    store = ClipStore(store_path)
    model = load_vqgan(run, store.mask)
    held = store.indices(split=split)
    t0 = time.perf_counter()
    orig, recon, counts = reconstruct(model, store, held)
    seconds = time.perf_counter() - t0
    n, t, v = orig.shape
    frames_o, frames_r = orig.reshape(n * t, v), recon.reshape(n * t, v)
    voxel_r = _corr_rows(orig.transpose(0, 2, 1).reshape(n * v, t), recon.transpose(0, 2, 1).reshape(n * v, t))
    mse = ((orig - recon) ** 2).mean((1, 2))
    peak = orig.max((1, 2)) - orig.min((1, 2))
    probs = counts / counts.sum()
    conditions = [c for c in store.conditions if (store.manifest["condition"].iloc[held] == c).any()]
    maps_o = group_maps(store, held, orig, conditions)
    maps_r = group_maps(store, held, recon, conditions)
    map_r = _corr_rows(maps_o, maps_r)
    metrics = {
        "split": split, "n_clips": int(n), "frames": int(n * t), "reconstruct_s": round(seconds, 2),
        "frame_spatial_corr": float(_corr_rows(frames_o, frames_r).mean()),
        "voxel_temporal_corr": float(np.nanmean(voxel_r)),
        "psnr_db": float(np.mean(10 * np.log10(peak**2 / mse))),
        "variance_explained": float(1 - ((orig - recon) ** 2).sum() / ((orig - orig.mean()) ** 2).sum()),
        "codebook": {"size": int(len(counts)), "used": float((counts > 0).mean()),
                     "perplexity": float(np.exp(-(probs[probs > 0] * np.log(probs[probs > 0])).sum()))},
        "map_corr": dict(zip(conditions, map(float, map_r))),
        "map_corr_mean": float(map_r.mean()),
        "map_corr_min": float(map_r.min()),
    }  # fmt: skip
    # Scale for map_corr: the same maps after blurring the originals by half a voxel (sigma), which
    # keeps all smooth signal and loses only the finest, voxel-level noise.
    from scipy.ndimage import gaussian_filter

    blurred = np.stack([gaussian_filter(store.unmask(y), sigma=(0, 0.5, 0.5, 0.5))[:, store.mask] for y in orig])
    metrics["blur_half_voxel_map_corr"] = dict(zip(conditions, map(float, _corr_rows(maps_o, group_maps(store, held, blurred, conditions)))))
    other = "val" if split != "val" else "train"
    if len(store.indices(split=other)):
        ref = store.indices(split=other)
        maps_other = group_maps(store, ref, np.stack([store.item(int(i)) for i in ref]), conditions)
        metrics["real_split_half_map_corr"] = dict(zip(conditions, map(float, _corr_rows(maps_o, maps_other))))
    arrays = {"store": store, "orig": orig, "recon": recon, "maps_o": maps_o, "maps_r": maps_r, "conditions": conditions}
    return metrics, arrays


def figures(metrics: dict, a: dict, prefix: Path) -> list[str]:
    """An axial slice of one frame and of every condition's map (original above, reconstruction below); bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store, conds = a["store"], a["conditions"]
    z = store.grid_shape[2] // 2 + 3
    panels = [("frame", a["orig"][0, 10], a["recon"][0, 10])] + [
        (c.split(":")[0], mo, mr) for c, mo, mr in zip(conds, a["maps_o"], a["maps_r"])
    ]
    fig, axes = plt.subplots(2, len(panels), figsize=(2.0 * len(panels), 4.4))
    for j, (name, o, r) in enumerate(panels):
        lim = np.abs(o).max()
        for i, vol in enumerate((o, r)):
            ax = axes[i, j]
            ax.imshow(np.rot90(store.unmask(vol)[:, :, z]), cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks([]), ax.set_yticks([])
        axes[0, j].set_title(name if j == 0 else f"{name}\nr={metrics['map_corr'][conds[j - 1]]:.3f}", fontsize=8)
    axes[0, 0].set_ylabel("original"), axes[1, 0].set_ylabel("VQ-GAN")
    fig.tight_layout()
    maps_png = prefix.with_name(prefix.name + "_maps.png")
    fig.savefig(maps_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    x = np.arange(len(conds))
    ax.bar(x - 0.2, [metrics["map_corr"][c] for c in conds], 0.4, label="reconstruction vs original")
    if "real_split_half_map_corr" in metrics:
        ax.bar(x + 0.2, [metrics["real_split_half_map_corr"][c] for c in conds], 0.4, label="real: test vs val subjects")
    ax.axhline(0.95, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, [c.replace(":", "\n") for c in conds], fontsize=7)
    ax.set_ylabel("GLM t-map correlation"), ax.set_ylim(0, 1), ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    bars_png = prefix.with_name(prefix.name + "_bars.png")
    fig.savefig(bars_png, dpi=110)
    plt.close(fig)
    return [str(maps_png), str(bars_png)]


def _speed_child(grid: str, preset: str, batch: int, repeats: int) -> dict:
    """Encode/decode volumes/s and peak RSS at a grid, random weights, no grad (runs in a child process)."""
    import torch

    from fmrisynth.config import VQGANConfig
    from fmrisynth.data.grid import brain_mask, get_grid
    from fmrisynth.models.vqgan import VQGAN

    model = VQGAN(VQGANConfig(preset=preset), brain_mask(get_grid(grid))).eval()
    x = torch.randn(batch, 1, *model.grid_shape) * model.mask
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"grid": grid, "shape": list(model.grid_shape), "preset": preset, "batch": batch, "threads": torch.get_num_threads()}
    with torch.no_grad():
        z = model.encode(x)[0]
        model.decode(z)  # warm-up
        for name, fn, arg in (("encode", lambda v: model.encode(v)[0], x), ("decode", model.decode, z)):
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn(arg)
            out[f"{name}_vol_per_s"] = round(batch * repeats / (time.perf_counter() - t0), 2)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["rss_before_model_run_mb"] = round(rss0)
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def speed(grids: list[str], preset: str) -> list[dict]:
    rows = []
    for grid in grids:
        batch, repeats = (16, 3) if grid == "6mm" else (2, 2)
        code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import vqgan_quality as q; " \
               f"print(json.dumps(q._speed_child({grid!r}, {preset!r}, {batch}, {repeats})))"  # fmt: skip
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True, help="clip store (held-out split measured)")
    ap.add_argument("--run", type=Path, required=True, help="train-vae run directory")
    ap.add_argument("--split", default="test")
    ap.add_argument("--train-minutes", type=float, help="train RUN first, within this wall-clock budget")
    ap.add_argument("--set", action="append", default=[], help="config override for training, e.g. vae.codebook_size=256")
    ap.add_argument("--speed-grids", default="6mm,2mm", help="grids for throughput ('' to skip)")
    ap.add_argument("--out", type=Path, default=RESULTS / "vqgan_quality.json")
    args = ap.parse_args()

    from fmrisynth.checkpoint import load_checkpoint
    from fmrisynth.config import load_config, to_dict
    from fmrisynth.generate.codec import load_vqgan
    from fmrisynth.training.vqgan import train_vae
    from fmrisynth.training.run_log import read_log

    result: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    if args.train_minutes:
        cfg = load_config(None, [f"vae_train.max_minutes={args.train_minutes}", *args.set])
        t0 = time.perf_counter()
        train_vae(cfg, args.store, args.run, progress=False)
        result["train_wall_s"] = round(time.perf_counter() - t0, 1)
    log = read_log(args.run)
    model = load_vqgan(args.run)
    result["train"] = {"steps": log[-1]["step"], "first": log[0], "last": log[-1]}
    result["config"] = to_dict(load_checkpoint(args.run).config)["vae"]
    result["params"] = sum(p.numel() for p in model.parameters())
    metrics, arrays = quality(args.run, args.store, args.split)
    result["quality"] = metrics
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result["figures"] = figures(metrics, arrays, args.out.with_suffix(""))
    grids = [g for g in args.speed_grids.split(",") if g]
    result["speed"] = speed(grids, result["config"]["preset"]) if grids else []
    args.out.write_text(json.dumps(result, indent=1))

    q = metrics
    print(f"{args.run}: {result['train']['steps']} steps, {result['params']:,} params; {q['n_clips']} {args.split} clips")
    print(f"frame r {q['frame_spatial_corr']:.3f}  voxel r {q['voxel_temporal_corr']:.3f}  PSNR {q['psnr_db']:.1f} dB  "
          f"R² {q['variance_explained']:.3f}  codes used {q['codebook']['used']:.2f}  perplexity {q['codebook']['perplexity']:.0f}")
    for c, r in q["map_corr"].items():
        ref = q.get("real_split_half_map_corr", {}).get(c, float("nan"))
        blur = q["blur_half_voxel_map_corr"][c]
        print(f"  {c:22s} map r {r:.3f}   (half-voxel blur {blur:.3f}, real split-half {ref:.3f})")
    print(f"  mean {q['map_corr_mean']:.3f}  min {q['map_corr_min']:.3f}")
    for s in result["speed"]:
        print(f"speed {s['grid']} {s['shape']} {s['preset']}: encode {s['encode_vol_per_s']} vol/s, "
              f"decode {s['decode_vol_per_s']} vol/s, peak RSS {s['peak_rss_mb']} MB ({s['threads']} threads)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

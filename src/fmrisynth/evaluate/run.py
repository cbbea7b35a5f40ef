"""``fmrisynth evaluate``: the whole protocol of DESIGN.md on a real and a generated clip set.

Memory stays bounded by streaming: each clip is read once, fitted by the batched GLM and folded
into running sums (group beta statistics, the mean clip per condition for ROI time courses, the
clip-level top-1 tally); of each clip only a fixed random subset of voxels is kept, for the PCA of
frames and the memorisation check. Real clips go first, because the generated pass needs the real
maps (clip-level top-1). Outputs are written to a temporary sibling directory that replaces
``out`` only when everything succeeded:

    metrics.json   the DESIGN.md keys plus per-condition detail
    maps/          real and generated group t maps per condition (NIfTI, the real store's grid)
    arrays.npz     what the report plots: RDMs, ROI time courses, PCA coordinates, confusion
    config.yaml    the resolved config
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmrisynth.config import Config, EvalConfig, save_config
from fmrisynth.errors import FmrisynthError
from fmrisynth.evaluate import metrics as M
from fmrisynth.evaluate.clips import ClipSet, open_generated, open_real, read_item
from fmrisynth.evaluate.glm import GroupMap, clip_glm, design_matrices

NO_TASK = {"rest"}  # clips without a task block have no activation map


@dataclass
class Pass:
    """What one streaming pass over a clip set leaves behind (C conditions, V voxels, F sampled)."""

    rows: np.ndarray  # (n,) table rows of the clips used
    labels: np.ndarray  # (n,) their condition index
    maps: list[list[GroupMap]]  # [half][condition] running beta statistics
    clip_mean: np.ndarray  # (C, T, V) mean clip per condition, for ROI time courses
    prediction: np.ndarray  # (C, T) mean task regressor: the canonical HRF prediction
    onset_s: np.ndarray  # (C,) mean block onset within the clip
    tr: np.ndarray  # (C,) mean TR
    features: np.ndarray  # (n, T, F) the sampled voxels of every clip
    assigned: np.ndarray  # (n,) clip-level top-1 assignment (when reference maps were given)

    def group_t(self, half: int | None = None) -> np.ndarray:
        """(C, V) group t maps of all clips, or of one half."""
        halves = self.maps if half is None else [self.maps[half]]
        return np.stack([GroupMap.combine([h[c] for h in halves]).t for c in range(len(self.maps[0]))])


def _stream(clips: ClipSet, conditions: list[str], ecfg: EvalConfig, n_vox: int, voxels: np.ndarray,
            halves: np.ndarray | None = None, references: np.ndarray | None = None) -> Pass:
    """One pass over the clips of ``conditions``: GLM, running sums, sampled voxels, top-1.

    ``halves`` (0 or 1 per table row) splits the group statistics for the noise ceiling;
    ``references`` (C, V) are the maps each clip's beta map is assigned to (clip-level top-1).
    """
    table = clips.table
    index = table["condition"].map({c: i for i, c in enumerate(conditions)})
    rows = np.flatnonzero(index.notna().to_numpy())
    labels = index.to_numpy()[rows].astype(int)
    halves = np.zeros(len(table), int) if halves is None else halves
    n_cond, n_frames = len(conditions), clips.n_frames
    maps = [[GroupMap(n_vox) for _ in conditions] for _ in range(2)]
    clip_sum = np.zeros((n_cond, n_frames, n_vox), np.float32)
    prediction = np.zeros((n_cond, n_frames))
    features = np.empty((len(rows), n_frames, len(voxels)), np.float32)
    assigned = np.full(len(rows), -1)
    for start, (batch, y) in zip(range(0, len(rows), ecfg.batch_clips), clips.batches(rows, ecfg.batch_clips)):
        sub, lab = table.iloc[batch], labels[start : start + len(batch)]
        designs = design_matrices(sub["onset_s"].to_numpy(), sub["duration_s"].to_numpy(), sub["tr"].to_numpy(),
                                  n_frames, ecfg.hrf, ecfg.drift_order)  # (b, T, p)
        beta, _ = clip_glm(y, designs)  # (b, V)
        for c, h in set(zip(lab, halves[batch])):
            maps[h][c].add(beta[(lab == c) & (halves[batch] == h)])
        for k, c in enumerate(lab):  # clip by clip: no batch-sized temporaries
            clip_sum[c] += y[k]
            prediction[c] += designs[k, :, 0]
        features[start : start + len(batch)] = y[:, :, voxels]
        if references is not None:
            assigned[start : start + len(batch)] = M.top1(references, beta, lab)[1]
    counts = np.bincount(labels, minlength=n_cond)
    per_clip = lambda column: np.bincount(labels, table[column].to_numpy()[rows], n_cond) / counts  # noqa: E731
    return Pass(rows, labels, maps, clip_sum / counts[:, None, None], prediction / counts[:, None],
                per_clip("onset_s"), per_clip("tr"), features, assigned)


def _halves(table) -> tuple[np.ndarray, str]:
    """Two disjoint halves of the real clips for the noise ceiling: by subject, else run, else clip."""
    for column in ("subject", "run"):
        levels = sorted(set(table[column]) - {""})
        if len(levels) >= 2:
            half_of = {level: i % 2 for i, level in enumerate(levels)}
            return table[column].map(half_of).fillna(0).to_numpy().astype(int), column
    return table.groupby("condition").cumcount().to_numpy() % 2, "clip"


def _map_metrics(real: np.ndarray, gen: np.ndarray) -> dict:
    """Map correlation, RSA and map-level top-1 between two (C, V) sets of condition maps."""
    corr = M.map_corr(real, gen)
    rdm_real, rdm_gen = M.rdm(real), M.rdm(gen)
    return {"map_corr_mean": float(np.nanmean(corr)) if np.isfinite(corr).any() else math.nan,
            "map_corr": corr, "rsa": M.rsa(rdm_real, rdm_gen), "top1_map": M.top1(real, gen, np.arange(len(real)))[0],
            "rdm_real": rdm_real, "rdm_generated": rdm_gen}


def _timecourses(real: Pass, gen: Pass, real_maps: np.ndarray, fraction: float) -> tuple[dict, dict]:
    """ROI = top voxels of the real map; mean time courses vs each other and vs the HRF prediction."""
    detail, arrays = {}, {k: [] for k in ("tc_real", "tc_generated", "hrf_real", "hrf_generated")}
    for c, real_map in enumerate(real_maps):
        roi = M.roi(real_map, fraction)
        tc = {"real": real.clip_mean[c][:, roi].mean(1), "generated": gen.clip_mean[c][:, roi].mean(1)}  # (T,)
        hrf = {"real": real.prediction[c], "generated": gen.prediction[c]}
        src = {"real": real, "generated": gen}
        detail[c] = {
            "corr_generated_real": M.pearson(tc["generated"], tc["real"]),
            **{f"corr_{k}_hrf": M.pearson(tc[k], hrf[k]) for k in tc},
            **{f"peak_s_{k}": M.peak_latency(tc[k], src[k].tr[c], src[k].onset_s[c]) for k in tc},
            "peak_s_hrf": M.peak_latency(hrf["real"], real.tr[c], real.onset_s[c]),
            "roi_voxels": int(roi.sum()),
        }
        for k in tc:
            arrays[f"tc_{k}"].append(tc[k])
            arrays[f"hrf_{k}"].append(hrf[k])
    return detail, {k: np.stack(v) for k, v in arrays.items()}


def _memorisation(store, gen: Pass, heldout: Pass, conditions: list[str], voxels: np.ndarray,
                  seed: int, margin: float) -> dict:
    """Nearest-neighbour r of generated clips to training clips vs to held-out clips.

    The training clips are subsampled to the number of held-out clips, so that both maxima are
    taken over the same number of candidates (a maximum over more clips is higher by chance alone).
    """
    train = np.concatenate([store.indices(split="train", condition=c) for c in conditions])
    if len(train) == 0:
        return {"train_nn_corr": None, "heldout_nn_corr": None, "flagged": None, "n_train": 0}
    rng = np.random.default_rng(seed)
    train = np.sort(rng.choice(train, size=min(len(train), len(heldout.features)), replace=False))
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731  (n, T, F) -> (n, T * F)
    train_feats = np.stack([read_item(store, i)[:, voxels] for i in train])  # (n_train, T, F)
    train_nn = float(M.nearest_corr(flat(gen.features), flat(train_feats)).mean())
    heldout_nn = float(M.nearest_corr(flat(gen.features), flat(heldout.features)).mean())
    return {"train_nn_corr": train_nn, "heldout_nn_corr": heldout_nn,
            "flagged": bool(train_nn - heldout_nn > margin), "n_train": len(train)}


def _pca(real: Pass, gen: Pass, real_table, gen_table, ecfg: EvalConfig, seed: int) -> tuple[dict, dict]:
    """PCA of real frames (sampled voxels); variance between subjects, phase encodings and tasks."""
    from sklearn.decomposition import PCA

    n_frames = real.features.shape[1]
    x_real = real.features.reshape(-1, real.features.shape[2])  # (n * T, F)
    k = max(1, min(ecfg.pca_components, *x_real.shape))
    pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(x_real)
    z = {"real": pca.transform(x_real), "generated": pca.transform(gen.features.reshape(-1, x_real.shape[1]))}
    labels = {("real", f): np.repeat(real_table[col].to_numpy(dtype=str)[real.rows], n_frames)
              for f, col in (("subject", "subject"), ("pe", "pe"), ("task", "condition"))}
    labels["generated", "task"] = np.repeat(gen_table["condition"].to_numpy(dtype=str)[gen.rows], n_frames)
    explained = {"real": {}, "generated": {}}
    for (which, factor), groups in labels.items():
        explained[which][factor] = M.variance_explained(z[which], groups) if len(set(groups)) > 1 else None
    rng = np.random.default_rng(seed)
    arrays = {}
    for which in z:  # a random subset of frames is kept for the report's scatter plots
        keep = np.sort(rng.permutation(len(z[which]))[: ecfg.plot_frames])
        arrays[f"pca_{which}"] = z[which][keep, :2]
        for (w, factor), groups in labels.items():
            if w == which:
                arrays[f"pca_{which}_{factor}"] = groups[keep]
    return {**explained, "explained_variance_ratio": pca.explained_variance_ratio_.tolist()}, arrays


def _json_safe(x):
    """NaN -> None, numpy scalars and arrays -> Python, so that metrics.json is strict JSON."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def map_name(kind: str, condition: str) -> str:
    return f"maps/{kind}_{re.sub(r'[^A-Za-z0-9.-]+', '-', condition)}_t.nii.gz"


def evaluate(real: str, generated: str | Path, out: str | Path, cfg: Config) -> dict:
    """Evaluate generated clips against real ones; write ``out`` (see module docstring).

    Args:
        real: ``STORE[:split]``; the split (default ``cfg.eval.split``) holds the held-out clips and
            the store's ``train`` split is what memorisation compares against.
        generated: a ``fmrisynth sample`` directory, or ``STORE[:split]`` (e.g. real-vs-real).
        out: the output directory (replaced if it holds an earlier evaluation).

    Returns:
        The metrics written to ``out/metrics.json``.
    """
    import nibabel as nib

    out, ecfg = Path(out), cfg.eval
    if out.exists() and any(out.iterdir()) and not (out / "metrics.json").is_file():
        raise FmrisynthError("output directory exists and is not an evaluation; choose another --out", out)
    store, real_set = open_real(real, ecfg.split)
    gen_set = open_generated(generated, store, real_set.n_frames)
    conditions = [c for c in store.conditions if c in set(gen_set.table["condition"]) - NO_TASK]
    if not conditions:
        raise FmrisynthError("no task condition among the generated clips", gen_set.sources[0])
    for c in conditions:
        if not (real_set.table["condition"] == c).any():
            raise FmrisynthError(f"condition {c!r} has generated clips but no real clips in {real_set.name}", store.path)

    n_vox = int(store.mask.sum())
    voxels = np.sort(np.random.default_rng(cfg.seed).choice(n_vox, min(n_vox, ecfg.feature_voxels), replace=False))
    halves, split_by = _halves(real_set.table)
    real_pass = _stream(real_set, conditions, ecfg, n_vox, voxels, halves=halves)
    real_maps = real_pass.group_t()  # (C, V)
    gen_pass = _stream(gen_set, conditions, ecfg, n_vox, voxels, references=real_maps)
    gen_maps = gen_pass.group_t()

    main = _map_metrics(real_maps, gen_maps)
    ceiling = _map_metrics(real_pass.group_t(0), real_pass.group_t(1))
    hrf, tc_arrays = _timecourses(real_pass, gen_pass, real_maps, ecfg.roi_fraction)
    pca, pca_arrays = _pca(real_pass, gen_pass, real_set.table, gen_set.table, ecfg, cfg.seed)
    confusion = np.zeros((len(conditions),) * 2, int)
    np.add.at(confusion, (gen_pass.labels, gen_pass.assigned), 1)
    hrf_corr = [d["corr_generated_hrf"] for d in hrf.values()]
    result = {
        "map_corr_mean": main["map_corr_mean"],
        "map_corr": dict(zip(conditions, main["map_corr"])),
        "rsa": main["rsa"],
        "top1_map": main["top1_map"],
        "top1_clip": float(np.mean(gen_pass.assigned == gen_pass.labels)),
        "hrf_corr_mean": float(np.nanmean(hrf_corr)) if np.isfinite(hrf_corr).any() else None,
        "hrf_corr_real_mean": float(np.nanmean([d["corr_real_hrf"] for d in hrf.values()])),
        "ceiling": {"map_corr_mean": ceiling["map_corr_mean"], "rsa": ceiling["rsa"], "top1_map": ceiling["top1_map"],
                    "map_corr": dict(zip(conditions, ceiling["map_corr"])), "split_by": split_by,
                    "n_halves": np.bincount(halves[real_pass.rows], minlength=2).tolist()},
        "memorisation": _memorisation(store, gen_pass, real_pass, conditions, voxels, cfg.seed, ecfg.memorisation_margin),
        "hrf": {conditions[c]: d for c, d in hrf.items()},
        "roi_fraction": ecfg.roi_fraction,
        "pca": pca,
        "n_real": len(real_pass.rows),
        "n_generated": len(gen_pass.rows),
        "n_per_condition": {c: {"real": int(np.sum(real_pass.labels == i)), "generated": int(np.sum(gen_pass.labels == i))}
                            for i, c in enumerate(conditions)},
        "conditions": conditions,
        "real": str(real),
        "generated": str(generated),
        "maps": {c: {k: map_name(k, c) for k in ("real", "generated")} for c in conditions},
    }
    result = _json_safe(result)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "maps").mkdir(parents=True)
        for kind, maps in (("real", real_maps), ("generated", gen_maps)):
            for c, m in zip(conditions, maps):
                nib.save(nib.Nifti1Image(store.unmask(m.astype(np.float32)), store.affine), tmp / map_name(kind, c))
        np.savez_compressed(
            tmp / "arrays.npz", conditions=np.array(conditions), confusion=confusion, tr=real_pass.tr,
            onset_real=real_pass.onset_s, onset_generated=gen_pass.onset_s, rdm_real=main["rdm_real"],
            rdm_generated=main["rdm_generated"], **tc_arrays, **{k: np.asarray(v) for k, v in pca_arrays.items()},
        )
        save_config(cfg, tmp / "config.yaml")
        (tmp / "metrics.json").write_text(json.dumps(result, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result

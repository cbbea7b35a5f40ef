"""One streaming pass over a clip set, and the task metrics of two passes (docs/design.md steps 1-2).

Every clip set of an evaluation (real test, generated, reference, codec) goes through ``stream``
with the same ``Probe``: each clip is read once, fitted by the batched GLM and folded into running
sums (group beta statistics, the mean clip per condition for ROI time courses, the clip-level top-1
tally, the realism sums); of each clip only a fixed random subset of voxels is kept, for the PCA,
the memorisation check, the voxel-level realism statistics and the classifier two-sample test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fmrisynth.config import EvalConfig
from fmrisynth.evaluate import metrics as M
from fmrisynth.evaluate.clips import ClipSet
from fmrisynth.evaluate.glm import GroupMap, clip_glm, design_matrices
from fmrisynth.evaluate.realism import Probe, Realism


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
    realism: dict  # Realism.summary of the set

    def group_t(self, half: int | None = None) -> np.ndarray:
        """(C, V) group t maps of all clips, or of one half."""
        halves = self.maps if half is None else [self.maps[half]]
        return np.stack([GroupMap.combine([h[c] for h in halves]).t for c in range(len(self.maps[0]))])


def stream(clips: ClipSet, conditions: list[str], ecfg: EvalConfig, n_vox: int, voxels: np.ndarray, probe: Probe,
           halves: np.ndarray | None = None, references: np.ndarray | None = None) -> Pass:
    """One pass over the clips of ``conditions``: GLM, running sums, sampled voxels, top-1, realism.

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
    realism = Realism(probe)
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
        realism.add(y)
        if references is not None:
            assigned[start : start + len(batch)] = M.top1(references, beta, lab)[1]
    counts = np.maximum(np.bincount(labels, minlength=n_cond), 1)
    per_clip = lambda column: np.bincount(labels, table[column].to_numpy()[rows], n_cond) / counts  # noqa: E731
    return Pass(rows, labels, maps, clip_sum / counts[:, None, None], prediction / counts[:, None],
                per_clip("onset_s"), per_clip("tr"), features, assigned, realism.summary(features))


def halves(table) -> tuple[np.ndarray, str]:
    """Two disjoint halves of the real clips for the noise ceiling: by subject, else run, else clip."""
    for column in ("subject", "run"):
        levels = sorted(set(table[column]) - {""})
        if len(levels) >= 2:
            half_of = {level: i % 2 for i, level in enumerate(levels)}
            return table[column].map(half_of).fillna(0).to_numpy().astype(int), column
    return table.groupby("condition").cumcount().to_numpy() % 2, "clip"


def _mean(values) -> float:
    values = np.asarray(values, float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def map_metrics(real: np.ndarray, other: np.ndarray) -> dict:
    """Map correlation, RSA and map-level top-1 between two (C, V) sets of condition maps."""
    corr = M.map_corr(real, other)
    rdm_real, rdm_other = M.rdm(real), M.rdm(other)
    return {"map_corr_mean": _mean(corr), "map_corr": corr, "rsa": M.rsa(rdm_real, rdm_other),
            "top1_map": M.top1(real, other, np.arange(len(real)))[0], "rdm_real": rdm_real, "rdm_other": rdm_other}


def task_metrics(real: Pass, other: Pass, real_maps: np.ndarray, conditions: list[str], fraction: float) -> dict:
    """Everything the headline table holds for ``other`` judged against the real test set."""
    main = map_metrics(real_maps, other.group_t())
    hrf = [M.pearson(other.clip_mean[c][:, M.roi(m, fraction)].mean(1), other.prediction[c])
           for c, m in enumerate(real_maps)]
    return {"map_corr_mean": main["map_corr_mean"], "map_corr": dict(zip(conditions, main["map_corr"])),
            "rsa": main["rsa"], "top1_map": main["top1_map"], "top1_clip": float(np.mean(other.assigned == other.labels)),
            "hrf_corr_mean": _mean(hrf), "n": len(other.rows)}


def timecourses(real: Pass, gen: Pass, real_maps: np.ndarray, fraction: float) -> tuple[dict, dict]:
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

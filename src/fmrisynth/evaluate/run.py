"""``fmrisynth evaluate``: the whole protocol of docs/design.md on a real and a generated clip set.

The real test clips go first (every other set is judged against their maps), then the generated
clips, then the yardsticks computed by the same code (``references``): real clips of other people,
the VQ-GAN's reconstructions of those, and on simulated data the simulator's true maps. Memory
stays bounded by streaming (``passes``). Outputs are staged beside ``out`` and published only when
everything succeeded; in an existing folder they replace their namesakes and nothing else:

    metrics.json   the docs/design.md keys plus per-condition detail
    maps/          real and generated group t maps per condition (NIfTI, the real store's grid)
    arrays.npz     what the report plots: RDMs, ROI time courses, PCA coordinates, confusion, FC
    config.yaml    the resolved config
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmrisynth.config import Config, EvalConfig, save_config
from fmrisynth.errors import FmrisynthError
from fmrisynth.evaluate import metrics as M
from fmrisynth.evaluate.clips import ClipSet, open_generated, open_real, split_spec
from fmrisynth.evaluate.memorisation import memorisation, train_features
from fmrisynth.evaluate.passes import Pass, halves, map_metrics, stream, task_metrics, timecourses
from fmrisynth.evaluate.realism import (MIN_C2ST_CLIPS, between_clip_ratio, c2st, compare, make_probe,
                                        mean_clip_distance, two_sample_tests)
from fmrisynth.evaluate.references import codec_set, reference_set, truth_maps
from fmrisynth.publish import staged

NO_TASK = {"rest"}  # clips without a task block have no activation map
MIN_RSA_CONDITIONS = 3  # an RDM of C conditions has C(C-1)/2 pairs; a correlation of fewer than 3 means nothing
UNITS = {"zscore": "z (voxel sd over the run)", "psc": "% signal change", "none": "scanner units"}
V3_KEYS = ("c2st_quadratic", "c2st_quadratic_ci", "c2st_stats", "c2st_stats_ci", "between_clip_variance_ratio",
           "mean_clip_diff")  # realism figures of evaluation v3, each with a _reference twin


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


def _realism(real: Pass, gen: Pass, ref: Pass | None, ecfg: EvalConfig, seed: int, parcellation: str) -> tuple[dict, dict]:
    """Realism of the generated clips against the real test set, and of the reference as yardstick.

    Returns the ``realism`` figures and {figure: reason} for those not computed (too few clips).
    """
    real_between = between_clip_ratio(real.features, real.labels)

    def v3(p: Pass | None) -> dict:  # evaluation v3's figures of one set against the real test set
        if p is None:
            return dict.fromkeys(("c2st", "c2st_ci", *V3_KEYS))
        t = two_sample_tests(real.features, p.features, seed, ecfg.c2st_components, ecfg.c2st_folds)
        return {"c2st": t["linear"][0], "c2st_ci": t["linear"][1],
                "c2st_quadratic": t["quadratic"][0], "c2st_quadratic_ci": t["quadratic"][1],
                "c2st_stats": t["stats"][0], "c2st_stats_ci": t["stats"][1],
                "between_clip_variance_ratio": between_clip_ratio(p.features, p.labels) / real_between,
                "mean_clip_diff": mean_clip_distance(real.clip_mean, p.clip_mean, real.realism["variance"])}

    g, gv = compare(real.realism, gen.realism), v3(gen)
    out = {"variance_ratio": g["variance_ratio"], "global_signal_ratio": g["global_signal_ratio"],
           "autocorr_real": real.realism["autocorr"], "autocorr_generated": g["autocorr"],
           "autocorr_max_diff": g["autocorr_max_diff"], "fwhm_real_mm": real.realism["fwhm_mm"],
           "fwhm_generated_mm": g["fwhm_mm"], "fc_corr": g["fc_corr"], "c2st_accuracy": gv["c2st"],
           "c2st_accuracy_ci": gv["c2st_ci"], **{k: gv[k] for k in V3_KEYS}, "between_clip_variance_real": real_between}
    r, rv = compare(real.realism, ref.realism) if ref is not None else dict.fromkeys(g), v3(ref)
    out.update({"fc_corr_reference": r["fc_corr"], "c2st_reference": rv["c2st"], "c2st_reference_ci": rv["c2st_ci"],
                **{_twin(k): rv[k] for k in V3_KEYS},
                "variance_ratio_reference": r["variance_ratio"], "global_signal_ratio_reference": r["global_signal_ratio"],
                "autocorr_reference": r["autocorr"], "autocorr_max_diff_reference": r["autocorr_max_diff"],
                "fwhm_reference_mm": r["fwhm_mm"], "parcellation": parcellation,
                "fwhm_axes_mm": {k: p.realism["fwhm_axes_mm"] for k, p in (("real", real), ("generated", gen), ("reference", ref))
                                 if p is not None}})
    not_computed = {}
    for name, p, keys in (("generated", gen, ("c2st_accuracy", "c2st_quadratic", "c2st_stats")),
                          ("reference", ref, ("c2st_reference", "c2st_quadratic_reference", "c2st_stats_reference"))):
        n = None if p is None else min(len(real.rows), len(p.rows))
        if n is not None and n < MIN_C2ST_CLIPS:
            reason = f"C2ST ({name}) not computed: {n} clips, fewer than the {MIN_C2ST_CLIPS} per set it needs"
            not_computed.update({f"realism.{k}": reason for k in keys})
    return out, not_computed


def _twin(key: str) -> str:
    """The reference's name for a figure: c2st_stats -> c2st_stats_reference, c2st_stats_ci -> c2st_stats_reference_ci."""
    return f"{key[:-3]}_reference_ci" if key.endswith("_ci") else f"{key}_reference"


def _vs_truth(truth: np.ndarray, p: Pass, conditions: list[str]) -> dict:
    """Map r of a set's group t maps against the simulator's true condition maps (C, V)."""
    corr = M.map_corr(truth, p.group_t())
    return {"map_corr_mean": float(np.nanmean(corr)) if np.isfinite(corr).any() else None,
            "map_corr": dict(zip(conditions, corr))}


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


@dataclass
class _Yardsticks:
    """What the generated clips are judged beside: real clips of other people (``reference``), their
    codec reconstructions (``codec``) and the simulator's true maps (``truth``, (C, V)), each with where
    it came from; None where there is none, and ``notes`` on why."""

    reference: ClipSet | None
    reference_info: dict
    codec: ClipSet | None
    codec_source: str
    truth: np.ndarray | None
    truth_source: str
    notes: list[str]


def _yardsticks(store, real_set, gen_set, conditions: list[str], ref_spec: str, default: bool, cfg: Config) -> _Yardsticks:
    """The reference clips, their codec reconstructions and the truth maps, and notes on those that
    cannot be had (a missing default reference is a note, not an error)."""
    notes = []
    counts = {c: int((gen_set.table["condition"] == c).sum()) for c in conditions}
    try:
        ref_set, ref_info = reference_set(ref_spec, store, real_set, counts, cfg.seed)
    except FmrisynthError as e:
        if not default:
            raise
        ref_set, ref_info = None, {}
        notes.append(f"no reference: {e}")
    if ref_set is None or not cfg.eval.codec:
        codec, codec_source = None, "no reference clips" if ref_set is None else "eval.codec is off"
    else:
        codec, codec_source = codec_set(gen_set, ref_set, store)
    if codec is None:
        notes.append(f"no codec reference: {codec_source}")
    truth, truth_source = truth_maps(store, conditions)
    if truth is None:
        notes.append(f"no truth: {truth_source}")
    return _Yardsticks(ref_set, ref_info, codec, codec_source, truth, truth_source, notes)


@dataclass
class _Passes:
    """One streamed pass (``passes.stream``) over each set of an evaluation; reference and codec are
    None where there are none."""

    real: Pass
    generated: Pass
    reference: Pass | None
    codec: Pass | None
    maps: dict[str, np.ndarray]  # group t maps (C, V) written to maps/: real, generated, reference if any
    voxels: np.ndarray  # (F,) the sampled voxels of every pass's features
    parcellation: str  # of the realism probe
    split_of: np.ndarray  # (n,) the half (0 or 1) of each real table row, for the noise ceiling
    split_by: str


def evaluate(real: str, generated: str | Path, out: str | Path, cfg: Config, reference: str | None = None) -> dict:
    """Evaluate generated clips against real ones, beside the references; write ``out``.

    Args:
        real: ``STORE[:split]``; the split (default ``cfg.eval.split``) holds the held-out clips and
            the store's ``train`` split is what memorisation compares against.
        generated: a ``fmrisynth sample`` directory, or ``STORE[:split]`` (e.g. real-vs-real).
        out: the output directory (replaced if it holds an earlier evaluation).
        reference: ``STORE:split`` of real clips of other people (default: the real store's
            ``cfg.eval.reference_split``; then a store without one is evaluated without a reference).

    Returns:
        The metrics written to ``out/metrics.json``.
    """
    out, ecfg = Path(out), cfg.eval
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "metrics.json").is_file())):
        raise FmrisynthError("output exists and is not an evaluation; choose another --out", out)
    store, real_set, gen_set, conditions = _open_sets(real, generated, ecfg)
    yard = _yardsticks(store, real_set, gen_set, conditions, reference or f"{store.path}:{ecfg.reference_split}",
                       reference is None, cfg)  # fmt: skip
    p = _stream_all(store, real_set, gen_set, yard, conditions, ecfg, cfg.seed)
    result, arrays = _metrics(str(real), str(generated), store, (real_set.table, gen_set.table), conditions, p, yard,
                              ecfg, cfg.seed)  # fmt: skip
    _write(out, store, conditions, p.maps, arrays, cfg, result)
    return result


def _open_sets(real: str, generated: str | Path, ecfg: EvalConfig) -> tuple:
    """(store, real clips, generated clips, the task conditions of the generated clips in store
    order); refuses a generated condition without real clips."""
    store, real_set = open_real(real, ecfg.split)
    gen_set = open_generated(generated, store, real_set.n_frames)
    conditions = [c for c in store.conditions if c in set(gen_set.table["condition"]) - NO_TASK]
    if not conditions:
        raise FmrisynthError("no task condition among the generated clips", gen_set.sources[0])
    for c in conditions:
        if not (real_set.table["condition"] == c).any():
            raise FmrisynthError(f"condition {c!r} has generated clips but no real clips in {real_set.name}", store.path)
    return store, real_set, gen_set, conditions


def _stream_all(store, real_set, gen_set, yard: _Yardsticks, conditions: list[str], ecfg: EvalConfig,
                seed: int) -> _Passes:  # fmt: skip
    """Stream the real test clips first (in halves, for the ceiling), then every other set, each
    clip's beta map assigned to the nearest of the real group maps (clip-level top-1)."""
    n_vox = int(store.mask.sum())
    voxels = np.sort(np.random.default_rng(seed).choice(n_vox, min(n_vox, ecfg.feature_voxels), replace=False))
    grid = store.header.get("grid")
    mni = grid is not None and _is_named_grid(grid, store)
    probe = make_probe(store.mask, store.affine, mni, ecfg.parcels, seed)
    split_of, split_by = halves(real_set.table)
    run = lambda clips, **kw: stream(clips, conditions, ecfg, n_vox, voxels, probe, **kw)  # noqa: E731
    real_pass = run(real_set, halves=split_of)
    maps = {"real": real_pass.group_t()}  # (C, V)
    gen_pass = run(gen_set, references=maps["real"])
    maps["generated"] = gen_pass.group_t()
    ref_pass = run(yard.reference, references=maps["real"]) if yard.reference is not None else None
    if ref_pass is not None:
        maps["reference"] = ref_pass.group_t()
    codec_pass = run(yard.codec, references=maps["real"]) if yard.codec is not None else None
    return _Passes(real_pass, gen_pass, ref_pass, codec_pass, maps, voxels, probe.parcellation, split_of, split_by)


def _metrics(real: str, generated: str, store, tables: tuple, conditions: list[str], p: _Passes, yard: _Yardsticks,
             ecfg: EvalConfig, seed: int) -> tuple[dict, dict]:  # fmt: skip
    """metrics.json (strict JSON: ``_json_safe``) and the arrays of arrays.npz (what the report plots).
    ``tables`` are the real and generated sets' clip tables."""
    real_maps = p.maps["real"]
    main = map_metrics(real_maps, p.maps["generated"])
    generated_row = task_metrics(p.real, p.generated, real_maps, conditions, ecfg.roi_fraction)
    hrf, tc_arrays = timecourses(p.real, p.generated, real_maps, ecfg.roi_fraction)
    pca, pca_arrays = _pca(p.real, p.generated, *tables, ecfg, seed)
    confusion = np.zeros((len(conditions),) * 2, int)
    np.add.at(confusion, (p.generated.labels, p.generated.assigned), 1)
    realism, not_computed = _realism(p.real, p.generated, p.reference, ecfg, seed, p.parcellation)
    not_computed.update(_too_few(conditions, p))
    result = {
        **{k: generated_row[k] for k in ("map_corr_mean", "map_corr", "rsa", "top1_map", "top1_clip", "hrf_corr_mean")},
        "hrf_corr_real_mean": float(np.nanmean([d["corr_real_hrf"] for d in hrf.values()])),
        **_yardstick_rows(p, yard, conditions, ecfg, seed),
        "realism": realism,
        "memorisation": memorisation(p.generated, p.real, _train_clips(store, p, yard, conditions, seed), seed,
                                     ecfg.memorisation_margin),  # fmt: skip
        "hrf": {conditions[c]: d for c, d in hrf.items()},
        "roi_fraction": ecfg.roi_fraction,
        "pca": pca,
        "n_real": len(p.real.rows),
        "n_generated": len(p.generated.rows),
        "n_per_condition": {c: {"real": int(np.sum(p.real.labels == i)), "generated": int(np.sum(p.generated.labels == i))}
                            for i, c in enumerate(conditions)},
        "conditions": conditions,
        "real": real,
        "generated": generated,
        "notes": yard.notes + sorted(set(not_computed.values())),
        "not_computed": not_computed,
        "units": UNITS.get(_normalisation(store), "store units (normalisation not recorded)"),
        "maps": {c: {k: map_name(k, c) for k in p.maps} for c in conditions},
    }
    fc = {f"fc_{k}": q.realism["fc"] for k, q in (("real", p.real), ("generated", p.generated), ("reference", p.reference))
          if q is not None}
    arrays = dict(conditions=np.array(conditions), confusion=confusion, tr=p.real.tr, onset_real=p.real.onset_s,
                  onset_generated=p.generated.onset_s, rdm_real=main["rdm_real"], rdm_generated=main["rdm_other"],
                  **tc_arrays, **{k: np.asarray(v) for k, v in pca_arrays.items()}, **fc)  # fmt: skip
    return _json_safe(result), arrays


def _yardstick_rows(p: _Passes, yard: _Yardsticks, conditions: list[str], ecfg: EvalConfig, seed: int) -> dict:
    """The task figures of the yardsticks, each None where there is none: real clips of other people
    (reference), split-half real maps (ceiling), codec reconstructions (codec), true maps (truth)."""
    real_maps = p.maps["real"]
    ceiling = map_metrics(p.real.group_t(0), p.real.group_t(1))
    codec = None
    if p.codec is not None:
        row = task_metrics(p.real, p.codec, real_maps, conditions, ecfg.roi_fraction)
        codec = {**{k: v for k, v in row.items() if k in ("map_corr_mean", "rsa", "top1_map", "n")},
                 "variance_ratio": compare(p.real.realism, p.codec.realism)["variance_ratio"],
                 "c2st_accuracy": c2st(p.real.features, p.codec.features, seed, ecfg.c2st_components, ecfg.c2st_folds),
                 "vqgan_checkpoint": yard.codec_source}  # fmt: skip
    return {
        "reference": None if p.reference is None else {
            **task_metrics(p.real, p.reference, real_maps, conditions, ecfg.roi_fraction), **yard.reference_info},
        "ceiling": {"map_corr_mean": ceiling["map_corr_mean"], "rsa": ceiling["rsa"], "top1_map": ceiling["top1_map"],
                    "map_corr": dict(zip(conditions, ceiling["map_corr"])), "split_by": p.split_by,
                    "n_halves": np.bincount(p.split_of[p.real.rows], minlength=2).tolist()},
        "codec": codec,
        "truth": None if yard.truth is None else {
            **{k: _vs_truth(yard.truth, q, conditions) for k, q in (("real", p.real), ("reference", p.reference),
                                                                    ("generated", p.generated)) if q is not None},
            "source": yard.truth_source},
    }


def _too_few(conditions: list[str], p: _Passes) -> dict[str, str]:
    """{figure: reason} for the RSA figures (fewer than MIN_RSA_CONDITIONS conditions) and the codec's
    C2ST (fewer than MIN_C2ST_CLIPS clips); ``_realism`` gives those of the other C2STs."""
    not_computed = {}
    if len(conditions) < MIN_RSA_CONDITIONS:
        reason = (f"RSA not computed: {len(conditions)} condition(s); an RDM needs {MIN_RSA_CONDITIONS} conditions "
                  f"for the 3 pairs a correlation of its upper triangles needs")
        not_computed.update(dict.fromkeys(("rsa", "reference.rsa", "ceiling.rsa", "codec.rsa"), reason))
    if p.codec is not None and min(len(p.real.rows), len(p.codec.rows)) < MIN_C2ST_CLIPS:
        not_computed["codec.c2st_accuracy"] = f"C2ST (codec) not computed: fewer than {MIN_C2ST_CLIPS} clips"
    return not_computed


def _train_clips(store, p: _Passes, yard: _Yardsticks, conditions: list[str], seed: int) -> np.ndarray:
    """The training clips' features (n, T, F) memorisation compares against: the reference pass's when
    the reference is the store's train split, else as many random training clips as real test clips."""
    if yard.reference is not None and split_spec(yard.reference_info["source"], None) == (store.path, "train"):
        return p.reference.features
    return train_features(store, conditions, p.voxels, len(p.real.rows), seed)


def _write(out: Path, store, conditions: list[str], maps: dict[str, np.ndarray], arrays: dict, cfg: Config,
           result: dict) -> None:  # fmt: skip
    """Stage metrics.json, maps/ (the group t maps, (C, V) each, on the store's grid), arrays.npz and
    config.yaml beside ``out`` and publish them whole; in an existing folder only these files change
    (fmrisynth.publish)."""
    import nibabel as nib

    try:
        with staged(out) as tmp:
            (tmp / "maps").mkdir()
            for kind, kind_maps in maps.items():
                for c, m in zip(conditions, kind_maps):
                    nib.save(nib.Nifti1Image(store.unmask(m.astype(np.float32)), store.affine), tmp / map_name(kind, c))
            np.savez_compressed(tmp / "arrays.npz", **arrays)
            save_config(cfg, tmp / "config.yaml")
            (tmp / "metrics.json").write_text(json.dumps(result, indent=1))
    except OSError as e:
        raise FmrisynthError(f"cannot write the evaluation ({e.strerror or e})", out) from None


def _normalisation(store) -> str | None:
    """How the store's runs were normalised (``data.normalise`` of the config it was prepared with)."""
    config = store.header.get("config")
    return config.get("data", {}).get("normalise") if isinstance(config, dict) else None


def _is_named_grid(name: str, store) -> bool:
    """Whether the store lies on the named MNI grid (so that atlas coordinates mean something)."""
    from fmrisynth.data.grid import get_grid

    try:
        grid = get_grid(name)
    except FmrisynthError:
        return False
    return tuple(grid.shape) == tuple(store.grid_shape) and np.allclose(grid.affine, store.affine, atol=1e-3)

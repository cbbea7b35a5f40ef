"""Whole runs: do generated runs of a design look like real (or simulated) runs of the same design?

Clips of 14 s cannot show the slow dynamics of a 3-5 minute run; whole runs can. Each run is
z-scored per voxel (the model's units, so scanner-unit real runs compare with generated ones),
then the design (the events through nilearn's Glover HRF) and a cosine drift basis are regressed
out, and the residuals of every run of a set are summarised the same way:

* temporal autocorrelation at lags 1-5 (pooled over voxels);
* the Welch power spectrum, each voxel's normalised to unit power and averaged, on a common
  frequency grid; two sets are compared by the total-variation distance of their mean spectra
  (0 = the same shape, 1 = no power at common frequencies) and by the share of power below
  0.05 Hz (the slow fluctuations of resting-state BOLD);
* the global-signal share: the variance of the mean residual over voxels over the mean voxel
  variance (1 if every voxel moved together, about 1/V if none did);
* functional connectivity: parcel-mean residual correlation matrices, averaged over runs, and the
  r of their upper triangles between sets.

``evaluate_runs`` works on arrays; ``load_runs`` reads a BIDS folder (``fmrisynth sample
--events`` or ``simulate --events``) into them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmrisynth.errors import FmrisynthError

LAGS = 5
LOW_HZ = 0.05  # below this: the slow fluctuations that dominate resting-state BOLD
HIGH_PASS_HZ = 0.01  # the cosine drift basis (nilearn's default)
SEGMENT = 64  # Welch segment length in frames: 46 s at TR 0.72, resolving 0.02 Hz
SPECTRUM_BINS = 32  # the common frequency grid, 0 to the lowest Nyquist frequency of the runs
MAX_VOXELS = 4000  # voxels (seeded) behind the autocorrelation and the spectrum: their means settle long before


@dataclass
class Run:
    """One run: data (T, V) of in-mask voxels, its BIDS events (onset, duration, trial_type), TR (s)."""

    data: np.ndarray
    events: object
    tr: float


def residuals(run: Run, high_pass: float = HIGH_PASS_HZ) -> np.ndarray:
    """Voxel z-scores (T, V) of ``run`` less the design and cosine drift fit (OLS); float32."""
    from nilearn.glm.first_level import make_first_level_design_matrix

    y = np.asarray(run.data, np.float64)
    sd = y.std(0)
    y = (y - y.mean(0)) / np.where(sd > 0, sd, 1.0)  # constant voxels stay 0
    frame_times = np.arange(len(y)) * run.tr
    design = make_first_level_design_matrix(frame_times, run.events, hrf_model="glover", drift_model="cosine",
                                            high_pass=high_pass).to_numpy()  # (T, p): conditions, drifts, constant
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    return (y - design @ beta).astype(np.float32)


def run_statistics(r: np.ndarray, tr: float, voxels: np.ndarray, parcels: np.ndarray | None,
                   frequencies: np.ndarray) -> dict:
    """Autocorrelation, normalised spectrum on ``frequencies``, global-signal share and FC of residuals (T, V)."""
    from scipy.signal import welch

    sub = r[:, voxels].astype(np.float64)  # (T, F)
    sq = float(np.square(sub).sum())
    autocorr = np.array([float((sub[k:] * sub[:-k]).sum()) / sq if sq > 0 else math.nan for k in range(1, LAGS + 1)])
    f, p = welch(sub, fs=1.0 / tr, nperseg=min(SEGMENT, len(sub)), axis=0)  # (nf,), (nf, F)
    total = p.sum(0)
    p = p[:, total > 0] / total[total > 0]  # each voxel's spectrum with unit power
    spectrum = np.interp(frequencies, f, p.mean(1))
    gs = r.mean(1)  # (T,) the global signal of the residuals
    voxel_var = float(r.var(0).mean())
    out = {"autocorr": autocorr, "spectrum": spectrum / spectrum.sum(),
           "global_share": float(gs.var() / voxel_var) if voxel_var > 0 else math.nan, "fc": None}
    if parcels is not None:
        labels = np.unique(parcels[parcels > 0])
        tc = np.stack([r[:, parcels == k].mean(1) for k in labels], axis=1)  # (T, K)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["fc"] = np.nan_to_num(np.corrcoef(tc.T))
    return out


def evaluate_runs(real_runs: list[Run], generated_runs: list[Run], parcels: np.ndarray | None = None,
                  seed: int = 0, high_pass: float = HIGH_PASS_HZ) -> dict:
    """Whole-run realism of ``generated_runs`` against ``real_runs`` (same voxels, same kind of design).

    Args:
        parcels: (V,) parcel label of each voxel (0 = none) for functional connectivity; without
            them FC is not computed, and ``notes`` says so.

    Returns:
        autocorr_{real,generated} (lags 1-5), autocorr_max_diff, lag1_diff (generated - real),
        psd_distance, psd_distance_real_halves (the distance between two halves of the real runs:
        the floor that sampling alone gives), low_freq_share_{real,generated}, low_freq_share_ratio,
        global_signal_share_{real,generated}, global_signal_share_ratio, fc_corr,
        frequencies_hz and spectrum_{real,generated} (for plots), n_real, n_generated, notes.
    """
    if not real_runs or not generated_runs:
        raise FmrisynthError("whole-run evaluation needs at least one real and one generated run")
    n_vox = {np.shape(run.data)[1] for run in [*real_runs, *generated_runs]}
    if len(n_vox) != 1:
        raise FmrisynthError(f"runs have different voxel counts {sorted(n_vox)}; put them on one grid and mask")
    v = n_vox.pop()
    voxels = np.sort(np.random.default_rng(seed).permutation(v)[:MAX_VOXELS])
    nyquist = min(0.5 / run.tr for run in [*real_runs, *generated_runs])
    frequencies = np.linspace(0, nyquist, SPECTRUM_BINS + 1)[1:]  # (SPECTRUM_BINS,) without 0 Hz (the mean)
    sets = {}
    for name, runs in (("real", real_runs), ("generated", generated_runs)):
        stats = [run_statistics(residuals(run, high_pass), run.tr, voxels, parcels, frequencies) for run in runs]
        spectra = np.array([s["spectrum"] for s in stats])  # (runs, SPECTRUM_BINS)
        spectrum = spectra.mean(0)
        sets[name] = {"autocorr": np.mean([s["autocorr"] for s in stats], axis=0), "spectrum": spectrum,
                      "low": float(spectrum[frequencies < LOW_HZ].sum()),
                      "global": float(np.mean([s["global_share"] for s in stats])),
                      "fc": None if parcels is None else np.mean([s["fc"] for s in stats], axis=0),
                      "halves": _tv(spectra[0::2].mean(0), spectra[1::2].mean(0)) if len(spectra) >= 2 else None}
    real, gen = sets["real"], sets["generated"]
    ratio = lambda a, b: a / b if b > 0 else math.nan  # noqa: E731
    notes = [] if parcels is not None else ["FC not computed: no parcels given"]
    fc_corr = None
    if parcels is not None:
        from fmrisynth.evaluate.realism import upper_corr

        fc_corr = upper_corr(real["fc"], gen["fc"])
    return {
        "n_real": len(real_runs), "n_generated": len(generated_runs),
        "autocorr_real": real["autocorr"].tolist(), "autocorr_generated": gen["autocorr"].tolist(),
        "autocorr_max_diff": float(np.max(np.abs(gen["autocorr"] - real["autocorr"]))),
        "lag1_diff": float(gen["autocorr"][0] - real["autocorr"][0]),
        "psd_distance": _tv(gen["spectrum"], real["spectrum"]), "psd_distance_real_halves": real["halves"],
        "low_freq_share_real": real["low"], "low_freq_share_generated": gen["low"],
        "low_freq_share_ratio": ratio(gen["low"], real["low"]),
        "global_signal_share_real": real["global"], "global_signal_share_generated": gen["global"],
        "global_signal_share_ratio": ratio(gen["global"], real["global"]),
        "fc_corr": fc_corr, "frequencies_hz": frequencies.tolist(),
        "spectrum_real": real["spectrum"].tolist(), "spectrum_generated": gen["spectrum"].tolist(), "notes": notes,
    }


def _tv(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance of two spectra of unit sum: 0 the same shape, 1 disjoint."""
    return float(0.5 * np.abs(p - q).sum())


def load_runs(root: str | Path) -> tuple[list[Run], np.ndarray, np.ndarray]:
    """Every ``*_bold.nii.gz`` under a BIDS folder with its ``_events.tsv``: (runs, mask, affine).

    The mask is the folder's ``*_desc-brain_mask.nii.gz`` where there is one (``sample``), else the
    voxels that vary in every run (``simulate``: scanner units, zero outside each head); each run's
    data are its in-mask voxels. TR comes from the sidecar's RepetitionTime, else the header.
    """
    import json

    import nibabel as nib
    import pandas as pd

    from fmrisynth.data.design import read_events_tsv

    root = Path(root)
    bolds = sorted(root.rglob("*_bold.nii.gz"))
    if not bolds:
        raise FmrisynthError("no *_bold.nii.gz runs found", root)
    images, runs = [], []
    for bold in bolds:
        stem = str(bold)[: -len("_bold.nii.gz")]
        try:
            img = nib.load(bold)
            data = np.asarray(img.dataobj, np.float32)  # (D, H, W, T)
            events = pd.DataFrame([(e.onset_s, e.duration_s, e.condition, e.modulation) for _, e in
                                   read_events_tsv(f"{stem}_events.tsv")],
                                  columns=["onset", "duration", "trial_type", "modulation"])  # fmt: skip
            if (events["modulation"] == 1).all():  # nilearn then models plain boxcars (and says nothing)
                events = events.drop(columns="modulation")
            sidecar = Path(f"{stem}_bold.json")
            tr = float(json.loads(sidecar.read_text())["RepetitionTime"]) if sidecar.is_file() else float(img.header.get_zooms()[3])
        except (OSError, ValueError, KeyError, IndexError, nib.filebasedimages.ImageFileError) as e:
            raise FmrisynthError(f"cannot read this run or its events ({e})", bold) from None
        if data.ndim != 4 or not tr > 0:
            raise FmrisynthError("not a 4D run with a positive TR", bold)
        images.append((img.affine, data))
        runs.append((data, events, tr))
    shapes = {d.shape[:3] for _, d in images}
    if len(shapes) != 1:
        raise FmrisynthError(f"runs on different grids {sorted(shapes)}", root)
    masks = sorted(root.rglob("*_desc-brain_mask.nii.gz"))
    if masks:
        mask = np.asarray(nib.load(masks[0]).dataobj) > 0
    else:
        mask = np.logical_and.reduce([d.std(3) > 0 for _, d in images])
    return [Run(d[mask].T, events, tr) for d, events, tr in runs], mask, images[0][0]


def compare_folders(real: str | Path, generated: str | Path, seed: int = 0) -> dict:
    """``evaluate_runs`` on two BIDS folders of one grid, on the voxels both masks share.

    FC uses Glasser parcels on the package's MNI grids and seeded k-means parcels elsewhere
    (as the clip evaluation does).
    """
    from fmrisynth.data.grid import NAMED_GRIDS, get_grid
    from fmrisynth.evaluate.realism import glasser_parcels, kmeans_parcels

    real_runs, real_mask, affine = load_runs(real)
    gen_runs, gen_mask, gen_affine = load_runs(generated)
    if real_mask.shape != gen_mask.shape or not np.allclose(affine, gen_affine, atol=1e-3):
        raise FmrisynthError(f"real runs ({real}) and generated runs are on different grids; resample one", generated)
    both = real_mask & gen_mask
    if not both.any():
        raise FmrisynthError(f"the real runs' brain ({real}) and the generated runs' do not overlap", generated)

    def keep(runs: list[Run], mask: np.ndarray) -> list[Run]:
        return [Run(r.data[:, both[mask]], r.events, r.tr) for r in runs]

    mni = any(both.shape == g.shape and np.allclose(g.affine, affine, atol=1e-3) for g in map(get_grid, NAMED_GRIDS))
    parcels = glasser_parcels(both, affine) if mni else kmeans_parcels(both, 100, seed)
    result = evaluate_runs(keep(real_runs, real_mask), keep(gen_runs, gen_mask), parcels, seed)
    return {**result, "real": str(real), "generated": str(generated), "voxels": int(both.sum())}


def write_runs(result: dict, out: str | Path) -> Path:
    """``out/runs.json`` (strict JSON, NaN as null), staged and renamed into place (``fmrisynth.publish``)."""
    import json

    from fmrisynth.evaluate.run import _json_safe
    from fmrisynth.publish import staged_file

    path = Path(out) / "runs.json"
    try:
        with staged_file(path) as tmp:
            tmp.write_text(json.dumps(_json_safe(result), indent=1))
    except OSError as e:
        raise FmrisynthError(f"cannot write the whole-run evaluation ({e.strerror or e})", out) from None
    return path


def runs_table(result: dict) -> str:
    """The whole-run figures as plain text: real | generated per figure."""
    rows = [(f"autocorrelation lag {k + 1}", a, b)
            for k, (a, b) in enumerate(zip(result["autocorr_real"], result["autocorr_generated"]))]
    rows += [("low-frequency (< 0.05 Hz) power share", result["low_freq_share_real"], result["low_freq_share_generated"]),
             ("global-signal share", result["global_signal_share_real"], result["global_signal_share_generated"]),
             ("power spectrum distance (0 ideal)", result["psd_distance_real_halves"], result["psd_distance"]),
             ("FC r with real", 1.0, result["fc_corr"])]
    cell = lambda x: f"{'-':>11}" if x is None else f"{x:>11.3f}"  # noqa: E731
    lines = [f"{'whole runs (residuals of design + drift)':<42}{'real':>11}{'generated':>11}"]
    lines += [f"{name:<42}{cell(a)}{cell(b)}" for name, a, b in rows]
    lines.append(f"{result['n_real']} real and {result['n_generated']} generated runs; real column of the spectrum "
                 f"distance: between two halves of the real runs")
    return "\n".join(lines + [f"note: {n}" for n in result["notes"]])

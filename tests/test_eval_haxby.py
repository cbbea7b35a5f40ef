"""Real vs real on real BOLD: Haxby 2001 (1 subject, 12 runs, 8 categories, TR 2.5 s), native grid."""

import nibabel as nib
import numpy as np
import pandas as pd

from fmrisynth.config import Config
from fmrisynth.data.store import StoreWriter
from fmrisynth.evaluate.run import evaluate

CLIP = 12  # frames (30 s): a 22.5 s block and the tail of its response


def haxby_store(root, out):
    """Block-aligned clips, z-scored per voxel per run; runs 1-2 train, 3-6 val, 7-12 test."""
    sub = root / "sub-1"
    mask_img = nib.load(sub / "masks" / "brain.nii.gz")
    mask = np.asarray(mask_img.dataobj) > 0
    conditions = sorted(pd.read_csv(next((sub / "func").glob("*run-01_events.tsv")), sep="\t")["trial_type"])
    with StoreWriter(out, (CLIP, int(mask.sum())), mask_img.affine, mask.shape, conditions, mask=mask) as w:
        for run in range(1, 13):
            stem = sub / "func" / f"sub-1_task-objectviewing_run-{run:02d}"
            x = np.asarray(nib.load(f"{stem}_bold.nii.gz").dataobj, dtype=np.float32)[mask].T  # (T_run, V)
            x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
            for _, ev in pd.read_csv(f"{stem}_events.tsv", sep="\t").iterrows():
                start = int(round(ev.onset / 2.5)) - 1
                w.add(x[start : start + CLIP], subject="1", run=run, condition=ev.trial_type,
                      label=conditions.index(ev.trial_type), onset_s=ev.onset - start * 2.5, duration_s=ev.duration,
                      tr=2.5, split="train" if run <= 2 else "val" if run <= 6 else "test")


def test_haxby_real_versus_real(shared_data, tmp_path):
    """Two sets of real runs of one subject: every figure should say "the same kind of data".

    Measured (runs 7-12 vs 3-6): map r 0.15 (chance 0), HRF r of real ROIs 0.80, lag-1 autocorrelation
    0.12 vs 0.13, variance ratio 1.07, FWHM 17.6 vs 17.7 mm, FC r 0.52, C2ST 0.55.
    """
    haxby_store(shared_data / "haxby2001", tmp_path / "store")
    m = evaluate(f"{tmp_path / 'store'}:test", f"{tmp_path / 'store'}:val", tmp_path / "eval", Config())
    assert m["n_real"] == 48 and m["n_generated"] == 32 and len(m["conditions"]) == 8
    assert m["ceiling"]["split_by"] == "run" and m["ceiling"]["n_halves"] == [24, 24]
    assert m["reference"]["split_by"] == "run" and m["reference"]["n"] == 16  # one subject: runs 1-2
    assert m["hrf_corr_real_mean"] > 0.6  # real BOLD in the most active voxels follows the HRF
    assert m["map_corr_mean"] > 0.05  # weak (8 similar object categories, 30 s clips) but above chance
    assert m["memorisation"]["n_train"] == 16 and not m["memorisation"]["flagged"]
    r = m["realism"]
    assert r["autocorr_real"][0] > 0.05 and r["autocorr_max_diff"] < 0.05  # BOLD is autocorrelated, alike in both
    assert 0.8 < r["variance_ratio"] < 1.25 and abs(r["fwhm_generated_mm"] / r["fwhm_real_mm"] - 1) < 0.05
    assert r["fc_corr"] > 0.3 and abs(r["c2st_accuracy"] - 0.5) < 0.15

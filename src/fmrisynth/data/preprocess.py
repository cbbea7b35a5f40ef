"""Preprocessing of one run: onto the model grid, into the brain mask, normalised voxelwise.

Data already on the grid's lattice (HCP 2 mm on the ``2mm`` grid, the simulator on its own grid,
in any axis order or flip) are not interpolated: each brain voxel of the grid is picked from its
source voxel, which is exact and avoids building the run on the whole grid. Anything else goes
through nilearn's ``resample_img`` with linear interpolation, which cannot overshoot at the edge of
the field of view the way cubic splines do. Normalisation is per run because scanner gain and
baseline differ between runs; ``zscore`` is what the models train on, ``psc`` keeps BOLD's units.
"""

from __future__ import annotations


import nibabel as nib
import numpy as np

from fmrisynth.data.grid import Grid, brain_mask, resample
from fmrisynth.data.nifti import Run, load_run, open_image
from fmrisynth.errors import FmrisynthError

NORMALISE = ("zscore", "psc", "none")


def lattice_index(affine: np.ndarray, shape: tuple[int, ...], grid: Grid, mask: np.ndarray):
    """Source voxel (flat, Fortran order) of each mask voxel when the image lies on the grid's lattice.

    Returns ``(index, inside)``: index (n_inside,) into the image's flattened voxels, inside (V,)
    bool for mask voxels within the image's field of view; ``None`` when the image's voxels are not
    the grid's voxels up to a whole-voxel shift, axis permutation and flips.
    """
    m = np.linalg.inv(affine) @ grid.affine  # grid voxel -> image voxel
    r = np.round(m)
    perm = np.abs(r[:3, :3])
    if not np.allclose(m, r, atol=1e-4) or not ((perm.sum(0) == 1).all() and (perm.sum(1) == 1).all()):
        return None
    ijk = (np.argwhere(mask) @ r[:3, :3].T + r[:3, 3]).astype(np.int64)  # (V, 3)
    inside = ((ijk >= 0) & (ijk < np.array(shape[:3]))).all(axis=1)
    return np.ravel_multi_index(ijk[inside].T, shape[:3], order="F"), inside


def in_mask(data: np.ndarray, affine: np.ndarray, grid: Grid, mask: np.ndarray) -> np.ndarray:
    """Values of a 4D image (X, Y, Z, T) at the grid's brain voxels -> (T, V) float32."""
    lattice = lattice_index(affine, data.shape, grid, mask)
    if lattice is None:
        return np.ascontiguousarray(resample(nib.Nifti1Image(data, affine), grid)[mask].T)  # (D,H,W,T) -> (T, V)
    index, inside = lattice
    series = data.reshape(-1, data.shape[3], order="F").T  # (T, X*Y*Z), a view of nibabel's Fortran array
    x = np.zeros((data.shape[3], int(mask.sum())), dtype=np.float32)
    x[:, inside] = series[:, index]
    return x


def load_mask(path: str | None, grid: Grid) -> np.ndarray:
    """The brain mask on the grid, bool (D, H, W): a user's NIfTI mask, or the MNI152 brain mask."""
    if path is None:
        mask = brain_mask(grid)
    else:
        img = open_image(path, ndim=3)
        inside = (np.asarray(img.dataobj) > 0).astype(np.float32)
        mask = resample(nib.Nifti1Image(inside, img.affine), grid) >= 0.5
    if not mask.any():
        raise FmrisynthError(f"brain mask is empty on the {grid.name} grid (does it overlap the grid?)", path)
    return mask


def normalise(x: np.ndarray, how: str) -> np.ndarray:
    """Voxelwise over time, in place, for x of shape (T, V); constant voxels become 0."""
    if how == "none":
        return x
    if how not in NORMALISE:
        raise FmrisynthError(f"unknown normalisation {how!r}; choose {', '.join(NORMALISE)}")
    mean = x.mean(axis=0)
    x -= mean
    scale = x.std(axis=0) if how == "zscore" else np.abs(mean) / 100.0
    keep = scale > 1e-6 * max(float(np.abs(mean).max()), 1.0)  # constant or zero-baseline voxels carry no signal
    x[:, keep] /= scale[keep]
    x[:, ~keep] = 0.0
    return x


def brain_coverage(data: np.ndarray, affine: np.ndarray, grid: Grid, mask: np.ndarray) -> float | None:
    """Fraction of the grid's brain mask that the run's own brain covers; None for an empty run.

    The run's brain is where its mean absolute signal over up to 10 frames exceeds 20 % of the
    99th percentile (EPI is bright in the brain, dark in air and skull; masked data are 0 outside).
    Data in MNI space cover >= 95 % of the MNI mask (the simulator 99 %); native-space data, which
    sit wherever the scanner put the head, cover much less (the Haxby subject: 63 %).
    """
    frames = np.unique(np.linspace(0, data.shape[3] - 1, min(data.shape[3], 10)).astype(int))
    level = np.abs(data[..., frames]).mean(axis=3)  # (X, Y, Z)
    top = float(np.percentile(level, 99))
    if not top > 0:
        return None
    brain = (level > 0.2 * top).astype(np.float32)[..., None]  # (X, Y, Z, 1)
    return float((in_mask(brain, affine, grid, mask)[0] > 0.5).mean())


def preprocess_run(
    run: Run, grid: Grid, mask: np.ndarray, how: str = "zscore"
) -> tuple[np.ndarray, int, float | None]:
    """One run -> (T, V) float32 in-mask time series, how many in-mask voxels were dropped, and the
    fraction of the mask its brain covers (``brain_coverage``).

    Grid voxels fed by a NaN/Inf source voxel are zeroed after normalisation (masked out of this
    run) rather than failing it: a few bad voxels are common at the edge of real acquisitions.
    """
    data, bad = load_run(run)  # (X, Y, Z, T), (X, Y, Z) or None
    coverage = brain_coverage(data, run.affine, grid, mask)
    x = in_mask(data, run.affine, grid, mask)  # (T, V)
    del data
    normalise(x, how)
    if bad is None:
        return x, 0, coverage
    touched = in_mask(bad[..., None].astype(np.float32), run.affine, grid, mask)[0] > 0  # (V,)
    x[:, touched] = 0.0
    return x, int(touched.sum()), coverage

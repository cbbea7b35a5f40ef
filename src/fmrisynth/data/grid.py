"""Model grids in MNI space and the brain mask on them.

A grid is a voxel size, a shape and an RAS+ affine. Named grids are centred on the FSL/HCP MNI 2 mm
box (91x109x91, x in [-90, 90], y in [-126, 90], z in [-72, 108] mm) and padded to shapes the models
can halve repeatedly:

  * ``2mm``: 96x112x96 at 2 mm, aligned with the HCP 2 mm lattice (HCP data need no interpolation).
  * ``6mm``: 32x40x32 at 6 mm, the CPU-sized demo grid.
  * ``<mm>mm:<D>x<H>x<W>``: any other size, e.g. ``4mm:48x56x48``.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fmrisynth.errors import FmrisynthError

MNI_CENTRE_MM = np.array([0.0, -18.0, 18.0])  # centre of the HCP 2 mm box
NAMED_GRIDS = {"2mm": (2.0, (96, 112, 96)), "6mm": (6.0, (32, 40, 32))}


@dataclass(frozen=True)
class Grid:
    """An RAS+ voxel grid: ``affine`` maps (i, j, k, 1) to MNI millimetres."""

    name: str
    voxel_mm: float
    shape: tuple[int, int, int]

    @property
    def affine(self) -> np.ndarray:
        # floor((n-1)/2) keeps the 2 mm grid on the HCP lattice (origin -94, -128, -76).
        half = np.floor((np.array(self.shape) - 1) / 2)
        origin = MNI_CENTRE_MM - half * self.voxel_mm
        if self.voxel_mm == 2.0:
            origin = np.round(origin / 2.0) * 2.0
        affine = np.diag([self.voxel_mm] * 3 + [1.0])
        affine[:3, 3] = origin
        return affine


def get_grid(spec: str) -> Grid:
    """Parse a grid name (``2mm``, ``6mm``) or spec (``4mm:48x56x48``)."""
    if spec in NAMED_GRIDS:
        mm, shape = NAMED_GRIDS[spec]
        return Grid(spec, mm, shape)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)mm:(\d+)x(\d+)x(\d+)", spec)
    if not m:
        raise FmrisynthError(f"unknown grid {spec!r}; use 2mm, 6mm or e.g. 4mm:48x56x48")
    mm = float(m.group(1))
    shape = tuple(int(m.group(i)) for i in (2, 3, 4))
    if mm <= 0 or min(shape) < 4:
        raise FmrisynthError(f"grid {spec!r}: voxel size must be > 0 and every side >= 4")
    return Grid(spec, mm, shape)  # type: ignore[arg-type]


def resample(img, grid: Grid, interpolation: str = "linear") -> np.ndarray:
    """Resample a 3D or 4D NIfTI image onto the grid with nilearn -> (D, H, W[, T]) float32.

    Binary images (masks, templates) are resampled smoothly on purpose and thresholded by the
    caller, so nilearn's warning about it is silenced here.
    """
    from nilearn.image import resample_img

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Resampling binary images")
        out = resample_img(
            img,
            target_affine=grid.affine,
            target_shape=grid.shape,
            interpolation=interpolation,
            force_resample=True,
            copy_header=True,
        )
    return np.asarray(out.dataobj, dtype=np.float32)


@lru_cache(maxsize=8)
def _mni_on_grid(spec: str, which: str) -> np.ndarray:
    from nilearn import datasets, image

    loaders = {
        "mask": lambda: datasets.load_mni152_brain_mask(resolution=2),
        "gm": lambda: datasets.load_mni152_gm_template(resolution=2),
    }
    template = loaders[which]()
    template = image.new_img_like(template, np.asarray(template.dataobj, dtype=np.float32))
    data = resample(template, get_grid(spec), "continuous")
    data.setflags(write=False)
    return data


def brain_mask(grid: Grid) -> np.ndarray:
    """nilearn's MNI152 brain mask (shipped in its wheel) on the grid, as bool (D, H, W)."""
    return _mni_on_grid(grid.name, "mask") >= 0.5


def gray_matter(grid: Grid) -> np.ndarray:
    """MNI152 gray-matter probability in [0, 1] on the grid, float32 (D, H, W)."""
    return np.clip(_mni_on_grid(grid.name, "gm"), 0.0, 1.0)

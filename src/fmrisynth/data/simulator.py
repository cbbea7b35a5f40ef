"""The embedded simulator: an HCP-layout task-fMRI dataset grounded in real HCP data, with ground truth.

Layout written under ``out`` (read by the HCP reader exactly like real HCP)::

    <subject>/MNINonLinear/Results/tfMRI_<TASK>_<PE>/tfMRI_<TASK>_<PE>.nii.gz   4D int16, TR 0.72 s
    <subject>/MNINonLinear/Results/tfMRI_<TASK>_<PE>/EVs/<ev>.txt                onset duration amplitude
    <subject>/truth/<TASK>_<ev>.nii.gz          condition map: % signal change per unit canonical regressor
    <subject>/truth/design_tfMRI_<TASK>_<PE>.tsv  frame_time + the canonical (Glover) regressor of every EV
    <subject>/truth/brain_mask.nii.gz           the subject's (deformed) brain mask
    simulation.json, config.yaml                  what was simulated, from which real HCP subjects

A run is a product of spatial maps and time courses, ``Y = baseline * gain * (1 + (A @ Z + E) / 100)``:

* anatomy: nilearn's MNI152 mask and gray matter, a subject-specific intensity (~10000), bias field
  and small smooth deformation;
* task: simulated subject i carries real HCP subject (i mod 30)'s 24 parcel betas plus a jitter of
  the real between-subject spread, painted on cortex through the Glasser parcels; each EV's canonical
  regressor plus its time and dispersion derivatives weighted by per-subject and per-region HRF
  latency and dispersion maps; with ``sim.trial_sd`` each event's response has its own gain;
* background: the factor model of real HCP rest subject (i mod 10) (parcel covariance, amplitude,
  AR dynamics), thermal white noise, slow drift, optional motion-like spikes;
* acquisition: phase encoding LR/RL as an opposite distortion along x plus an intensity gradient.

So, as in real HCP frames, subject explains the most variance, phase encoding the second, task less.
Each run is built, written and dropped before the next (streaming); files are written into a
temporary sibling directory renamed into place at the end, and the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fmrisynth.config import Config, SimConfig, save_config
from fmrisynth.data.hcp import run_folder, run_image, write_evs
from fmrisynth.data.sim_anatomy import SimGrid, load_asset, paint, smooth_field, warp_matrix
from fmrisynth.errors import FmrisynthError
from fmrisynth.tasks import HCP24, HCP_TR, PARADIGMS, Paradigm

PROVENANCE = "simulation.json"  # what was simulated (write_provenance); evaluation finds the truth by it
GENERATOR = "fmrisynth simulate"  # its "generator" in an HCP-layout simulation (is_simulation)
PE_SIGN = {"LR": 1.0, "RL": -1.0}
# Where EPI distortion is strongest (air-tissue interfaces): orbitofrontal cortex, temporal poles.
DISTORTION_CENTRES_MM = np.array([[0.0, 35.0, -20.0], [-40.0, 10.0, -30.0], [40.0, 10.0, -30.0]])


def simulate(cfg: Config, out: Path, progress: bool = True) -> dict:
    """Write the simulated dataset described by ``cfg.sim`` (seeded by ``cfg.seed``) to ``out``.

    Returns a summary: subjects, paradigms, number of runs, grid, output path and seconds taken.
    """
    from tqdm import tqdm

    sim_cfg, out = cfg.sim, Path(out)
    paradigms, sim = _check(sim_cfg, out)
    started = time.perf_counter()
    subjects = [f"sim{i + 1:03d}" for i in range(sim_cfg.subjects)]
    n_runs = len(subjects) * len(paradigms) * len(sim_cfg.runs)
    with staged(out) as tmp:
        # One writer thread: zlib releases the GIL, so run k+1 is synthesised while run k is compressed.
        with ThreadPoolExecutor(max_workers=1) as writer, tqdm(
            total=n_runs, desc="simulate", unit="run", disable=not progress
        ) as bar:
            records, pending = {}, None
            for i, name in enumerate(subjects):
                subject = _Subject(sim, sim_cfg, cfg.seed, i)
                records[name] = subject.record
                write_truth(sim, subject, [c for p in paradigms for c in p.conditions], tmp / name / "truth")
                for p in paradigms:
                    for pe in sim_cfg.runs:
                        volume, path = _write_run(subject, p, pe, cfg.seed, tmp / name)  # (N, T) int16
                        if pending is not None:
                            pending.result()  # at most one run waits in memory
                        pending = writer.submit(_save, sim, volume, path, HCP_TR)
                        bar.update()
            if pending is not None:
                pending.result()
        meta = {
            "generator": GENERATOR,
            "seed": cfg.seed,
            "grid": sim_cfg.grid,
            "shape": list(sim.shape),
            "affine": sim.write_affine.tolist(),
            "tr": HCP_TR,
            "runs": list(sim_cfg.runs),
            "paradigms": [p.name for p in paradigms],
            "conditions": [c for p in paradigms for c in p.conditions],
            "truth_units": "percent signal change per unit of nilearn's Glover block regressor",
            "subjects": records,
        }
        write_provenance(tmp, meta, cfg)
    return {"out": str(out), "subjects": subjects, "paradigms": meta["paradigms"], "runs": n_runs,
            "grid": sim_cfg.grid, "shape": list(sim.shape), "seconds": round(time.perf_counter() - started, 2)}


def truth_map_name(condition: str) -> str:
    """The file of a condition's true map in a subject's ``truth/``: ``MOTOR:rh`` -> ``MOTOR_rh.nii.gz``."""
    return f"{condition.replace(':', '_')}.nii.gz"


def is_simulation(root: Path) -> bool:
    """Whether ``root`` is a dataset ``simulate`` wrote (HCP layout): its ``simulation.json`` says so."""
    try:
        return json.loads((Path(root) / PROVENANCE).read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def truth_map_files(root: Path, subjects: list[str], condition: str) -> list[Path]:
    """Where ``simulate`` wrote the true map of ``condition`` of each of ``subjects``: ``<subject>/truth/``."""
    return [Path(root) / s / "truth" / truth_map_name(condition) for s in subjects]


def write_truth(sim: SimGrid, subject: _Subject, conditions: list[str], folder: Path) -> None:
    """A subject's ground truth in ``folder``: one map per condition (HCP24 names) and its deformed brain mask."""
    truth = subject.truth_maps_of(conditions)  # (N, conditions)
    for k, condition in enumerate(conditions):
        _save(sim, truth[:, k : k + 1], folder / truth_map_name(condition))
    _save(sim, subject.warped_mask()[:, None], folder / "brain_mask.nii.gz")


def _write_run(subject: _Subject, p: Paradigm, pe: str, seed: int, root: Path) -> tuple[np.ndarray, Path]:
    """Synthesise one run of ``subject`` under ``root`` (its folder) and write its EVs and true design;
    return the volume (N, T) int16 and the path of its image, for the writer thread to save.

    The schedule is seeded by (seed, paradigm, phase encoding) only: every subject sees the same design.
    """
    events = p.schedule(np.random.default_rng([seed, 0, _index(p), _pe_index(pe)]))
    folder = run_folder(root.parent, root.name, p.name, pe)
    volume, design = subject.run(p, pe, events)  # (N, T) int16
    write_evs(folder, events)
    design.to_csv(root / "truth" / f"design_{folder.name}.tsv", sep="\t", index=False, float_format="%.6g")
    return volume, run_image(folder)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write a dataset into; it replaces ``out`` (absent or an empty
    directory, checked by ``_check``) when the block succeeds and is deleted when it fails, so no
    half-written dataset is ever left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_provenance(tmp: Path, meta: dict, cfg: Config) -> None:
    """``simulation.json`` (what was simulated, from which real subjects) and the resolved config."""
    (tmp / PROVENANCE).write_text(json.dumps(meta, indent=1))
    save_config(cfg, tmp / "config.yaml")


def paradigms_of(tasks: str) -> list[Paradigm]:
    """``hcp7``/``all`` -> the seven HCP paradigms; ``MOTOR,WM`` -> those paradigms."""
    if tasks in ("hcp7", "all"):
        return list(PARADIGMS.values())
    names = [t.strip().upper() for t in tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in PARADIGMS]
    if unknown or not names:
        choices = ", ".join(PARADIGMS)
        raise FmrisynthError(f"unknown task {unknown[0] if unknown else tasks!r}; use hcp7, all or some of {choices}")
    return [PARADIGMS[n] for n in dict.fromkeys(names)]


def _check(cfg: SimConfig, out: Path) -> tuple[list[Paradigm], SimGrid]:
    """Validate the simulator settings and the output path before anything is written."""
    if cfg.subjects < 1:
        raise FmrisynthError(f"--subjects must be at least 1, got {cfg.subjects}")
    bad = [r for r in cfg.runs if r not in PE_SIGN]
    if bad or not cfg.runs or len(set(cfg.runs)) != len(cfg.runs):
        raise FmrisynthError(f"--runs must list LR and/or RL once each, got {','.join(cfg.runs) or 'nothing'}")
    if min(cfg.task_amplitude, cfg.thermal_sd, cfg.drift_pct, cfg.subject_jitter, cfg.smoothing_mm, cfg.trial_sd) < 0:
        raise FmrisynthError("sim amplitudes, noise levels, trial_sd and smoothing must be >= 0")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FmrisynthError("already exists and is not an empty directory; choose a new --out", out)
    sim = SimGrid(cfg.grid)
    _ = sim.grid  # raises FmrisynthError on a bad grid spec
    return paradigms_of(cfg.tasks), sim


def _index(p: Paradigm) -> int:
    return list(PARADIGMS).index(p.name)


def _pe_index(pe: str) -> int:
    return list(PE_SIGN).index(pe)


class _Subject:
    """One simulated subject: its anatomy and spatial maps on the support, and how to make its runs."""

    def __init__(self, sim: SimGrid, cfg: SimConfig, seed: int, i: int):
        asset = load_asset()
        self.sim, self.cfg, self.seed, self.i = sim, cfg, seed, i
        rng = np.random.default_rng([seed, 1, i])
        n_task, n_rest = asset["betas"].shape[2], asset["rest_loadings"].shape[0]
        betas = asset["betas"].astype(np.float32)  # (360, 24, 30) HCP units, 100 = 1 %
        own = betas[:, :, i % n_task] + cfg.subject_jitter * betas.std(2) * rng.standard_normal(betas.shape[:2])
        self.rest = i % n_rest
        latency = rng.normal(0, 0.4)  # s, this subject's HRF delay
        regional = rng.normal(0, 0.6, (360, 2)) * [1.0, 0.3]  # per parcel: delay (s), dispersion
        # (360, 24 + 2 + factors) parcel values -> (N, K) maps in % of baseline
        values = np.hstack([own * cfg.task_amplitude / 100, regional, asset["rest_loadings"][self.rest] / 100])
        maps = paint(sim, values.astype(np.float32), cfg.smoothing_mm)  # (N, 24 + 2 + factors)
        gm = sim.gm.ravel()[sim.support][:, None]  # signal scales with the gray matter in a voxel
        self.task = maps[:, :24] * gm
        self.delay = np.clip(latency + maps[:, 24], -1.5, 1.5)
        self.dispersion = maps[:, 25]
        self.background = maps[:, 26:] * gm
        fields = smooth_field(rng, sim, 4)  # (4, N)
        self.deform_vox = fields[:3].T * (1.5 / sim.voxel_mm)  # (N, 3) voxels, sd 1.5 mm
        intensity = 10000 * np.exp(rng.normal(0, 0.1))
        tissue = 0.75 + 0.35 * sim.gm.ravel()[sim.support]
        self.baseline = intensity * tissue * np.exp(0.08 * fields[3])  # (N,) with a bias field
        self.inside = sim.mask.ravel()[sim.support].astype(np.float32)
        self.record = {
            "task_source": str(asset["task_subjects"][i % n_task]),
            "rest_source": str(asset["rest_subjects"][self.rest]),
            "intensity": round(float(intensity), 1),
            "hrf_delay_s": round(float(latency), 3),
        }

    def _warp(self, columns: np.ndarray, shift_vox: np.ndarray | float = 0.0) -> np.ndarray:
        """Resample support maps (N, K) through the subject's deformation plus ``shift_vox``."""
        w = warp_matrix(self.sim, self.sim.coords + self.deform_vox + shift_vox)
        return w @ np.vstack([columns, np.zeros((1, columns.shape[1]), columns.dtype)])

    def warped_mask(self) -> np.ndarray:
        return (self._warp(self.inside[:, None])[:, 0] >= 0.5).astype(np.uint8)

    def truth_maps_of(self, conditions: list[str]) -> np.ndarray:
        """Condition maps (N, C) in the subject's anatomy, for HCP24 ``conditions``."""
        columns = [HCP24.index(c) for c in conditions]
        return (self._warp(self.task[:, columns]) * self.warped_mask()[:, None]).astype(np.float32)

    def run(self, p: Paradigm, pe: str, events: dict) -> tuple[np.ndarray, object]:
        """One run of paradigm ``p``: int16 frames (N, T) on the support, and its canonical design."""
        rng = np.random.default_rng([self.seed, 2, self.i, _index(p), _pe_index(pe)])
        gains = np.random.default_rng([self.seed, 4, self.i, _index(p), _pe_index(pe)])
        regs = _regressors(trial_gains(events, self.cfg.trial_sd, gains), p.n_frames)
        return self.make(regs, [f"{p.name}:{ev}" for ev in regs], pe, rng, p.n_frames, HCP_TR)

    def make(self, regs: dict, conditions: list[str], pe: str, rng: np.random.Generator, T: int,
             tr: float) -> tuple[np.ndarray, object]:  # fmt: skip
        """A run of T frames: regressors ``regs`` (name -> (T, 3)) of HCP24 ``conditions``, drawn from ``rng``."""
        import pandas as pd
        import torch  # its Gaussian sampler is ~4x faster than numpy's; thermal noise dominates the draws

        sim, cfg = self.sim, self.cfg
        m = self.task[:, [HCP24.index(c) for c in conditions]]  # (N, E)
        # HRF latency d (s) ~ -d x time derivative; dispersion change ~ dispersion derivative
        spatial = np.hstack([self.baseline[:, None], self.inside[:, None], m, -m * self.delay[:, None],
                             m * self.dispersion[:, None], self.background])  # fmt: skip
        sign = PE_SIGN[pe]
        near = np.exp(-((sim.mm[:, None] - DISTORTION_CENTRES_MM) ** 2).sum(-1) / (2 * 25.0**2)).max(1)
        shift = np.zeros_like(sim.coords)
        shift[:, 0] = sign * (0.3 + 2.0 * near) / sim.voxel_mm  # residual EPI distortion along the PE axis
        warped = self._warp(spatial, shift).astype(np.float32)  # (N, 2 + 3E + F)
        slow_maps, slow_courses = self._slow(rng, T)
        courses = [np.stack([r[:, k] for r in regs.values()]) for k in range(3)]  # 3 x (E, T)
        courses += [self._factors(rng, T), slow_courses]
        signal = np.hstack([warped[:, 2:], slow_maps]) @ np.vstack(courses).astype(np.float32)  # (N, T) in %
        thermal = torch.randn(signal.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**62))))
        signal += thermal.mul_(cfg.thermal_sd * (2.0 / sim.voxel_mm) ** 1.5).numpy()
        gain = 1.0 + sign * 0.05 * sim.mm[:, 0] / 70.0  # PE intensity gradient along x
        scale = (warped[:, 0] * gain * (warped[:, 1] >= 0.5)).astype(np.float32)[:, None]  # HCP volumes are masked
        signal *= scale / 100.0  # in place from here: a 2 mm run is ~0.5 GB
        signal += scale
        np.clip(np.rint(signal, out=signal), 0, np.iinfo(np.int16).max, out=signal)
        design = pd.DataFrame({"frame_time": np.arange(T) * tr, **{ev: r[:, 0] for ev, r in regs.items()}})
        return signal.astype(np.int16), design

    def _factors(self, rng: np.random.Generator, T: int) -> np.ndarray:
        """Unit-variance background factor time courses (F, T) from the real rest subject's AR models."""
        from scipy.signal import lfilter

        asset, burn = load_asset(), 200
        ar, innov = asset["rest_ar"][self.rest], asset["rest_innov"][self.rest]
        white = rng.standard_normal((len(ar), T + burn))
        return np.stack([lfilter([s], np.r_[1.0, -a], w)[burn:] for a, s, w in zip(ar, innov, white)])

    def _slow(self, rng: np.random.Generator, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Scanner drift (linear + quadratic) and optional motion-like spikes: maps (N, k), courses (k, T) in %."""
        xyz = np.hstack([np.ones((len(self.sim.mm), 1)), self.sim.mm / 70.0])  # (N, 4): smooth spatial basis
        t = np.linspace(-1, 1, T)
        maps = [xyz @ rng.normal(0, self.cfg.drift_pct / 2, (4, 2))]
        courses = [np.stack([t, 1.5 * t**2 - 0.5])]  # Legendre P1, P2
        if self.cfg.spikes:
            frames = rng.choice(T, size=rng.poisson(2), replace=False)
            maps.append(xyz @ rng.normal(0, 1.5, (4, len(frames))))
            courses.append(np.eye(T)[frames])
        return np.hstack(maps).astype(np.float32), np.vstack(courses).astype(np.float32)


def trial_gains(events: dict[str, list[tuple[float, ...]]], sd: float,
                rng: np.random.Generator) -> dict[str, list[tuple[float, float, float]]]:  # fmt: skip
    """Each event's amplitude times its own gain ``1 + sd * N(0, 1)`` (at least 0): real blocks vary in
    amplitude (habituation, attention). ``sd = 0`` returns ``events`` unchanged and draws nothing, so
    every run is the same as without the option."""
    if sd == 0:
        return events
    return {ev: [(o, d, (a[0] if a else 1.0) * max(0.0, 1 + sd * rng.standard_normal())) for o, d, *a in blocks]
            for ev, blocks in events.items()}  # fmt: skip


def _regressors(events: dict[str, list[tuple[float, ...]]], T: int, tr: float = HCP_TR) -> dict[str, np.ndarray]:
    """EV -> (T, 3): nilearn's Glover regressor, its time derivative and its dispersion derivative.

    Events are (onset, duration) or (onset, duration, amplitude) in seconds; amplitude defaults to 1.
    """
    from nilearn.glm.first_level import compute_regressor

    frame_times = np.arange(T) * tr
    rows = {ev: np.array(blocks, dtype=float).T for ev, blocks in events.items()}  # (2 or 3, n)
    conditions = {ev: r if len(r) == 3 else np.vstack([r, np.ones(r.shape[1])]) for ev, r in rows.items()}
    return {  # same call and oversampling as tasks.block_regressor, so column 0 is exactly that regressor
        ev: compute_regressor(c, "glover + derivative + dispersion", frame_times, oversampling=16)[0]
        for ev, c in conditions.items()
    }


def _save(sim: SimGrid, columns: np.ndarray, path: Path, tr: float | None = None) -> None:
    """Write support columns (N, K) as NIfTI on the output grid: 3D for K = 1, else 4D with TR ``tr``."""
    import nibabel as nib

    vol = sim.to_grid(columns)  # (D, H, W, K)
    img = nib.Nifti1Image(vol[..., 0] if vol.shape[-1] == 1 else vol, sim.write_affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(sim.write_affine, code=4)
    img.header.set_sform(sim.write_affine, code=4)
    if tr is not None:
        img.header.set_zooms((sim.voxel_mm,) * 3 + (tr,))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)

"""The simulator on any design: ``fmrisynth simulate --events design.tsv --tr --frames``.

The yardstick of a virtual experiment: the same design through the simulator's real-like subjects
(data/simulator.py: real HCP betas painted on cortex, real rest-subject backgrounds, drift,
thermal noise, phase-encoding distortion) and analysed exactly as the generated runs. Written as
a raw BIDS dataset, which nilearn's ``first_level_from_bids`` and ``fmrisynth prepare --source
bids`` read::

    dataset_description.json, simulation.json, config.yaml, .bidsignore (simulation.json, config.yaml, truth)
    sub-simNNN/func/sub-simNNN_task-NAME_run-K_bold.nii.gz   int16, TR in zooms[3]; K per phase encoding
    sub-simNNN/func/sub-simNNN_task-NAME_run-K_bold.json     RepetitionTime, TaskName, StartTime 0 (frame k
                                                             is the brain at k * TR), PhaseEncodingDirection
                                                             (i or i-: LR/RL along the image's first axis)
    sub-simNNN/func/sub-simNNN_task-NAME_run-K_events.tsv    the design (data/design.py)
    sub-simNNN/truth/<condition>.nii.gz, brain_mask.nii.gz, design_run-K.tsv   ground truth

Subject i is the simulator's subject i (the same person as ``sim00i`` of an HCP-layout dataset
with the same seed); ``first_subject`` picks people the model never saw. The background's AR
dynamics are those of real HCP rest at 0.72 s, sampled frame by frame: at another TR they are
as fast in frames, not in seconds. Same seed, same bytes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmrisynth import __version__
from fmrisynth.config import Config
from fmrisynth.data.design import default_task, design_tsv, read_design
from fmrisynth.data.simulator import _check, _pe_index, _regressors, _save, _Subject, trial_gains, write_provenance
from fmrisynth.data.simulator import PROVENANCE, write_truth
from fmrisynth.errors import FmrisynthError
from fmrisynth.publish import staged
from fmrisynth.tasks import HCP24


def pe_direction(pe: str, affine: np.ndarray) -> str:
    """BIDS ``PhaseEncodingDirection`` of an HCP-style ``LR``/``RL`` run: ``i`` when phase runs from the
    first axis' index 0 upwards, ``i-`` when downwards; left to right is upwards where that axis points right."""
    return "i" if (pe == "LR") == (float(affine[0, 0]) > 0) else "i-"


@dataclass
class _Design:
    """A design as every simulated subject runs it: ``events`` condition -> [(onset, duration,
    modulation)] in seconds, their regressors at unit gain ``regs`` (condition -> (T, 3)), the BIDS
    events.tsv text, TR (s), frames and task label."""

    events: dict[str, list[tuple[float, float, float]]]
    regs: dict[str, np.ndarray]
    tsv: str
    tr: float
    frames: int
    task: str


def simulate_design(cfg: Config, out: Path, events_file: Path | None, tr: float | None, frames: int | None,
                    task: str | None = None, no_tasks: bool = True, first_subject: int = 0,
                    progress: bool = True) -> dict:  # fmt: skip
    """Write ``cfg.sim.subjects`` subjects, one run per phase encoding in ``cfg.sim.runs``, of the design.

    ``task`` defaults to the events file's name; ``no_tasks`` is False when the user also named HCP
    paradigms (``--tasks``), which a design replaces. Returns a summary: subjects, runs, grid,
    output path and seconds taken.
    """
    from tqdm import tqdm

    if None in (events_file, tr, frames) or not no_tasks:
        raise FmrisynthError("--events takes --tr and --frames (and no --tasks); --tr, --frames, --task need --events")
    out, task = Path(out), task or default_task(events_file, "sim")
    if not task.isascii() or not task.isalnum():
        raise FmrisynthError(f"--task {task!r} must be letters and digits only (a BIDS label)")
    if not (np.isfinite(tr) and tr > 0) or frames < 1 or first_subject < 0:
        raise FmrisynthError(f"--tr must be > 0 s and --frames >= 1 (got {tr}, {frames})")
    _, sim = _check(cfg.sim, out)
    d = _read(events_file, tr, frames, task)
    started = time.perf_counter()
    subjects = [f"sim{first_subject + k + 1:03d}" for k in range(cfg.sim.subjects)]
    with staged(out) as tmp:
        records = {}
        for k, name in enumerate(tqdm(subjects, desc="simulate", unit="subject", disable=not progress)):
            subject = _Subject(sim, cfg.sim, cfg.seed, first_subject + k)
            records[name] = subject.record
            write_truth(sim, subject, list(d.events), tmp / f"sub-{name}" / "truth")
            for r, pe in enumerate(cfg.sim.runs, start=1):
                _write_run(subject, d, r, pe, tmp / f"sub-{name}")
        description = {"Name": f"fmrisynth simulation of {Path(events_file).name}", "BIDSVersion": "1.9.0",
                       "DatasetType": "raw",
                       "GeneratedBy": [{"Name": "fmrisynth simulate", "Version": __version__}]}  # fmt: skip
        (tmp / "dataset_description.json").write_text(json.dumps(description, indent=1))
        (tmp / ".bidsignore").write_text(f"{PROVENANCE}\nconfig.yaml\nsub-*/truth\n")  # not BIDS: ours
        meta = {"generator": "fmrisynth simulate --events", "seed": cfg.seed, "grid": cfg.sim.grid,
                "shape": list(sim.shape), "affine": sim.write_affine.tolist(), "tr": tr, "frames": frames,
                "task": task, "runs": list(cfg.sim.runs), "conditions": list(d.events), "first_subject": first_subject,
                "truth_units": "percent signal change per unit of nilearn's Glover regressor",
                "subjects": records}  # fmt: skip
        write_provenance(tmp, meta, cfg)
    return {"out": str(out), "subjects": subjects, "runs": len(subjects) * len(cfg.sim.runs), "grid": cfg.sim.grid,
            "shape": list(sim.shape), "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip


def _read(events_file: Path, tr: float, frames: int, task: str) -> _Design:
    """The design of ``events_file`` (HCP24 conditions), checked against TR and frames."""
    design = read_design(events_file, HCP24, tr, frames, task)
    events: dict[str, list[tuple[float, float, float]]] = {}
    for e in design:
        events.setdefault(e.condition, []).append((e.onset_s, e.duration_s, e.modulation))
    return _Design(events, _regressors(events, frames, tr), design_tsv(design), tr, frames, task)


def _write_run(subject: _Subject, d: _Design, r: int, pe: str, root: Path) -> None:
    """Write run ``r`` (phase encoding ``pe``) of ``subject`` under its folder ``root`` (sub-simNNN):
    func/ image, sidecar and events.tsv, and its true canonical design as truth/design_run-r.tsv.

    Background and noise are seeded by (seed, subject, phase encoding); with ``sim.trial_sd`` each
    event draws its own gain from a second stream of the same and the regressors are made again.
    """
    rng = np.random.default_rng([subject.seed, 3, subject.i, _pe_index(pe)])
    gains = np.random.default_rng([subject.seed, 5, subject.i, _pe_index(pe)])
    sd = subject.cfg.trial_sd
    regs = d.regs if sd == 0 else _regressors(trial_gains(d.events, sd, gains), d.frames, d.tr)  # condition -> (T, 3)
    volume, canonical = subject.make(regs, list(d.events), pe, rng, d.frames, d.tr)  # (N, T) int16
    stem = root / "func" / f"{root.name}_task-{d.task}_run-{r}"
    _save(subject.sim, volume, stem.with_name(stem.name + "_bold.nii.gz"), d.tr)
    sidecar = {"RepetitionTime": d.tr, "TaskName": d.task, "StartTime": 0.0,
               "PhaseEncodingDirection": pe_direction(pe, subject.sim.write_affine)}  # fmt: skip
    stem.with_name(stem.name + "_bold.json").write_text(json.dumps(sidecar, indent=1))
    stem.with_name(stem.name + "_events.tsv").write_text(d.tsv)
    canonical.to_csv(root / "truth" / f"design_run-{r}.tsv", sep="\t", index=False, float_format="%.6g")

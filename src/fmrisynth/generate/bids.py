"""The output of ``fmrisynth sample``: a BIDS derivative dataset, written and read here only.

Whole runs (``--events``) and single clips (``--condition --n``) share one layout, so that nilearn,
fMRIPrep-style tools and ``fmrisynth evaluate`` all read the same files::

    dataset_description.json        Name, BIDSVersion, DatasetType "derivative", GeneratedBy
    sub-synthNN/func/
      sub-synthNN_task-NAME_run-1_bold.nii.gz             (D, H, W, T) float32, model grid and affine,
                                                          zooms[3] = TR
      sub-synthNN_task-NAME_run-1_bold.json               RepetitionTime, TaskName, seed, generator
      sub-synthNN_task-NAME_run-1_events.tsv              the design (data/design.py)
      sub-synthNN_task-NAME_run-1_desc-brain_mask.nii.gz  the model's brain mask (uint8)

Values are in the model's units: each voxel z-scored over its run, as the training runs were, so
the mean image is ~0 and nilearn must neither scale by the mean nor guess a mask from it
(``signal_scaling=False`` and the mask file; README, "Virtual experiments").

Every generated subject draws its own response maps and background, so each is its own ``sub-``.
In clip mode each clip is a subject and the task label is the condition without punctuation
(``MOTOR:rh`` -> ``MOTORrh``); the sidecar keeps ``condition``, ``onset_s``, ``duration_s``, ``tr``,
``seed`` and ``checkpoint`` for ``evaluate`` (``read_clips``). The checkpoint is recorded relative to
the file naming it (``fmrisynth.publish.record_path``), so a run shared with its samples is found.

Writing is all or nothing (``fmrisynth.publish``): files are staged beside ``out`` and published
once every run is written, by one rename for a new dataset; into an existing one (another task)
each new file is moved in, and nothing already there changes. Runs that already exist are refused
up front, never overwritten. ``.bidsignore`` keeps ``config.yaml`` (what ``sample`` ran with) out of
a BIDS validator's way.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from fmrisynth import __version__
from fmrisynth.data.design import Event, design_tsv
from fmrisynth.errors import FmrisynthError
from fmrisynth.publish import record_path, remove_stale, resolve_recorded, staged

BIDS_VERSION = "1.9.0"
CLIP_KEYS = ("condition", "onset_s", "duration_s", "tr")  # what evaluation needs from a clip's sidecar
LABEL = re.compile(r"[A-Za-z0-9]+")


def task_label(name: str) -> str:
    """A BIDS task label must be letters and digits: ``--task`` is checked, a condition is stripped."""
    if not LABEL.fullmatch(name):
        raise FmrisynthError(f"--task {name!r} must be letters and digits only (a BIDS label), e.g. MotorRun")
    return name


def condition_task(condition: str) -> str:
    """The task label of a clip of ``condition``: ``MOTOR:rh`` -> ``MOTORrh``."""
    label = "".join(re.findall(r"[A-Za-z0-9]", condition))
    if not label:
        raise FmrisynthError(f"condition {condition!r} has no letters or digits to name a BIDS task")
    return label


def subject_labels(n: int) -> list[str]:
    """``synth01`` ... (two digits, more when n > 99)."""
    width = max(2, len(str(n)))
    return [f"synth{k + 1:0{width}d}" for k in range(n)]


def run_stem(subject: str, task: str) -> str:
    return f"sub-{subject}/func/sub-{subject}_task-{task}_run-1"


class DatasetWriter:
    """Write runs into ``out`` as one BIDS derivative dataset, all at once on ``commit``.

    Args:
        out: dataset root (created if absent; other tasks' runs already in it stay).
        runs: every (subject, task) to be written, checked free before any work is done.
        affine: (4, 4) of the model grid; mask: (D, H, W) bool, the in-mask voxels of a run's (T, V).
        checkpoint: the stage-2 checkpoint, for GeneratedBy and the sidecars.
    """

    def __init__(self, out: str | Path, runs: list[tuple[str, str]], affine: np.ndarray, mask: np.ndarray,
                 checkpoint: Path, name: str = "fmrisynth synthetic fMRI"):  # fmt: skip
        self.out, self.affine, self.mask = Path(out), np.asarray(affine, float), np.asarray(mask, bool)
        self.checkpoint = Path(checkpoint).resolve()
        taken = [s for s in map(run_stem, *zip(*runs)) if (self.out / f"{s}_bold.nii.gz").exists()] if runs else []
        if taken:
            raise FmrisynthError(f"already holds {taken[0]}_bold.nii.gz ({len(taken)} of these runs); "
                                 "choose a new --out or another --task", self.out)  # fmt: skip
        description = self.out / "dataset_description.json"
        if description.is_file():
            try:
                recorded = json.loads(description.read_text())["GeneratedBy"][0]["Checkpoint"]
                theirs = resolve_recorded(recorded, description)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                raise FmrisynthError("is not a dataset written by fmrisynth sample; choose a new --out",
                                     description) from None  # fmt: skip
            if theirs != self.checkpoint:
                raise FmrisynthError(f"holds runs of another checkpoint ({theirs}); choose a new --out", self.out)
        self.description = {
            "Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "fmrisynth", "Version": __version__,
                             "Checkpoint": record_path(self.checkpoint, description),
                             "Description": "synthetic runs: space-time latent diffusion + HRF response model"}],
        }  # fmt: skip
        self._stack = ExitStack()

    def __enter__(self) -> "DatasetWriter":
        remove_stale(self.out)  # what older versions staged inside the dataset
        self.tmp = self._stack.enter_context(staged(self.out))
        try:
            (self.tmp / "dataset_description.json").write_text(json.dumps(self.description, indent=1))
            (self.tmp / ".bidsignore").write_text("config.yaml\n")
        except BaseException as e:
            self._stack.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self._stack.__exit__(kind, value, traceback)  # publishes the dataset, or deletes it after an error

    def add(self, subject: str, task: str, run: np.ndarray, tr: float, events: list[Event], sidecar: dict) -> Path:
        """One run (T, V) of in-mask voxels, its design and its sidecar extras; returns its final path."""
        import nibabel as nib

        if not np.isfinite(run).all():
            raise FmrisynthError(f"run of sub-{subject} holds non-finite values; nothing was written", self.checkpoint)
        stem = run_stem(subject, task)
        (self.tmp / stem).parent.mkdir(parents=True, exist_ok=True)
        volume = np.zeros((*self.mask.shape, len(run)), np.float32)  # (D, H, W, T)
        volume[self.mask] = run.T
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(0))
        img = nib.Nifti1Image(volume, self.affine)
        img.header.set_zooms((*zooms, tr))
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, self.tmp / f"{stem}_bold.nii.gz")
        mask = nib.Nifti1Image(self.mask.astype(np.uint8), self.affine)
        nib.save(mask, self.tmp / f"{stem}_desc-brain_mask.nii.gz")
        # frame k is the brain at k * TR (the response model's frame times): nilearn reads slice_time_ref 0 from it
        meta = {"RepetitionTime": float(tr), "TaskName": task, "StartTime": 0.0, "SkullStripped": True, **sidecar,
                "checkpoint": record_path(self.checkpoint, self.out / f"{stem}_bold.json")}  # fmt: skip
        (self.tmp / f"{stem}_bold.json").write_text(json.dumps(meta, indent=1))
        (self.tmp / f"{stem}_events.tsv").write_text(design_tsv(events))
        return self.out / f"{stem}_bold.nii.gz"


def bold_files(root: str | Path) -> list[Path]:
    """The runs of a dataset written by ``DatasetWriter``, sorted by subject and task."""
    root = Path(root)
    return sorted(root.glob("sub-*/func/sub-*_bold.nii.gz"))


def read_sidecar(bold: Path) -> dict:
    sidecar = bold.with_name(bold.name.replace("_bold.nii.gz", "_bold.json"))
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise FmrisynthError(f"sidecar missing or not JSON ({e})", sidecar) from None
    if not isinstance(meta, dict):
        raise FmrisynthError("sidecar is not a JSON object", sidecar)
    return meta


def read_clips(root: str | Path) -> tuple[list[Path], list[dict], list[str]]:
    """Clips written by ``fmrisynth sample --condition``, for evaluation: files, labels, checkpoints.

    A row is ``{condition, onset_s, duration_s, tr}`` from each sidecar. Whole runs (``--events``)
    have no single condition and are refused: nilearn analyses them (README, "Virtual experiments").
    """
    root = Path(root)
    files = bold_files(root)
    if not files:
        flat = sorted(root.glob("*_bold.nii.gz"))
        hint = " (this folder holds the old flat layout: sample it again)" if flat else ""
        raise FmrisynthError(f"no generated clips (sub-*/func/*_bold.nii.gz) found{hint}", root)
    rows, checkpoints = [], {}
    for f in files:
        meta = read_sidecar(f)
        sidecar = f.with_name(f.name.replace(".nii.gz", ".json"))
        if "condition" not in meta and meta.get("mode") == "events":
            raise FmrisynthError("is a whole run of a design, not a clip; analyse it with nilearn "
                                 "(README, Virtual experiments)", f)  # fmt: skip
        try:
            rows.append({k: meta[k] for k in CLIP_KEYS})
        except KeyError as e:
            raise FmrisynthError(f"sidecar incomplete (no {e}); it needs {', '.join(CLIP_KEYS)}", sidecar) from None
        if not all(isinstance(meta[k], (int, float)) and not isinstance(meta[k], bool) and math.isfinite(meta[k])
                   for k in CLIP_KEYS[1:]):  # fmt: skip
            raise FmrisynthError(f"{', '.join(CLIP_KEYS[1:])} must be finite numbers", sidecar)
        if isinstance(meta.get("checkpoint"), str) and meta["checkpoint"]:
            checkpoints.setdefault(str(resolve_recorded(meta["checkpoint"], sidecar)), None)
    return files, rows, list(checkpoints)

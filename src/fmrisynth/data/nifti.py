"""A 4D run and every check on it, in one place.

Readers (``hcp.py``, ``bids.py``) describe a run from its header alone (cheap: nothing is
decompressed), so that a whole dataset is validated -- paths, 4D shape, TR, events inside the run,
one affine per subject -- before the first voxel is read or the first clip written. Preprocessing
then loads the voxels through ``load_run``, which catches corrupt files and non-finite values.
Each problem becomes one ``FmrisynthError`` naming the file, never a numpy or zlib traceback.
"""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from fmrisynth.errors import FmrisynthError

Events = dict[str, list[tuple[float, float]]]  # condition -> [(onset_s, duration_s), ...]
_TIME_UNITS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}


def why(e: BaseException) -> str:
    """An exception as one short line for an error message: ``Type: message`` (newlines folded)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300] + ('...' if len(text) > 300 else '')}"


@dataclass
class Run:
    """One 4D BOLD run, described from its header and its events.

    Attributes:
        path: the NIfTI file.
        dataset, subject, task, run, pe: labels copied into the clip manifest (``pe`` is the
            phase-encoding direction, '' when unknown).
        tr: repetition time in seconds (from the dataset's convention, not the header).
        shape: (X, Y, Z, T) of the image.
        affine: 4x4 voxel-to-world affine.
        events: condition -> [(onset_s, duration_s)], every event of the run (not only the
            conditions asked for: rest clips need to know when *nothing* happens).
        events_path: where the events came from, for error messages.
    """

    path: Path
    dataset: str
    subject: str
    task: str
    run: str
    pe: str
    tr: float
    shape: tuple[int, int, int, int]
    affine: np.ndarray = field(repr=False)
    events: Events = field(default_factory=dict, repr=False)
    events_path: Path | None = None

    @property
    def n_frames(self) -> int:
        return self.shape[3]

    @property
    def key(self) -> str:
        """Unique within a dataset: subject/task/run."""
        return f"{self.subject}/{self.task}/{self.run}"


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


def open_image(path: Path, ndim: int = 4) -> nib.Nifti1Image:
    """The image proxy (header only), checked to exist, parse and have ``ndim`` dimensions.

    What nibabel repairs in a header on reading (it logs to stderr) becomes one warning naming
    the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FmrisynthError("file not found", path)
    logger, collect = logging.getLogger("nibabel.global"), _Collect()
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [collect], False
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error ... for bad files
        raise FmrisynthError(f"not a readable NIfTI image ({why(e)})", path) from None
    finally:
        logger.handlers, logger.propagate = handlers, propagate
    if collect.messages:
        repairs = "; ".join(dict.fromkeys(collect.messages))
        warnings.warn(f"{path}: header repaired on reading ({repairs})")  # one location: said once per file
    shape = img.shape
    affine = img.affine
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise FmrisynthError("the image's voxel-to-world affine is missing, not finite or singular", path)
    if ndim == 4 and len(shape) == 3:
        raise FmrisynthError(f"image is 3D {shape}; a run must be 4D (x, y, z, time)", path)
    if ndim == 3 and len(shape) == 4 and shape[3] == 1:
        return img.slicer[..., 0]
    if len(shape) != ndim or min(shape) < 1:
        raise FmrisynthError(f"image has shape {shape}; expected {ndim} dimensions", path)
    return img


def header_tr(img: nib.Nifti1Image) -> float | None:
    """The TR the header claims, in seconds (None if it claims nothing usable)."""
    zooms = img.header.get_zooms()
    if len(zooms) < 4 or not zooms[3] > 0:
        return None
    unit = img.header.get_xyzt_units()[1]
    return float(zooms[3]) * _TIME_UNITS.get(unit, 1.0)


def check_tr(tr: float | None, img: nib.Nifti1Image, path: Path, source: str) -> float:
    """Validate the dataset's TR; warn (and keep it) when the NIfTI header says otherwise.

    The header is the least trusted place for the TR (tools often leave 1.0 or 0 there), so it
    never wins; a disagreement is still worth a warning because it can reveal the wrong sidecar.
    """
    if tr is None:
        raise FmrisynthError(f"no repetition time ({source})", path)
    try:
        if isinstance(tr, bool):
            raise TypeError(tr)
        tr = float(tr)
    except (TypeError, ValueError, OverflowError):
        raise FmrisynthError(f"repetition time {tr!r} is not a number ({source})", path) from None
    if not math.isfinite(tr) or tr <= 0:
        raise FmrisynthError(f"repetition time is {tr} s; expected a positive number ({source})", path)
    claimed = header_tr(img)
    if claimed is not None and abs(claimed - tr) > 1e-3:
        warnings.warn(f"{path}: NIfTI header says TR {claimed:g} s, using {tr:g} s from {source}", stacklevel=2)
    return tr


def check_events(events: Events, n_frames: int, tr: float, path: Path) -> None:
    """Every event must have a finite onset and duration >= 0 and end inside the run.

    One TR of slack at the end allows for the usual rounding of block ends to whole frames.
    """
    run_s = n_frames * tr
    for condition, items in events.items():
        for onset, duration in items:
            if not (math.isfinite(onset) and math.isfinite(duration)) or onset < 0 or duration < 0:
                raise FmrisynthError(f"{condition}: event onset {onset} s, duration {duration} s is invalid", path)
            if onset >= run_s or onset + duration > run_s + tr:
                raise FmrisynthError(
                    f"{condition}: event at {onset:g} s lasting {duration:g} s ends after the run "
                    f"({n_frames} frames x {tr:g} s = {run_s:g} s)",
                    path,
                )


def check_affines(runs: list[Run]) -> None:
    """All runs of a subject must share one affine: clips of a subject are compared voxel by voxel."""
    first: dict[str, Run] = {}
    for run in runs:
        ref = first.setdefault(run.subject, run)
        if not np.allclose(run.affine, ref.affine, atol=1e-3):
            raise FmrisynthError(
                f"affine differs from the subject's other run {ref.path.name}; "
                "register the runs of a subject to one space first",
                run.path,
            )


def load_run(run: Run) -> tuple[np.ndarray, np.ndarray | None]:
    """The run's voxels, float32 (X, Y, Z, T), and its voxels with NaN/Inf as bool (X, Y, Z) or None.

    Non-finite values are set to 0 so that interpolation stays finite; preprocessing then masks
    out whatever the bad voxels touch. A run with no finite value at all is an error.
    """
    img = open_image(run.path)
    try:
        data = img.get_fdata(dtype=np.float32)  # (X, Y, Z, T)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise FmrisynthError(f"corrupt or truncated image data ({why(e)})", run.path) from None
    except MemoryError:
        reason = f"not enough memory for an image of shape {img.shape}; is its header corrupt?"
        raise FmrisynthError(reason, run.path) from None
    finite = np.isfinite(data)
    if finite.all():
        if not data.any():
            warnings.warn(f"{run.path}: every value of the run is 0; its clips carry no signal", stacklevel=2)
        return data, None
    if not finite.any():
        raise FmrisynthError("every value of the run is NaN or Inf", run.path)
    data[~finite] = 0.0
    return data, ~finite.all(axis=3)

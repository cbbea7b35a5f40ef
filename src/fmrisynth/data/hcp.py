"""Reader for the HCP layout (also what ``fmrisynth simulate`` writes).

::

    <root>/<subject>/MNINonLinear/Results/tfMRI_<TASK>_<PE>/tfMRI_<TASK>_<PE>.nii.gz
                                                            /EVs/<ev>.txt   onset duration amplitude

A condition is ``<TASK>:<ev>`` (``MOTOR:rh``), as in ``tasks.py``. The TR is HCP's 0.72 s: the
protocol fixes it, and a header that disagrees only earns a warning. ``write_run`` (``run_folder``,
``run_image``, ``write_evs``) is the other direction, so that the layout is spelled out in one place
(the simulator, synthetic datasets, tests, benchmarks).
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from fmrisynth.data.nifti import Events, Run, check_events, check_tr, open_image, why
from fmrisynth.errors import FmrisynthError
from fmrisynth.tasks import HCP_TR

RUN_DIR = re.compile(r"tfMRI_([A-Za-z0-9]+)_(LR|RL|AP|PA)")
NOT_EVS = {"Sync.txt"}  # HCP's scanner sync time: one number, not an explanatory variable


def read_ev(path: Path) -> list[tuple[float, float]]:
    """One FSL 3-column EV file -> [(onset_s, duration_s)]; HCP's all-zero placeholder rows are dropped."""
    try:
        text = path.read_text()
    except (OSError, ValueError) as e:  # ValueError: UnicodeDecodeError
        raise FmrisynthError(f"unreadable EV file ({why(e)})", path) from None
    if not text.strip():
        return []
    try:
        table = np.loadtxt(text.splitlines(), ndmin=2)
    except ValueError as e:
        raise FmrisynthError(f"not an EV file of numbers ({why(e)})", path) from None
    if table.shape[1] != 3:
        raise FmrisynthError(f"EV file has {table.shape[1]} columns; expected onset, duration, amplitude", path)
    return [(float(o), float(d)) for o, d, a in table if (o, d, a) != (0.0, 0.0, 0.0)]


def run_folder(root: Path, subject: str, task: str, pe: str) -> Path:
    """The folder of one run: ``<root>/<subject>/MNINonLinear/Results/tfMRI_<TASK>_<PE>``."""
    return Path(root) / subject / "MNINonLinear" / "Results" / f"tfMRI_{task}_{pe}"


def run_image(folder: Path) -> Path:
    """The 4D image of the run in ``folder`` (``run_folder``): ``tfMRI_<TASK>_<PE>.nii.gz``."""
    return Path(folder) / f"{Path(folder).name}.nii.gz"


def write_evs(folder: Path, events: Events) -> None:
    """The EV files of the run in ``folder``: ``EVs/<ev>.txt`` per EV, headerless rows
    ``onset<TAB>duration<TAB>1`` in seconds (three decimals)."""
    (Path(folder) / "EVs").mkdir(parents=True, exist_ok=True)
    for ev, items in events.items():
        (Path(folder) / "EVs" / f"{ev}.txt").write_text("".join(f"{o:.3f}\t{d:.3f}\t1\n" for o, d in items))


def write_run(root: Path, subject: str, task: str, pe: str, data: np.ndarray, affine: np.ndarray, events: Events) -> Path:
    """Write one run in the HCP layout: data (X, Y, Z, T) with TR 0.72 s, and events keyed by EV name."""
    folder = run_folder(root, subject, task, pe)
    write_evs(folder, events)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms(img.header.get_zooms()[:3] + (HCP_TR,))
    nib.save(img, run_image(folder))
    return folder


def find_runs(root: Path) -> list[Run]:
    """Every task run under ``root``, with its events, validated from headers only."""
    root = Path(root)
    if not root.is_dir():
        raise FmrisynthError("dataset root not found", root)
    runs = []
    for folder in sorted(root.glob("*/MNINonLinear/Results/tfMRI_*")):
        m = RUN_DIR.fullmatch(folder.name)
        if not m or not folder.is_dir():
            continue
        path = run_image(folder)
        img = open_image(path)
        tr = check_tr(HCP_TR, img, path, "HCP protocol")
        events: Events = {}
        for ev in sorted((folder / "EVs").glob("*.txt")):
            if ev.name not in NOT_EVS:
                condition = f"{m.group(1)}:{ev.stem}"
                events[condition] = read_ev(ev)
                check_events({condition: events[condition]}, img.shape[3], tr, ev)
        if not any(events.values()):  # a task run without timings would silently yield no clips
            what = "its EVs/ folder holds no event" if (folder / "EVs").is_dir() else "it has no EVs/ folder"
            raise FmrisynthError(f"task run without events: {what} (<ev>.txt: onset duration amplitude)", folder)
        runs.append(
            Run(
                path=path,
                dataset=root.resolve().name,
                subject=folder.parents[2].name,
                task=m.group(1),
                run=m.group(2),
                pe=m.group(2),
                tr=tr,
                shape=tuple(img.shape),
                affine=img.affine,
                events=events,
                events_path=folder / "EVs",
            )
        )
    if not runs:
        raise FmrisynthError("no HCP task runs found (expected <subject>/MNINonLinear/Results/tfMRI_<TASK>_<LR|RL>/)", root)
    return runs

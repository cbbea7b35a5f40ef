"""Reader for BIDS datasets: ``sub-*/[ses-*/]func/*_task-*[_run-*]_bold.nii[.gz]``.

Metadata follow the BIDS inheritance principle: a ``_bold.json`` or ``_events.tsv`` applies to
a run when its entities are a subset of the run's, at the dataset level, the subject, the session
or beside the run; JSON sidecars are merged from the top down (the deeper file wins) and the
nearest events file is used. The TR is the sidecar's ``RepetitionTime``. A condition is
``<task>:<trial_type>``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from fmrisynth.data.design import read_events_tsv
from fmrisynth.data.nifti import Events, Run, check_events, check_tr, open_image, why
from fmrisynth.errors import FmrisynthError

ENTITY = re.compile(r"([a-zA-Z0-9]+)-([a-zA-Z0-9]+)")


def entities(path: Path) -> tuple[dict[str, str], str]:
    """``sub-1_task-x_run-01_bold.nii.gz`` -> ({sub: 1, task: x, run: 01}, "bold")."""
    name = path.name.split(".")[0]
    *parts, suffix = name.split("_")
    return dict(m.groups() for p in parts if (m := ENTITY.fullmatch(p))), suffix


def inherited(bold: Path, root: Path, suffix: str, ext: str) -> list[Path]:
    """Files ``*_<suffix><ext>`` that apply to the run, from the dataset level down to the run's folder."""
    run_entities = entities(bold)[0]
    found = []
    level = root
    for part in ("", *bold.relative_to(root).parts[:-1]):
        level = level / part
        candidates = []
        for f in level.glob(f"*_{suffix}{ext}"):
            ents, sfx = entities(f)
            if sfx == suffix and ents.items() <= run_entities.items():
                candidates.append((len(ents), f))
        found += [f for _, f in sorted(candidates)]
    return found


def read_events(path: Path, task: str) -> Events:
    """A BIDS events.tsv -> {"<task>:<trial_type>": [(onset_s, duration_s)]}; 'n/a' trial types are skipped
    (read by ``data.design.read_events_tsv``, the format's one reader; modulation is not used here)."""
    events: Events = {}
    for _, e in read_events_tsv(path, modulation=False):
        events.setdefault(f"{task}:{e.condition}", []).append((e.onset_s, e.duration_s))
    return events


def read_sidecar(bold: Path, root: Path) -> dict:
    """The run's metadata: every applicable ``_bold.json`` merged, deeper files overriding."""
    meta: dict = {}
    for f in inherited(bold, root, "bold", ".json"):
        try:
            loaded = json.loads(f.read_text())
        except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise FmrisynthError(f"unreadable sidecar JSON ({why(e)})", f) from None
        if not isinstance(loaded, dict):
            raise FmrisynthError(f"sidecar JSON is a {type(loaded).__name__}, not an object of fields", f)
        meta.update(loaded)
    return meta


def find_runs(root: Path) -> list[Run]:
    """Every BOLD run with events under ``root``, validated from headers only.

    Resting-state runs (a task name starting with "rest") without events carry no labels and are
    skipped with a warning; any other run without an events file, or whose events file holds no
    event, is an error (its clips would silently be missing).
    """
    root = Path(root)
    if not root.is_dir():
        raise FmrisynthError("dataset root not found", root)
    bolds = sorted(
        p for pattern in ("sub-*/func/*_bold.nii*", "sub-*/ses-*/func/*_bold.nii*") for p in root.glob(pattern)
    )
    runs = []
    for bold in bolds:
        ents, _ = entities(bold)
        if "sub" not in ents or "task" not in ents:
            continue
        events_files = inherited(bold, root, "events", ".tsv")
        if not events_files:
            if ents["task"].lower().startswith("rest"):
                warnings.warn(f"{bold}: resting-state run without events, skipped", stacklevel=2)
                continue
            raise FmrisynthError("task run without an events file (*_events.tsv beside it or above it)", bold)
        img = open_image(bold)
        tr = check_tr(read_sidecar(bold, root).get("RepetitionTime"), img, bold, "sidecar RepetitionTime")
        events = read_events(events_files[-1], ents["task"])
        if not any(events.values()):
            raise FmrisynthError("events file has no event with a trial_type", events_files[-1])
        check_events(events, img.shape[3], tr, events_files[-1])
        run_label = "_".join(f"{k}-{v}" for k, v in ents.items() if k not in ("sub", "task")) or "1"
        runs.append(
            Run(
                path=bold,
                dataset=root.resolve().name,
                subject=ents["sub"],
                task=ents["task"],
                run=run_label,
                pe=ents.get("dir", ""),
                tr=tr,
                shape=tuple(img.shape),
                affine=img.affine,
                events=events,
                events_path=events_files[-1],
            )
        )
    if not runs:
        raise FmrisynthError("no BOLD runs with events found (expected sub-*/[ses-*/]func/*_task-*_bold.nii.gz)", root)
    return runs

"""The events of every run a clip store was cut from: ``events.tsv`` beside ``manifest.tsv``.

A clip shows 14 s of a run, but what it holds depends on the whole design: the tail of the
previous block's haemodynamic response, blocks of conditions that were never labels (HCP's
LANGUAGE:math, the 17 other EVs), the rest baseline between blocks. The response model
(models/response.py) needs all of them, so ``prepare`` keeps every event of every run here.
This module writes and reads the file; nothing else touches it.

Columns: ``subject``, ``task``, ``run`` (the manifest's labels of the run), ``condition``,
``onset_s`` and ``duration_s`` in seconds from the run's first frame.

Stores written before this file existed are read from their manifest instead: every block of a
labelled condition has a clip, so the labelled events of each run come back from the clips'
``start_frame * tr + onset_s``; what cannot come back is the events of conditions without clips.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from fmrisynth.errors import FmrisynthError

FILE = "events.tsv"
COLUMNS = ["subject", "task", "run", "condition", "onset_s", "duration_s"]
REST = "rest"  # prepare's label of fixation clips: a clip, not an event


class RunEvent(NamedTuple):
    condition: str
    onset_s: float  # seconds from the run's first frame
    duration_s: float


RunKey = tuple[str, str, str]  # (subject, task, run) as strings, as in the manifest


def write_run_events(folder: str | Path, runs) -> Path:
    """Write the events of ``runs`` (``data.nifti.Run``, all of their conditions) to ``folder/events.tsv``."""
    lines = ["\t".join(COLUMNS)]
    for run in runs:
        for condition, items in sorted(run.events.items()):
            lines += [f"{run.subject}\t{run.task}\t{run.run}\t{condition}\t{onset:.4f}\t{duration:.4f}"
                      for onset, duration in sorted(items)]  # fmt: skip
    path = Path(folder) / FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def read_run_events(store) -> tuple[dict[RunKey, list[RunEvent]], bool]:
    """Every run's events of a ``ClipStore``, and whether they are complete (False: rebuilt from the manifest).

    Runs without clips in the store are left out; a damaged file is one line naming it.
    """
    import pandas as pd

    path = Path(store.path) / FILE
    if not path.is_file():
        return _from_manifest(store.manifest), False
    try:
        table = pd.read_csv(path, sep="\t", dtype={c: str for c in COLUMNS[:4]}, keep_default_na=False)
        missing = sorted(set(COLUMNS) - set(table.columns))
        if missing:
            raise ValueError(f"lacks column(s) {', '.join(missing)}")
        onsets, durations = table["onset_s"].astype(float), table["duration_s"].astype(float)
    except (OSError, ValueError) as e:
        raise FmrisynthError(f"unreadable run events ({' '.join(str(e).split())[:200]})", path) from None
    events: dict[RunKey, list[RunEvent]] = {}
    for s, t, r, c, o, d in zip(table["subject"], table["task"], table["run"], table["condition"], onsets, durations):
        events.setdefault((s, t, r), []).append(RunEvent(c, float(o), float(d)))
    return events, True


def run_key(row) -> RunKey:
    """The run of a manifest row (a pandas row or namedtuple with subject, task, run)."""
    get = row.get if hasattr(row, "get") else lambda k: getattr(row, k)
    return str(get("subject")), str(get("task")), str(get("run"))


def _from_manifest(manifest) -> dict[RunKey, list[RunEvent]]:
    events: dict[RunKey, set[RunEvent]] = {}
    for row in manifest.itertuples():
        if row.condition != REST:
            onset = round(float(row.start_frame) * float(row.tr) + float(row.onset_s), 3)
            events.setdefault(run_key(row), set()).add(RunEvent(row.condition, onset, float(row.duration_s)))
    return {k: sorted(v, key=lambda e: (e.onset_s, e.condition)) for k, v in events.items()}

"""A virtual experiment's design: a BIDS ``events.tsv`` read, checked and written in one place.

Both makers of whole runs take a design from the user, ``fmrisynth sample --events`` (the trained
generator) and ``fmrisynth simulate --events`` (the simulator, the yardstick), and both write the
design back beside each run; one reader and one writer keep the two identical. The events.tsv of a
BIDS dataset that ``prepare`` reads (data/bids.py) comes through the same reader, and ``Event`` is
the one record of an event everywhere (the response model's included). It lives in data/ because
the simulator (data) cannot import generate/.

Columns: ``onset`` and ``duration`` in seconds from the first frame, ``trial_type`` a condition the
model knows (``MOTOR:rh``; with a task name, ``rh`` of task ``MOTOR`` is accepted too), and an
optional ``modulation`` that scales each event's response (nilearn reads the same column as the
regressor's amplitude). A trial type of ``n/a`` is skipped, as BIDS allows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

from fmrisynth.errors import FmrisynthError


class Event(NamedTuple):
    """One block or event of a design: onset and duration in seconds from the run's first frame, and a
    modulation that scales its response (the events.tsv column; HCP's EV files call it amplitude).
    The one record of an event: designs read here, the simulator's and the response model's
    (``models/response.py``) events."""

    condition: str
    onset_s: float
    duration_s: float
    modulation: float = 1.0


def read_events_tsv(path: str | Path, modulation: bool = True) -> list[tuple[int, Event]]:
    """The rows of a BIDS events.tsv as (line, event), ``condition`` the ``trial_type`` as written; the
    one reader of the format (``read_design`` here, ``data/bids.py`` for datasets). A trial type of
    ``n/a`` is skipped; an unreadable file, a missing column or a value that is not a number is one
    line naming the file. ``modulation=False``: the column is not read (every event's is 1).
    """
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False)
    except (OSError, ValueError) as e:  # also pandas' ParserError, EmptyDataError, UnicodeDecodeError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FmrisynthError(f"not a readable events.tsv ({reason})", path) from None
    missing = sorted({"onset", "duration", "trial_type"} - set(table.columns))
    if missing:
        raise FmrisynthError(f"events file lacks column(s) {', '.join(missing)} (a tab-separated BIDS events.tsv)", path)
    scales = table["modulation"] if modulation and "modulation" in table.columns else [None] * len(table)
    rows = []
    for line, (onset, duration, trial_type, scale) in enumerate(
            zip(table["onset"], table["duration"], table["trial_type"], scales), start=2):  # fmt: skip
        if pd.isna(trial_type):
            continue
        try:
            rows.append((line, Event(str(trial_type), float(onset), float(duration),
                                     1.0 if scale is None or pd.isna(scale) else float(scale))))
        except (TypeError, ValueError):
            numbers = "onset, duration and modulation" if modulation else "onset and duration"
            raise FmrisynthError(f"line {line}: {numbers} must be numbers", path) from None
    return rows


def read_design(path: str | Path, known: Sequence[str], tr: float, frames: int,
                task: str | None = None) -> list[Event]:  # fmt: skip
    """The events of ``path`` (a BIDS events.tsv), sorted by onset; every problem is one line naming the file.

    Args:
        known: the conditions that may appear (the model's or the simulator's).
        tr, frames: the run the design must fit in: an event that ends after ``frames * tr`` is refused.
        task: lets ``trial_type`` name a condition without its task (``rh`` for ``MOTOR:rh``).
    """
    path = Path(path)
    run_s = frames * tr
    events = []
    for line, e in read_events_tsv(path):
        condition = _condition(e.condition.strip(), known, task, path, line)
        onset, duration, modulation = e.onset_s, e.duration_s, e.modulation
        if not all(map(math.isfinite, (onset, duration, modulation))) or onset < 0 or duration < 0:
            raise FmrisynthError(f"line {line}: onset {onset:g} s, duration {duration:g} s must be finite and >= 0", path)
        if onset + duration > run_s + 1e-6:
            raise FmrisynthError(f"line {line}: the event at {onset:g} s lasting {duration:g} s ends after the run "
                                 f"({frames} frames x {tr:g} s = {run_s:g} s); lengthen --frames or drop it", path)  # fmt: skip
        events.append(Event(condition, onset, duration, modulation))
    if not events:
        raise FmrisynthError("events file holds no events", path)
    return sorted(events, key=lambda e: (e.onset_s, e.condition))


def _condition(trial_type: str, known: Sequence[str], task: str | None, path: Path, line: int) -> str:
    if trial_type in known:
        return trial_type
    if task and f"{task}:{trial_type}" in known:
        return f"{task}:{trial_type}"
    raise FmrisynthError(f"line {line}: unknown trial_type {trial_type!r}; known conditions: {', '.join(known)}", path)


def design_tsv(events: Sequence[Event]) -> str:
    """The BIDS events.tsv text of ``events``: onset, duration, trial_type (and modulation when any is not 1,
    which nilearn then reads as each event's amplitude)."""
    modulated = any(e.modulation != 1 for e in events)
    rows = [f"{e.onset_s:.3f}\t{e.duration_s:.3f}\t{e.condition}" + (f"\t{e.modulation:g}" if modulated else "") + "\n"
            for e in events]  # fmt: skip
    return "onset\tduration\ttrial_type" + ("\tmodulation" if modulated else "") + "\n" + "".join(rows)


def default_task(events_file: str | Path, fallback: str) -> str:
    """A BIDS task label from the events file's name (``motor-run.tsv`` -> ``motorrun``), else ``fallback``."""
    return "".join(ch for ch in Path(events_file).name.split(".")[0] if ch.isascii() and ch.isalnum()) or fallback

"""A virtual experiment's design: a BIDS ``events.tsv`` read, checked and written in one place.

Both makers of whole runs take a design from the user, ``fmrisynth sample --events`` (the trained
generator) and ``fmrisynth simulate --events`` (the simulator, the yardstick), and both write the
design back beside each run; one reader and one writer keep the two identical. It lives in data/
because the simulator (data) cannot import generate/.

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


class DesignEvent(NamedTuple):
    """One event: the same fields, in the same order, as ``models.response.Event``."""

    condition: str
    onset_s: float
    duration_s: float
    modulation: float = 1.0


def read_design(path: str | Path, known: Sequence[str], tr: float, frames: int,
                task: str | None = None) -> list[DesignEvent]:  # fmt: skip
    """The events of ``path`` (a BIDS events.tsv), sorted by onset; every problem is one line naming the file.

    Args:
        known: the conditions that may appear (the model's or the simulator's).
        tr, frames: the run the design must fit in: an event that ends after ``frames * tr`` is refused.
        task: lets ``trial_type`` name a condition without its task (``rh`` for ``MOTOR:rh``).
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
    run_s = frames * tr
    events = []
    for line, row in enumerate(table.itertuples(index=False), start=2):
        row = row._asdict()
        if pd.isna(row["trial_type"]):
            continue
        condition = _condition(str(row["trial_type"]).strip(), known, task, path, line)
        try:
            onset, duration = float(row["onset"]), float(row["duration"])
            modulation = 1.0 if pd.isna(row.get("modulation", None)) else float(row["modulation"])
        except (TypeError, ValueError):
            raise FmrisynthError(f"line {line}: onset, duration and modulation must be numbers", path) from None
        if not all(map(math.isfinite, (onset, duration, modulation))) or onset < 0 or duration < 0:
            raise FmrisynthError(f"line {line}: onset {onset:g} s, duration {duration:g} s must be finite and >= 0", path)
        if onset + duration > run_s + 1e-6:
            raise FmrisynthError(f"line {line}: the event at {onset:g} s lasting {duration:g} s ends after the run "
                                 f"({frames} frames x {tr:g} s = {run_s:g} s); lengthen --frames or drop it", path)  # fmt: skip
        events.append(DesignEvent(condition, onset, duration, modulation))
    if not events:
        raise FmrisynthError("events file holds no events", path)
    return sorted(events, key=lambda e: (e.onset_s, e.condition))


def _condition(trial_type: str, known: Sequence[str], task: str | None, path: Path, line: int) -> str:
    if trial_type in known:
        return trial_type
    if task and f"{task}:{trial_type}" in known:
        return f"{task}:{trial_type}"
    raise FmrisynthError(f"line {line}: unknown trial_type {trial_type!r}; known conditions: {', '.join(known)}", path)


def design_tsv(events: Sequence[DesignEvent]) -> str:
    """The BIDS events.tsv text of ``events``: onset, duration, trial_type (and modulation when any is not 1,
    which nilearn then reads as each event's amplitude)."""
    modulated = any(e.modulation != 1 for e in events)
    rows = [f"{e.onset_s:.3f}\t{e.duration_s:.3f}\t{e.condition}" + (f"\t{e.modulation:g}" if modulated else "") + "\n"
            for e in events]  # fmt: skip
    return "onset\tduration\ttrial_type" + ("\tmodulation" if modulated else "") + "\n" + "".join(rows)


def default_task(events_file: str | Path, fallback: str) -> str:
    """A BIDS task label from the events file's name (``motor-run.tsv`` -> ``motorrun``), else ``fallback``."""
    return "".join(ch for ch in Path(events_file).name.split(".")[0] if ch.isascii() and ch.isalnum()) or fallback

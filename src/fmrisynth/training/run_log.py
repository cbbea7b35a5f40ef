"""The log of a training run: ``train_log.jsonl`` and the progress bar, written by rank 0 alone.

``fit`` (training/loop.py) writes one row per logged step through ``TrainLog``: the step, the loss,
the lr, the throughput since the last row and the objective's logs averaged over ranks. Before a run
starts or resumes, ``truncate_log`` cuts the log back to the step it starts from, so that a resumed
run's log reads like an uninterrupted one's. Kept apart from the loop, which decides when to log but
not how.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from fmrisynth.distributed import mean_over_ranks
from fmrisynth.publish import staged_file

LOG = "train_log.jsonl"


def read_log(out: Path) -> list[dict]:
    """The rows of ``out``'s train_log.jsonl, in order ([] before the first row is written)."""
    log = Path(out) / LOG
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def truncate_log(out: Path, step: int) -> None:
    """Drop log rows after ``step`` (logged after the checkpoint a resume starts from; all of them on a
    fresh start) and torn lines, so the log has one row per logged step."""
    log = out / LOG
    if not log.is_file():
        return
    keep = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
    with staged_file(log) as tmp:
        tmp.write_text("".join(keep))


class TrainLog:
    """train_log.jsonl and the progress bar, on rank 0; the other ranks only join in the mean of the logs."""

    def __init__(self, out: Path, rank: int, step: int, steps: int, desc: str, progress: bool):
        from tqdm import tqdm

        self.file = open(out / LOG, "a") if rank == 0 else None
        self.bar = tqdm(total=steps, initial=step, desc=desc, disable=not progress or rank != 0, dynamic_ncols=True)
        self.t_log, self.clips_since = time.perf_counter(), 0

    def stepped(self, clips: int) -> None:
        self.clips_since += clips
        self.bar.update(1)

    def row(self, step: int, total: float, lr: float, logs: dict[str, float], device: torch.device) -> None:
        """Log one row: the loss, lr, throughput since the last row and the logs' means over ranks
        (a collective under torchrun: all ranks must call it)."""
        keys = sorted(logs)
        means = mean_over_ranks(torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=device)).tolist()
        if self.file is None:
            return
        now = time.perf_counter()
        row = {"step": step, "loss": total, "lr": lr, "clips_per_s": self.clips_since / max(now - self.t_log, 1e-9),
               **dict(zip(keys, means))}  # fmt: skip
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.bar.set_postfix(loss=f"{total:.4f}", clips_s=f"{row['clips_per_s']:.1f}")
        self.t_log, self.clips_since = now, 0

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()

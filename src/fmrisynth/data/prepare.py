"""``fmrisynth prepare``: a dataset of runs -> a store of labelled clips.

Two passes. The first reads only headers and events: it discovers the runs, validates all of them
(so a bad file fails in seconds, before anything is written), chooses the conditions, splits the
subjects and plans every clip. The second streams the runs one at a time through preprocessing
into a ``StoreWriter``, so memory stays at about two runs whatever the size of the dataset, and a
failure anywhere leaves no store behind.

Clips are aligned to blocks: a block's onset falls on a seeded uniformly random frame in
``[0, jitter_frames]`` of its clip, so the models see the onset at slightly different places.
Near the end of a run the clip is moved earlier to stay inside the run and the onset falls later
in the clip (``onset_s`` records where). Rest clips, if asked for, are cut back to back from
stretches where no event of any condition is on (label ``rest``, its "block" the whole clip); they
still hold the tail of the preceding block's haemodynamic response, as fixation in real data does.
"""

from __future__ import annotations

import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmrisynth.config import Config, to_dict
from fmrisynth.data.grid import get_grid
from fmrisynth.data.nifti import Run, check_affines
from fmrisynth.data.run_events import REST, write_run_events
from fmrisynth.errors import FmrisynthError
from fmrisynth.publish import record_path
from fmrisynth.tasks import condition_set

SPLITS = ("train", "val", "test")
DEFAULT_CONDITIONS = {"hcp": "hcp7", "bids": "all"}  # what data.conditions "auto" means per source
MIN_COVERAGE = 0.8  # a run whose own brain covers less of the brain mask may not be in MNI space: warn


@dataclass(frozen=True)
class Clip:
    start_frame: int
    condition: str
    onset_s: float  # block onset, seconds from the clip's first frame
    duration_s: float


def find_runs(source: str, root: Path) -> list[Run]:
    """All runs of a dataset in the ``source`` layout ("hcp" or "bids")."""
    if source == "hcp":
        from fmrisynth.data.hcp import find_runs as reader
    elif source == "bids":
        from fmrisynth.data.bids import find_runs as reader
    else:
        raise FmrisynthError(f"unknown source {source!r}; choose hcp or bids")
    return reader(root)


def choose_conditions(runs: list[Run], name: str, rest: bool, root: Path) -> tuple[list[str], list[str]]:
    """The store's condition list (label order) and the requested conditions absent from the data.

    Only conditions present become labels (a label without clips would break per-condition
    evaluation); the absent ones are reported in the summary.
    """
    found = {c for run in runs for c, items in run.events.items() if items}
    wanted = condition_set(name)
    if wanted is None:
        conditions, missing = sorted(found), []
    else:
        conditions = [c for c in wanted if c in found]
        missing = [c for c in wanted if c not in found]
        if not conditions:
            tasks = ", ".join(sorted({r.task for r in runs}))
            raise FmrisynthError(
                f"none of the {name} conditions occur in the events (tasks found: {tasks}); "
                "use --conditions all for every condition in the data",
                root,
            )
    return conditions + ([REST] if rest else []), missing


def split_units(units: list[str], fractions: tuple[float, ...], seed: int) -> dict[str, str]:
    """Assign each unit (subject, or run for a one-subject dataset) to train/val/test, deterministically.

    With two or more units, train and test are never empty (test only if its fraction is > 0):
    an evaluation needs held-out data even when a dataset is tiny.
    """
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise FmrisynthError(f"data.split {tuple(fractions)} must be three non-negative fractions (train, val, test)")
    f = f / f.sum()
    units = sorted(units)
    n = len(units)
    n_test = int(round(f[2] * n))
    if n >= 2:
        n_test = min(max(n_test, int(f[2] > 0)), n - 1)
    n_val = max(0, min(int(round(f[1] * n)), n - n_test - 1))
    order = np.random.default_rng(seed).permutation(n)
    names = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)
    return {units[i]: names[k] for k, i in enumerate(order)}


def plan_clips(run: Run, conditions: list[str], clip_len: int, jitter: int, seed: int) -> list[Clip]:
    """The clips of one run, in frame order; seeded by the run's key so plans do not depend on run order."""
    n, tr = run.n_frames, run.tr
    if clip_len > n:
        raise FmrisynthError(f"clips of {clip_len} frames are longer than the run ({n} frames)", run.path)
    rng = np.random.default_rng([seed, zlib.crc32(run.key.encode())])
    clips = []
    for condition in conditions:
        for onset, duration in sorted(run.events.get(condition, [])):
            start = int(np.clip(int(onset // tr) - rng.integers(0, jitter + 1), 0, n - clip_len))
            clips.append(Clip(start, condition, onset - start * tr, duration))
    if REST in conditions:
        free = np.ones(n, dtype=bool)
        for items in run.events.values():
            for onset, duration in items:
                free[int(onset // tr) : int(np.ceil((onset + duration) / tr))] = False
        edges = np.flatnonzero(np.diff(np.concatenate([[0], free.astype(np.int8), [0]])))  # start, end, start, ...
        for a, b in zip(edges[::2], edges[1::2]):
            clips += [Clip(int(t), REST, 0.0, clip_len * tr) for t in range(a, b - clip_len + 1, clip_len)]
    return sorted(clips, key=lambda c: (c.start_frame, c.condition))


def prepare(source: str, root: Path, out: Path, cfg: Config, progress: bool = True) -> dict:
    """Read, validate, resample, mask, normalise and cut a dataset into a clip store at ``out``.

    Returns the summary (also stored in store.json): runs, subjects, clips per condition and
    split, TR(s), grid, voxels, NaN voxels masked out, throughput.
    """
    from tqdm import tqdm

    from fmrisynth.data.preprocess import load_mask, preprocess_run
    from fmrisynth.data.store import StoreWriter

    t0 = time.perf_counter()
    d = cfg.data
    _check_data_config(d)
    grid = get_grid(d.grid)
    # first pass: headers and events only, so that a bad file fails before anything is written
    runs = find_runs(source, Path(root))
    check_affines(runs)
    condition_set = DEFAULT_CONDITIONS.get(source, "all") if d.conditions == "auto" else d.conditions
    conditions, missing = choose_conditions(runs, condition_set, d.rest_clips, root)
    plans = [(run, plan_clips(run, conditions, d.clip_len, d.jitter_frames, cfg.seed)) for run in runs]
    plans = [(run, clips) for run, clips in plans if clips]
    if not plans:
        raise FmrisynthError("no clips to cut: no run has an event of the chosen conditions", root)
    split_by, splits = _split_plans(plans, d.split, cfg.seed, root)

    # second pass: one run at a time through preprocessing into the store
    mask = load_mask(d.mask, grid)
    summary = _summary(source, root, out, runs[0].dataset, plans, split_by, grid, int(mask.sum()), d.clip_len,
                       condition_set, conditions, missing)  # fmt: skip
    meta = {"grid": grid.name, "voxel_mm": grid.voxel_mm, "split_by": split_by, "config": to_dict(cfg)}
    writer = StoreWriter(out, (d.clip_len, int(mask.sum())), grid.affine, grid.shape, conditions, mask=mask, meta=meta)
    volumes = 0
    with writer, tqdm(plans, desc="prepare", unit="run", disable=not progress) as bar:
        for (run, clips), split in zip(bar, splits):
            x, dropped, coverage = preprocess_run(run, grid, mask, d.normalise)  # (T_run, V)
            volumes += run.n_frames
            summary["nan_voxels_masked"] += dropped
            if coverage is not None:
                _note_coverage(summary, run, coverage, "MNI" if d.mask is None else "given", grid.name)
            for clip in clips:
                _add_clip(writer, run, clip, x[clip.start_frame : clip.start_frame + d.clip_len], split, conditions)
                summary["counts"][clip.condition][split] += 1
            del x
            bar.set_postfix(clips=len(writer.rows))
        write_run_events(writer.tmp, [run for run, _ in plans])  # the whole design, for the response model
        summary["clips"] = len(writer.rows)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        summary["volumes_per_s"] = round(volumes / max(summary["seconds"], 1e-9), 1)
        writer.header["summary"] = summary
    summary["out"] = str(out)
    return summary


def _check_data_config(d) -> None:
    """Refuse a normalisation or clip settings ``prepare`` cannot follow, before reading any run."""
    from fmrisynth.data.preprocess import NORMALISE

    if d.normalise not in NORMALISE:
        raise FmrisynthError(f"unknown normalisation {d.normalise!r}; choose {', '.join(NORMALISE)}")
    if d.clip_len < 1 or d.jitter_frames < 0:
        raise FmrisynthError(f"clip_len must be >= 1 and jitter_frames >= 0 (got {d.clip_len}, {d.jitter_frames})")


def _split_plans(plans: list[tuple[Run, list[Clip]]], fractions: tuple[float, ...], seed: int,
                 root: Path) -> tuple[str, list[str]]:  # fmt: skip
    """("subject" or "run", the split of each planned run): subjects are split, or the runs of a
    one-subject dataset. Only runs that yield clips are split, so that a subject without the chosen
    conditions takes no split's place; refuses a split that leaves no training clips."""
    split_by = "subject" if len({run.subject for run, _ in plans}) > 1 else "run"
    unit = (lambda r: r.subject) if split_by == "subject" else (lambda r: r.key)
    of_unit = split_units(sorted({unit(run) for run, _ in plans}), fractions, seed)
    splits = [of_unit[unit(run)] for run, _ in plans]
    if "train" not in splits:
        raise FmrisynthError(
            f"no training clips: every {split_by} with clips went to val/test (data.split {tuple(fractions)}); "
            "give the train split a share",
            root,
        )
    return split_by, splits


def _summary(source: str, root: Path, out: Path, dataset: str, plans: list, split_by: str, grid, voxels: int,
             clip_len: int, condition_set: str, conditions: list[str], missing: list[str]) -> dict:  # fmt: skip
    """The summary before the second pass, its counts at zero (the second pass fills them in)."""
    trs = sorted({run.tr for run, _ in plans})
    return {
        "source": source,
        "root": record_path(root, Path(out) / "store.json"),  # relative to store.json (fmrisynth.publish)
        "dataset": dataset,
        "runs": len(plans),
        "subjects": len({run.subject for run, _ in plans}),
        "split_by": split_by,
        "grid": grid.name,
        "grid_shape": list(grid.shape),
        "voxels": voxels,
        "tr": trs[0] if len(trs) == 1 else trs,
        "clip_len": clip_len,
        "condition_set": condition_set,
        "conditions": conditions,
        "missing_conditions": missing,
        "counts": {c: dict.fromkeys(SPLITS, 0) for c in conditions},
        "nan_voxels_masked": 0,
        "min_mask_coverage": None,  # the lowest fraction of the brain mask a run's own brain covers
        "runs_off_mask": 0,  # runs below MIN_COVERAGE: perhaps not in MNI space
    }


def _note_coverage(summary: dict, run: Run, coverage: float, mask_name: str, grid_name: str) -> None:
    """Record a run's brain-mask coverage in the summary; warn once, at the first run below MIN_COVERAGE."""
    low = summary["min_mask_coverage"]
    summary["min_mask_coverage"] = round(coverage if low is None else min(low, coverage), 3)
    if coverage < MIN_COVERAGE and not summary["runs_off_mask"]:
        warnings.warn(
            f"{run.path}: its brain covers only {coverage:.0%} of the {mask_name} brain mask on the {grid_name} "
            "grid; is it in MNI space? Native-space data are resampled as if they were",
            stacklevel=3,  # prepare's caller
        )
    summary["runs_off_mask"] += coverage < MIN_COVERAGE


def _add_clip(writer, run: Run, clip: Clip, x: np.ndarray, split: str, conditions: list[str]) -> None:
    """Write one clip ``x`` (T, V) of ``run`` with its row of the manifest."""
    writer.add(
        x, subject=run.subject, task=run.task, run=run.run, pe=run.pe, condition=clip.condition,
        label=conditions.index(clip.condition), onset_s=round(clip.onset_s, 4), duration_s=clip.duration_s,
        tr=run.tr, start_frame=clip.start_frame, split=split, dataset=run.dataset, source=str(run.path),
    )  # fmt: skip


def format_summary(s: dict) -> str:
    """The closing summary the CLI prints: what was read, what was cut, where it went."""
    tr = s["tr"] if isinstance(s["tr"], list) else [s["tr"]]
    lines = [
        f"prepared {s['clips']} clips of {s['clip_len']} frames from {s['runs']} runs of {s['subjects']} subject(s) "
        f"({s['dataset']}, {s['source']}) in {s['seconds']} s ({s['volumes_per_s']} volumes/s)",
        f"grid {s['grid']} {'x'.join(map(str, s['grid_shape']))}, {s['voxels']} brain voxels; "
        f"TR {', '.join(f'{t:g}' for t in tr)} s; split by {s['split_by']}"
        + (" (one subject: runs are split instead)" if s["split_by"] == "run" else ""),
    ]
    if s["nan_voxels_masked"]:
        lines.append(f"masked out {s['nan_voxels_masked']} voxel(s) touched by NaN/Inf (summed over runs)")
    if s.get("runs_off_mask"):
        lines.append(
            f"{s['runs_off_mask']} of {s['runs']} runs cover under {MIN_COVERAGE:.0%} of the brain mask (lowest "
            f"{s['min_mask_coverage']:.0%}): check that the data are in MNI space"
        )
    if s["missing_conditions"]:
        lines.append(f"not in the data: {', '.join(s['missing_conditions'])}")
    width = max(len(c) for c in s["counts"])
    lines.append(f"{'condition':<{width}}  {'train':>6} {'val':>6} {'test':>6}")
    for c, n in s["counts"].items():
        lines.append(f"{c:<{width}}  {n['train']:>6} {n['val']:>6} {n['test']:>6}")
    lines.append(f"store: {s['out']}")
    return "\n".join(lines)

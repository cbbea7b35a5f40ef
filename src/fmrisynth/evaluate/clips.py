"""The two inputs of an evaluation as one interface: labelled clips, read one at a time.

Real clips come from a clip store split (``STORE[:split]``). Generated clips come from another
store (``STORE[:split]``, all clips by default, so that real-vs-real is ``--real S:test
--generated S:val``) or from a BIDS dataset written by ``fmrisynth sample --condition`` (read by
generate/bids.py: 4D runs on the model grid, sidecars giving condition, onset_s, duration_s and
tr). Everything is validated against the real store before any work is done (grid, affine, mask,
conditions, clip length); NaNs are caught when a clip is read.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fmrisynth.data.store import ClipStore
from fmrisynth.errors import FmrisynthError

LABELS = ["condition", "onset_s", "duration_s", "tr", "subject", "pe", "run"]


@dataclass
class ClipSet:
    """Clips to evaluate.

    Attributes:
        name: where they came from, for messages and metrics.json.
        table: pandas DataFrame, one row per clip, columns ``LABELS`` (subject, pe and run are ""
            where unknown, as for generated samples).
        reader: row position -> (T, V) float16 or float32, V the real store's in-mask voxels.
        n_frames: T, the same for every clip.
        sources: per row, the file (or ``store#index``) to blame in errors.
        checkpoints: the stage-2 checkpoints that generated the clips (from the sidecars; none for stores).
    """

    name: str
    table: "pd.DataFrame"  # noqa: F821
    reader: Callable[[int], np.ndarray]
    n_frames: int
    sources: list[str]
    checkpoints: tuple[str, ...] = ()

    def read(self, i: int) -> np.ndarray:
        y = self.reader(i)
        if not np.isfinite(y).all():
            raise FmrisynthError("clip contains NaN or infinite values", self.sources[i])
        return y

    def batches(self, rows: np.ndarray, size: int):
        """Yield (rows of the batch, (b, T, V) float32) over the given row positions.

        One buffer serves every batch (use a batch before asking for the next): at 2 mm a batch is
        hundreds of MB, and allocating it afresh each time costs more than the GLM itself.
        """
        buffer = np.empty((size, self.n_frames, 0), np.float32)
        for start in range(0, len(rows), size):
            batch = rows[start : start + size]
            for k, i in enumerate(batch):
                y = self.read(int(i))
                if buffer.shape[2] != y.shape[1]:
                    buffer = np.empty((size, *y.shape), np.float32)
                buffer[k] = y  # float16 -> float32 in the copy
            yield batch, buffer[: len(batch)]


def _labels(rows: "pd.DataFrame", path: Path) -> "pd.DataFrame":  # noqa: F821
    """The LABELS columns with proper types: numbers for timing, strings for the rest."""
    table = rows.reindex(columns=LABELS, fill_value="").reset_index(drop=True)
    try:
        table[["onset_s", "duration_s", "tr"]] = table[["onset_s", "duration_s", "tr"]].astype(float)
    except (TypeError, ValueError) as e:
        raise FmrisynthError(f"onset_s, duration_s and tr must be numbers ({e})", path) from None
    if (table["tr"] <= 0).any():
        raise FmrisynthError("tr must be a positive number of seconds", path)
    for column in ("condition", "subject", "pe", "run"):
        table[column] = table[column].astype(str)
    return table


def split_spec(spec: str, default: str | None) -> tuple[Path, str | None]:
    """``STORE[:split]`` -> (store path, split); a path that exists as given wins over the suffix."""
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), default
    path, _, split = spec.rpartition(":")
    return Path(path), split or default


def read_item(store: ClipStore, i: int) -> np.ndarray:
    """Item ``i`` of a store as stored, (T, V) float16, outside the memory map (``ClipStore.read_item``):
    streaming a whole store keeps the resident memory at a batch."""
    return store.read_item(i)


def _store_set(store: ClipStore, split: str | None, spec: str) -> ClipSet:
    rows = store.indices(split=split)
    if len(rows) == 0:
        known = ", ".join(sorted(set(store.manifest["split"].astype(str))))
        raise FmrisynthError(f"no clips in split {split!r} (splits: {known})", store.path)
    table = _labels(store.manifest.iloc[rows], store.path)
    sources = [f"{store.path}#{i}" for i in rows]
    return ClipSet(spec, table, lambda i: read_item(store, rows[i]), store.item_shape[0], sources)


def open_real(spec: str, default_split: str = "test") -> tuple[ClipStore, ClipSet]:
    """The real store and the clips of its evaluation split."""
    path, split = split_spec(spec, default_split)
    store = ClipStore(path)
    if store.kind != "clips" or store.mask is None:
        raise FmrisynthError(f"a store of {store.kind} with no mask; evaluate needs a clip store", path)
    return store, _store_set(store, split, spec)


def open_generated(spec: str | Path, real: ClipStore, n_frames: int) -> ClipSet:
    """Generated clips (a sample directory or a store), checked against the real store."""
    path, split = split_spec(str(spec), None)
    if (path / "store.json").is_file():
        store = ClipStore(path)
        same_mask = store.mask is not None and store.mask.shape == real.mask.shape and (store.mask == real.mask).all()
        _check_grid(store.grid_shape, store.affine, real, path)
        if not same_mask:
            raise FmrisynthError("the brain mask differs from the real store's", path)
        clips = _store_set(store, split, str(spec))
    elif path.is_dir():
        clips = _sample_dir(path, real)
    else:
        raise FmrisynthError("generated clips not found (expected a sample directory or a clip store)", path)
    if clips.n_frames != n_frames:
        raise FmrisynthError(f"clips have {clips.n_frames} frames; the real clips have {n_frames}", path)
    unknown = sorted(set(clips.table["condition"]) - set(real.conditions))
    if unknown:
        raise FmrisynthError(
            f"condition {unknown[0]!r} is not among the real store's ({', '.join(real.conditions)})", path
        )
    return clips


def _check_grid(shape: tuple[int, ...], affine: np.ndarray, real: ClipStore, path: Path) -> None:
    if tuple(shape) != tuple(real.grid_shape) or not np.allclose(affine, real.affine, atol=1e-3):
        raise FmrisynthError(
            f"grid {tuple(shape)} does not match the real store's {tuple(real.grid_shape)} "
            f"(or its affine differs); sample on the real store's grid",
            path,
        )


def _sample_dir(root: Path, real: ClipStore) -> ClipSet:
    """Index a dataset written by ``fmrisynth sample`` (its reader: generate/bids.py); headers only, no data."""
    import nibabel as nib
    import pandas as pd

    from fmrisynth.generate.bids import read_clips

    files, rows, runs = read_clips(root)
    for f in files:
        try:
            img = nib.load(f)
        except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
            raise FmrisynthError(f"not a readable gzipped NIfTI ({e})", f) from None
        if len(img.shape) != 4 or img.shape[3] != nib.load(files[0]).shape[-1]:
            raise FmrisynthError(f"expected a 4D image (D, H, W, T) like the others, got shape {img.shape}", f)
        _check_grid(img.shape[:3], img.affine, real, f)
    table = _labels(pd.DataFrame(rows), root)
    mask = real.mask

    def read(i: int) -> np.ndarray:
        try:
            data = np.asarray(nib.load(files[i]).dataobj, dtype=np.float32)  # (D, H, W, T)
        except (OSError, EOFError, ValueError, zlib.error) as e:
            raise FmrisynthError(f"cannot read the image: truncated or damaged ({e})", files[i]) from None
        return np.ascontiguousarray(data[mask].T)  # (T, V)

    return ClipSet(str(root), table, read, int(img.shape[3]), [str(f) for f in files], tuple(runs))

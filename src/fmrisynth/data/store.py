"""The clip store: labelled clips on disk, float16, one clip readable without touching the rest.

Layout of a store directory (also used for cached VQ-GAN latents, with ``kind: latents``)::

    store.json     kind, item_shape, n, dtype, grid, affine, conditions, the resolved config
    data.f16       raw little-endian float16 array of shape (n, *item_shape), C order (memory-mapped)
    manifest.tsv   one row per clip: index, subject, task, run, pe, condition, label, onset_s, duration_s, tr,
                   start_frame, split, dataset, source
    mask.nii.gz    the brain mask on the grid (clip stores only)
    events.tsv     every event of every run the clips were cut from (clip stores; ``data/run_events.py``)
    config.yaml    the resolved config that made the store (when ``meta`` has one under "config")

Clip stores keep only in-mask voxels: an item is (T, V) with V = mask.sum(), and ``clip(i)`` puts it
back on the grid as (T, D, H, W). Writes go to a temporary sibling directory that is renamed into
place on success, so a failed or interrupted write never leaves a half-written store; the next
writer in the same folder removes the temporaries of writers that were killed (``fmrisynth.publish``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fmrisynth.errors import FmrisynthError
from fmrisynth.publish import remove_stale, temp_path

MANIFEST_COLUMNS = [
    "index", "subject", "task", "run", "pe", "condition", "label", "onset_s", "duration_s", "tr",
    "start_frame", "split", "dataset", "source",
]  # fmt: skip
DTYPE = np.dtype("<f2")
class StoreWriter:
    """Append clips one at a time; ``close()`` publishes the store atomically.

    Use as a context manager: an exception inside the ``with`` block deletes the temporary
    directory and leaves ``out`` untouched.

    Args:
        out: the store directory to create (must not exist).
        item_shape: shape of one stored item, e.g. (T, V) for clips or (T, c, d, h, w) for latents.
        affine: 4x4 RAS+ affine of the grid.
        grid_shape: (D, H, W) of the grid.
        conditions: condition names; ``label`` in the manifest indexes this list.
        mask: bool (D, H, W) brain mask for clip stores (items hold in-mask voxels), or None.
        meta: anything else worth recording (grid name, TR, resolved config, ...).
    """

    def __init__(
        self,
        out: str | Path,
        item_shape: tuple[int, ...],
        affine: np.ndarray,
        grid_shape: tuple[int, int, int],
        conditions: list[str],
        mask: np.ndarray | None = None,
        kind: str = "clips",
        meta: dict[str, Any] | None = None,
    ):
        self.out = Path(out)
        if self.out.exists():
            raise FmrisynthError("output store already exists; choose another --out or remove it", self.out)
        if mask is not None and int(mask.sum()) != item_shape[-1]:
            raise ValueError(f"item_shape {item_shape} does not end in mask.sum()={int(mask.sum())}")
        remove_stale(self.out.parent)
        self.tmp = temp_path(self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.item_shape = tuple(int(s) for s in item_shape)
        self.header = {
            "version": 1,
            "kind": kind,
            "item_shape": list(self.item_shape),
            "dtype": DTYPE.str,
            "grid_shape": [int(s) for s in grid_shape],
            "affine": np.asarray(affine, dtype=float).tolist(),
            "conditions": list(conditions),
            **(meta or {}),
        }
        self.mask = mask
        self.rows: list[dict[str, Any]] = []
        self._data = open(self.tmp / "data.f16", "wb")

    def add(self, item: np.ndarray, **labels: Any) -> int:
        """Append one item with its manifest labels; returns its index."""
        if tuple(item.shape) != self.item_shape:
            raise ValueError(f"item of shape {item.shape}, store expects {self.item_shape}")
        self._data.write(np.ascontiguousarray(item, dtype=DTYPE).tobytes())
        row = {c: labels.get(c, "") for c in MANIFEST_COLUMNS}
        row.update(labels)
        row["index"] = len(self.rows)
        self.rows.append(row)
        return row["index"]

    def close(self) -> Path:
        import pandas as pd

        self._data.close()
        if not self.rows:
            self.abort()
            raise FmrisynthError("no clips to write: the dataset is empty after filtering", self.out)
        pd.DataFrame(self.rows).to_csv(self.tmp / "manifest.tsv", sep="\t", index=False)
        if self.mask is not None:
            import nibabel as nib

            affine = np.array(self.header["affine"])
            nib.save(nib.Nifti1Image(self.mask.astype(np.uint8), affine), self.tmp / "mask.nii.gz")
        self.header["n"] = len(self.rows)
        (self.tmp / "store.json").write_text(json.dumps(self.header, indent=1))
        if "config" in self.header:
            import yaml

            (self.tmp / "config.yaml").write_text(yaml.safe_dump(self.header["config"], sort_keys=False))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.rename(self.out)
        return self.out

    def abort(self) -> None:
        if not self._data.closed:
            self._data.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ClipStore:
    """Read-only access to a store written by ``StoreWriter``.

    Attributes:
        manifest: pandas DataFrame, one row per item (see module docstring).
        header: the parsed store.json.
        affine, grid_shape, conditions, kind, item_shape: from the header.
        mask: bool (D, H, W) for clip stores, else None.
    """

    def __init__(self, path: str | Path):
        import pandas as pd

        self.path = Path(path)
        header_file = self.path / "store.json"
        if not header_file.is_file():
            raise FmrisynthError("not a clip store (no store.json); run `fmrisynth prepare` first", self.path)
        try:
            self.header = json.loads(header_file.read_text())
            self.manifest = pd.read_csv(self.path / "manifest.tsv", sep="\t", keep_default_na=False)
            self.item_shape = tuple(self.header["item_shape"])
            n = int(self.header["n"])
            self._data = np.memmap(self.path / "data.f16", dtype=DTYPE, mode="r", shape=(n, *self.item_shape))
        except (OSError, ValueError, KeyError) as e:
            raise FmrisynthError(f"clip store is damaged ({e})", self.path) from None
        if len(self.manifest) != n:
            raise FmrisynthError(f"manifest has {len(self.manifest)} rows, data has {n}", self.path)
        self._complete_positions()
        self.kind: str = self.header["kind"]
        self.affine = np.array(self.header["affine"])
        self.grid_shape = tuple(self.header["grid_shape"])
        self.conditions: list[str] = list(self.header["conditions"])
        self.mask = None
        if (self.path / "mask.nii.gz").exists():
            import nibabel as nib

            self.mask = np.asarray(nib.load(self.path / "mask.nii.gz").dataobj) > 0
            self._flat = np.flatnonzero(self.mask)  # flat scatter is ~2x faster than boolean indexing

    def _complete_positions(self) -> None:
        """A clip written without its run or position (a store made by hand, not by ``prepare``) is a
        run of its own starting at frame 0, so that readers of runs (the response model) need no
        special case."""
        m = self.manifest
        for column in ("run", "start_frame"):
            if column not in m:
                m[column] = ""
        own = m["run"].astype(str).eq("") | m["start_frame"].astype(str).eq("")
        if own.any():
            m["run"] = np.where(own, [f"clip{i}" for i in range(len(m))], m["run"].astype(str))
            m["start_frame"] = np.where(own, 0, m["start_frame"]).astype(int)

    def __len__(self) -> int:
        return len(self.manifest)

    def __getstate__(self) -> dict:
        # Pickle by path: DataLoader workers (spawn) reopen the memmap instead of copying the data.
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def indices(self, split: str | None = None, condition: str | None = None) -> np.ndarray:
        """Indices of the items in a split and/or of a condition."""
        keep = np.ones(len(self), dtype=bool)
        if split is not None:
            keep &= (self.manifest["split"] == split).to_numpy()
        if condition is not None:
            keep &= (self.manifest["condition"] == condition).to_numpy()
        return np.flatnonzero(keep)

    def item(self, i: int) -> np.ndarray:
        """The stored item as float32: (T, V) for clips, (T, c, d, h, w) for latents."""
        return np.asarray(self._data[i], dtype=np.float32)

    def read_item(self, i: int) -> np.ndarray:
        """Item ``i`` as stored, float16, by a positioned file read instead of the memory map.

        Mapped pages stay resident in this process while the map lives: streaming a whole 2 mm store
        through ``item`` grows the resident memory to the size of the store (14 GiB for 7 x 100 real
        + generated clips). A plain read keeps it at what the caller holds.
        """
        count = int(np.prod(self.item_shape))
        x = np.fromfile(self.path / "data.f16", dtype=DTYPE, count=count, offset=int(i) * count * DTYPE.itemsize)
        return x.reshape(self.item_shape)

    def frame(self, i: int, t: int) -> np.ndarray:
        """Frame ``t`` of item ``i`` without reading the rest: (D, H, W) float32 (latents: (c, d, h, w))."""
        x = self._data[i, t]
        return self.unmask(x, np.float32) if self.mask is not None else np.asarray(x, dtype=np.float32)

    def unmask(self, x: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
        """(..., V) in-mask values -> (..., D, H, W) on the grid, zeros outside the brain (dtype: x's)."""
        if self.mask is None:
            raise ValueError("this store has no mask")
        out = np.zeros((*x.shape[:-1], self.mask.size), dtype=dtype or x.dtype)
        out[..., self._flat] = x
        return out.reshape(*x.shape[:-1], *self.grid_shape)

    def clip(self, i: int) -> np.ndarray:
        """Clip ``i`` on the grid: (T, D, H, W) float32 (latent stores: the item as stored)."""
        return self.unmask(self._data[i], np.float32) if self.mask is not None else self.item(i)


def require_clip_store(path: str | Path) -> ClipStore:
    """The clip store at ``path`` (kind "clips", with its mask); a latent store or another kind is one line."""
    store = ClipStore(path)
    if store.kind != "clips" or store.mask is None:
        raise FmrisynthError(f"expected a clip store (from `fmrisynth prepare`), found kind {store.kind!r}", path)
    return store

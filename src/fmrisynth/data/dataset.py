"""The torch view of a clip store: whole clips for the diffusion model, single frames for the VQ-GAN.

Items are read from the store's memory map on demand, so memory stays bounded by the batch, not
the dataset; the labels are copied out of the manifest once, as arrays. Every item is checked finite
as it is read: one NaN clip would otherwise turn a training run's weights into NaN (or, through the
VQ-GAN, give NaN latents) with no word about which clip did it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fmrisynth.data.store import ClipStore
from fmrisynth.errors import FmrisynthError


class ClipDataset(Dataset):
    """Clips (or frames) of one split of a store.

    Args:
        store: a ``ClipStore`` or the path of one (a clip store or a latent store).
        split: "train", "val", "test" or None for every item.
        frames: one volume per item instead of one clip (length n_clips * T).

    An item is ``dict(x, label, onset_s, duration_s, index)`` (and ``frame`` with ``frames=True``):
        x: float32, the clip on the grid (T, D, H, W), or a frame (1, D, H, W); for a latent store
            the stored item as is (T, c, d, h, w), or one latent frame (c, d, h, w).
        label: long scalar, index into ``store.conditions``.
        onset_s, duration_s: the block in seconds from the clip's first frame.
        index: the clip's index in the store.
    """

    def __init__(self, store: ClipStore | str | Path, split: str | None = "train", frames: bool = False):
        self.store = store if isinstance(store, ClipStore) else ClipStore(store)
        self.rows = self.store.indices(split=split)
        if len(self.rows) == 0:
            raise FmrisynthError(f"no items in split {split!r}", self.store.path)
        m = self.store.manifest.iloc[self.rows]
        self.labels = m["label"].to_numpy(dtype=np.int64)
        self.onsets = m["onset_s"].to_numpy(dtype=np.float64)
        self.durations = m["duration_s"].to_numpy(dtype=np.float64)
        self.frames = frames
        self.clip_len = self.store.item_shape[0]

    def __len__(self) -> int:
        return len(self.rows) * (self.clip_len if self.frames else 1)

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < len(self):
            raise IndexError(k)
        j, t = divmod(k, self.clip_len) if self.frames else (k, None)
        i = int(self.rows[j])
        if t is None:
            x = self.store.clip(i)  # (T, D, H, W) or latent (T, c, d, h, w)
        else:
            x = self.store.frame(i, t)  # (D, H, W) or latent (c, d, h, w)
            x = x[None] if self.store.mask is not None else x  # (1, D, H, W)
        if not np.isfinite(x).all():
            raise self._not_finite(i)
        item = {
            "x": torch.from_numpy(x),
            "label": torch.tensor(self.labels[j]),
            "onset_s": float(self.onsets[j]),
            "duration_s": float(self.durations[j]),
            "index": i,
        }
        if t is not None:
            item["frame"] = t
        return item

    def _not_finite(self, i: int) -> FmrisynthError:
        row = self.store.manifest.iloc[i]
        return FmrisynthError(f"clip {i} (subject {row['subject']}, {row['condition']}) has non-finite values; "
                              "re-run `fmrisynth prepare` or drop it", self.store.path)  # fmt: skip

    def check_finite(self) -> None:
        """Read every clip of the split once and refuse the first non-finite one (before training starts)."""
        for i in self.rows:
            if not np.isfinite(self.store.item(int(i))).all():
                raise self._not_finite(int(i))

"""ClipDataset over clip and latent stores; ClipStore.frame and pickling by path."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fmrisynth.data.dataset import ClipDataset
from fmrisynth.data.store import ClipStore, StoreWriter
from fmrisynth.errors import FmrisynthError


def clip_store(path, rng, n=6, T=3):
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 1:4, 2:5] = True
    items = rng.normal(size=(n, T, int(mask.sum()))).astype(np.float32)  # (n, T, V)
    with StoreWriter(path, items.shape[1:], np.eye(4), mask.shape, ["a", "b"], mask=mask) as w:
        for i, x in enumerate(items):
            w.add(x, condition="ab"[i % 2], label=i % 2, onset_s=0.5 * i, duration_s=2.0, split="train" if i < 4 else "val")
    return ClipStore(path), items


def test_clips_and_frames_of_a_split(tmp_path, rng):
    store, items = clip_store(tmp_path / "s", rng)
    clips = ClipDataset(store, split="train")
    assert len(clips) == 4
    item = clips[3]
    assert item["x"].shape == (3, 4, 5, 6) and item["x"].dtype == torch.float32
    assert item["label"].dtype == torch.long and int(item["label"]) == 1
    assert item["onset_s"] == 1.5 and item["duration_s"] == 2.0 and item["index"] == 3
    assert np.allclose(item["x"].numpy()[:, store.mask], items[3], atol=2e-3)

    frames = ClipDataset(tmp_path / "s", split="val", frames=True)
    assert len(frames) == 2 * 3
    f = frames[4]  # clip 5 (second of val), frame 1
    assert f["x"].shape == (1, 4, 5, 6) and f["index"] == 5 and f["frame"] == 1
    assert np.array_equal(f["x"][0].numpy(), store.clip(5)[1]) and np.array_equal(store.frame(5, 1), store.clip(5)[1])
    batch = next(iter(DataLoader(frames, batch_size=4)))
    assert batch["x"].shape == (4, 1, 4, 5, 6) and batch["label"].shape == (4,)
    with pytest.raises(IndexError):
        frames[6]
    with pytest.raises(FmrisynthError, match="no items in split 'test'"):
        ClipDataset(store, split="test")


def test_latent_store_items_as_stored(tmp_path, rng):
    latents = rng.normal(size=(2, 3, 4, 2, 2, 2)).astype(np.float32)  # (n, T, c, d, h, w)
    with StoreWriter(tmp_path / "z", latents.shape[1:], np.eye(4), (8, 8, 8), ["a"], kind="latents") as w:
        for z in latents:
            w.add(z, condition="a", label=0, onset_s=1.0, duration_s=3.0, split="train")
    clips, frames = ClipDataset(tmp_path / "z"), ClipDataset(tmp_path / "z", frames=True)
    assert clips[1]["x"].shape == (3, 4, 2, 2, 2) and np.allclose(clips[1]["x"].numpy(), latents[1], atol=2e-3)
    assert len(frames) == 6 and frames[5]["x"].shape == (4, 2, 2, 2)


def test_store_pickles_by_path(tmp_path, rng):
    store, _ = clip_store(tmp_path / "s", rng)
    blob = pickle.dumps(ClipDataset(store))
    assert len(blob) < 4000  # the data stay on disk, not in the pickle
    again = pickle.loads(blob)
    assert np.array_equal(again[0]["x"].numpy(), store.clip(0))

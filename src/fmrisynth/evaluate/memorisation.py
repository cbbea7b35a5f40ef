"""Memorisation: are the generated clips copies of training clips?

The ``memorisation`` figures of ``fmrisynth evaluate`` (evaluate/run.py): the nearest-neighbour
correlation of each generated clip to training clips, beside that to held-out real clips, on the
sampled voxels of the streamed passes. A generator that copies its training data is closer to it
than to clips it never saw; ``flagged`` says the difference exceeds ``eval.memorisation_margin``.
"""

from __future__ import annotations

import numpy as np

from fmrisynth.evaluate import metrics as M
from fmrisynth.evaluate.clips import read_item
from fmrisynth.evaluate.passes import Pass


def memorisation(gen: Pass, heldout: Pass, train: np.ndarray, seed: int, margin: float) -> dict:
    """Nearest-neighbour r of generated clips to training clips (n, T, F) vs to held-out clips.

    Both candidate sets are subsampled to the same size, so that both maxima are taken over the
    same number of candidates (a maximum over more clips is higher by chance alone).
    """
    if len(train) == 0:
        return {"train_nn_corr": None, "heldout_nn_corr": None, "flagged": None, "n_train": 0}
    rng = np.random.default_rng(seed)
    k = min(len(train), len(heldout.features))
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731  (n, T, F) -> (n, T * F)
    pick = lambda x: flat(x[np.sort(rng.permutation(len(x))[:k])])  # noqa: E731  k candidates
    train_nn = float(M.nearest_corr(flat(gen.features), pick(train)).mean())
    heldout_nn = float(M.nearest_corr(flat(gen.features), pick(heldout.features)).mean())
    return {"train_nn_corr": train_nn, "heldout_nn_corr": heldout_nn,
            "flagged": bool(train_nn - heldout_nn > margin), "n_train": k}


def train_features(store, conditions: list[str], voxels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The sampled voxels (n, T, F) of ``n`` random training clips of the store (memorisation)."""
    train = np.concatenate([store.indices(split="train", condition=c) for c in conditions])
    train = np.sort(np.random.default_rng(seed).choice(train, size=min(len(train), n), replace=False))
    return np.stack([read_item(store, i)[:, voxels] for i in train]) if len(train) else np.empty((0,))

"""Synthetic clips as a torch Dataset, made on the fly: data augmentation for a lab's own models.

``SyntheticClips(run, conditions, n, seed)`` yields ``(clip, label)`` like a real clip store's
``ClipDataset`` yields ``x`` and ``label``: clip (T, D, H, W) float32 on the model grid, label the
condition's index in the generator's (= the training store's) condition list, so synthetic and real
clips can be concatenated into one training set. Item i is condition ``conditions[i % len]`` at a
training block's timing, made by a subject of its own; everything about it is drawn from
``(seed, i)`` alone, so an item is the same whichever worker makes it, in whatever order (on CPU).
Nothing is cached: a clip costs one sampling pass (``steps`` denoiser calls), which is the point
(unlimited fresh subjects) and the price (see benchmarks/augment.py for the time per clip).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fmrisynth.errors import FmrisynthError
from fmrisynth.generate.sample import clip_seed, load_generator
from fmrisynth.models.diffusion import design_boxcar
from fmrisynth.models.response import Event


class SyntheticClips(Dataset):
    """``n`` generated clips of ``conditions`` (all the model's when None), drawn from ``seed``.

    Attributes:
        generator: the loaded ``generate.sample.Generator``; ``generator.mask`` (D, H, W) picks voxels.
        table: per item (condition, label, onset_s, duration_s, tr), known before any clip is made.
    """

    def __init__(self, run: str | Path, conditions: list[str] | None = None, n: int = 100, seed: int = 0,
                 steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                 device: str | torch.device | None = None):  # fmt: skip
        self.generator = gen = load_generator(run, device)
        conditions = list(gen.conditions if conditions is None else conditions)
        if n < 1 or not conditions:
            raise FmrisynthError(f"SyntheticClips needs n >= 1 and at least one condition (got n={n}, {conditions})")
        dcfg = gen.config.diffusion
        self.steps, self.sampler = steps or dcfg.sample_steps, sampler or dcfg.sampler
        self.guidance = dcfg.guidance if guidance is None else guidance
        self.seed, self.frames = seed, gen.frames
        blocks = {c: gen.blocks(c) for c in dict.fromkeys(conditions)}  # refuses unknown conditions
        self.table = []
        for i in range(n):
            c = conditions[i % len(conditions)]
            onset, duration, tr = blocks[c][np.random.default_rng([seed, i]).integers(len(blocks[c]))]
            self.table.append((c, gen.conditions.index(c), float(onset), float(duration), float(tr)))

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        condition, label, onset, duration, tr = self.table[i]
        design = design_boxcar(torch.tensor([onset]), torch.tensor([duration]), torch.tensor([tr]), self.frames)  # (1, T)
        clip = self.generator.clips(np.array([label]), design.numpy(), [[Event(condition, onset, duration)]],
                                    np.array([tr]), [clip_seed(self.seed, i)], self.steps, self.sampler,
                                    self.guidance)[0]  # fmt: skip  # (T, V)
        volume = np.zeros((self.frames, *self.generator.mask.shape), np.float32)  # (T, D, H, W)
        volume[:, self.generator.mask] = clip
        return torch.from_numpy(volume), torch.tensor(label)

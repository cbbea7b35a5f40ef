"""Stage 2's objective: train the latent diffusion model on a latent store.

``train_diffusion`` wraps denoiser + diffusion in an ``Objective`` for the project's one training
loop and writes, next to the checkpoints, ``stage2.json``: what sampling needs besides weights (the
latent shape, conditions, latent statistics, the VQ-GAN and clip store to decode with, and the
training blocks of each condition to draw default timings from).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from einops import rearrange

from fmrisynth.config import Config
from fmrisynth.data.store import ClipStore
from fmrisynth.models.diffusion import Diffusion
from fmrisynth.errors import FmrisynthError
from fmrisynth.models.presets import build_denoiser
from fmrisynth.training.loop import Objective, fit

RUN_INFO = "stage2.json"


def design_boxcar(onset_s: torch.Tensor, duration_s: torch.Tensor, tr: torch.Tensor, frames: int) -> torch.Tensor:
    """The fraction of each frame [k tr, (k+1) tr) that lies inside the block: (B,) x 3 -> (B, T)."""
    start = torch.arange(frames, device=tr.device, dtype=torch.float32)[None] * tr[:, None]  # (B, T)
    end, onset = start + tr[:, None], onset_s[:, None]  # (B, T), (B, 1)
    overlap = torch.minimum(end, onset + duration_s[:, None]) - torch.maximum(start, onset)  # (B, T)
    return (overlap.clamp(min=0) / tr[:, None]).float()


class DiffusionObjective(Objective):
    """Denoising loss on per-channel normalised latent clips, conditioned on label and block design."""

    def __init__(self, model: torch.nn.Module, diffusion: Diffusion, mean: list, std: list, designs: torch.Tensor):
        super().__init__()
        self.model, self.diffusion = model, diffusion
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)  # (c,)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)  # (c,)
        self.register_buffer("designs", designs, persistent=False)  # (n items in the store, T)

    def forward(self, batch: dict, step: int, part: str) -> tuple[torch.Tensor, dict[str, float]]:
        z = (batch["x"] - self.mean[:, None, None, None]) / self.std[:, None, None, None]  # (B, T, c, d, h, w)
        x = rearrange(z, "b t c d h w -> b (t c) d h w")  # (B, T*c, d, h, w)
        return self.diffusion.loss(self.model, x, batch["label"], self.designs[batch["index"]]), {}


def _latent_store(path: Path) -> ClipStore:
    store = ClipStore(path)
    missing = [k for k in ("latent_mean", "latent_std", "vqgan_checkpoint", "clip_store") if k not in store.header]
    if store.kind != "latents" or missing:
        raise FmrisynthError("not a latent store (write one with `fmrisynth train-vae`)", path)
    return store


def train_diffusion(cfg: Config, latents: Path, out: Path, resume: bool = False, progress: bool = True) -> Path:
    """Train the denoiser of ``cfg.model`` on the train split of a latent store; return the last checkpoint."""
    from fmrisynth.data.dataset import ClipDataset

    store, out = _latent_store(Path(latents)), Path(out)
    if not resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step_*")):
        raise FmrisynthError("output directory already has checkpoints; pass --resume or choose another --out", out)
    m = store.manifest
    frames = store.item_shape[0]
    designs = design_boxcar(*(torch.tensor(m[k].to_numpy(float)) for k in ("onset_s", "duration_s", "tr")), frames)
    dataset = ClipDataset(store, split="train")
    torch.manual_seed(cfg.seed)
    model = build_denoiser(cfg.model, store.item_shape, len(store.conditions))
    objective = DiffusionObjective(model, Diffusion(cfg.diffusion, len(store.conditions)),
                                   store.header["latent_mean"], store.header["latent_std"], designs)  # fmt: skip
    train = m.iloc[dataset.rows]
    info = {
        "latents": str(store.path.resolve()),
        "latent_shape": list(store.item_shape),
        "conditions": store.conditions,
        **{k: store.header[k] for k in ("latent_mean", "latent_std", "vqgan_checkpoint", "clip_store")},
        "blocks": {c: rows[["onset_s", "duration_s", "tr"]].to_numpy(float).tolist() for c, rows in train.groupby("condition")},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{RUN_INFO}.tmp").write_text(json.dumps(info))
    (out / f"{RUN_INFO}.tmp").replace(out / RUN_INFO)
    return fit(objective, dataset, cfg.train, out, cfg.seed, resume=resume, config=cfg, desc="train", progress=progress)

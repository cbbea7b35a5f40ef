"""Stage 2 end to end: train the latent diffusion model on a latent store, sample NIfTI clips from it.

``train_diffusion`` wraps denoiser + diffusion in an ``Objective`` for the project's one training
loop and writes, next to the checkpoints, ``stage2.json``: what sampling needs besides weights (the
latent shape, conditions, latent statistics, the VQ-GAN and clip store to decode with, and the
training blocks of each condition to draw default timings from).

``sample`` writes one clip per sample, on the model grid, in the format ``fmrisynth evaluate`` reads::

    <name>_bold.nii.gz   (D, H, W, T) float32, the clip store's affine, zooms[3] = TR
    <name>_bold.json     {"condition", "onset_s", "duration_s", "tr", "seed", "guidance", "sampler",
                          "steps", "checkpoint"}
    <name>_events.tsv    BIDS events (onset, duration, trial_type): the condition's block in the clip
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from fmrisynth.config import Config
from fmrisynth.data.store import ClipStore
from fmrisynth.diffusion import Diffusion
from fmrisynth.errors import FmrisynthError
from fmrisynth.models.presets import build_denoiser
from fmrisynth.train import Objective, fit, latest_checkpoint, load_checkpoint

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


@dataclass
class Denoiser:
    """A trained stage-2 model (EMA weights, eval mode) with what it needs to generate latents."""

    model: torch.nn.Module
    diffusion: Diffusion
    config: Config
    info: dict  # stage2.json of the run
    checkpoint: Path

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, designs: torch.Tensor, steps: int, sampler: str, guidance: float,
                 generator: torch.Generator) -> torch.Tensor:  # fmt: skip
        """Raw latent clips (B, T, c, d, h, w) for labels (B,) and designs (B, T), in the store's units."""
        t, c, *spatial = self.info["latent_shape"]
        device = next(self.model.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = self.diffusion.sample(self.model, labels.to(device), designs.to(device), (t * c, *spatial),
                                      steps, sampler, guidance, generator)  # fmt: skip  # (B, T*c, d, h, w)
        z = rearrange(x.float().cpu(), "b (t c) d h w -> b t c d h w", t=t)  # (B, T, c, d, h, w)
        mean, std = (torch.tensor(self.info[k]).reshape(c, 1, 1, 1) for k in ("latent_mean", "latent_std"))
        return z * std + mean


def load_denoiser(checkpoint: str | Path, device: str | torch.device | None = None) -> Denoiser:
    """The stage-2 model of a run directory (newest checkpoint) or of one checkpoint directory."""
    path = latest_checkpoint(checkpoint)
    info_file = path.parent.parent / RUN_INFO
    if not info_file.is_file():
        raise FmrisynthError(f"not a diffusion checkpoint (no {RUN_INFO} in its run directory)", checkpoint)
    ckpt = load_checkpoint(path)
    info = json.loads(info_file.read_text())
    model = build_denoiser(ckpt.config.model, info["latent_shape"], len(info["conditions"]))
    try:
        model.load_state_dict(ckpt.module_state("model", ema=True))
    except RuntimeError as e:
        raise FmrisynthError(f"weights do not match the model in its config ({str(e).splitlines()[0]})", path) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    diffusion = Diffusion(ckpt.config.diffusion, len(info["conditions"]))
    return Denoiser(model.to(device).eval(), diffusion, ckpt.config, info, path)


def _write_clip(folder: Path, name: str, volume: np.ndarray, affine: np.ndarray, sidecar: dict) -> None:
    """One sample as NIfTI (D, H, W, T) + JSON sidecar + BIDS events.tsv, from volume (T, D, H, W)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(1, 2, 3, 0), dtype=np.float32), affine)
    img.header.set_zooms((*np.sqrt((affine[:3, :3] ** 2).sum(0)), sidecar["tr"]))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, folder / f"{name}_bold.nii.gz")
    (folder / f"{name}_bold.json").write_text(json.dumps(sidecar, indent=1))
    events = f"onset\tduration\ttrial_type\n{sidecar['onset_s']:.3f}\t{sidecar['duration_s']:.3f}\t{sidecar['condition']}\n"
    (folder / f"{name}_events.tsv").write_text(events)


def sample(
    checkpoint: str | Path,
    condition: str,
    n: int,
    out: str | Path,
    guidance: float | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    seed: int = 0,
    onset_s: float | None = None,
    duration_s: float | None = None,
    batch_size: int = 8,
) -> list[Path]:
    """Generate ``n`` clips of ``condition`` and write them into ``out``; return the NIfTI paths.

    The block's timing is ``onset_s``/``duration_s`` when given (a virtual experiment), otherwise a
    training block of the condition drawn with ``seed``. ``guidance``, ``steps`` and ``sampler``
    default to the run's diffusion config. The same seed gives the same clips; all files appear only
    once every clip is written.
    """
    from fmrisynth import stage1

    den = load_denoiser(checkpoint)
    dcfg = den.config.diffusion
    guidance = dcfg.guidance if guidance is None else guidance
    steps, sampler = steps or dcfg.sample_steps, sampler or dcfg.sampler
    conditions = den.info["conditions"]
    if condition not in conditions:
        raise FmrisynthError(f"unknown condition {condition!r}; this model knows {', '.join(conditions)}")
    if n < 1:
        raise FmrisynthError(f"--n must be at least 1, got {n}")
    blocks = np.asarray(den.info["blocks"].get(condition, []), dtype=float).reshape(-1, 3)  # (rows, onset/dur/tr)
    if len(blocks) == 0:
        raise FmrisynthError(f"condition {condition!r} has no training clips to take its timing from")
    rng = np.random.default_rng(seed)
    timing = blocks[rng.integers(len(blocks), size=n)]  # (n, 3)
    if onset_s is not None:
        timing[:, 0] = onset_s
    if duration_s is not None:
        timing[:, 1] = duration_s
    frames = den.info["latent_shape"][0]
    if (timing[:, 0] < 0).any() or (timing[:, 1] <= 0).any() or (timing[:, 0] >= frames * timing[:, 2]).any():
        raise FmrisynthError(f"the block must start inside the clip ({frames} frames) and last > 0 s")
    designs = design_boxcar(*torch.tensor(timing.T, dtype=torch.float32), frames)  # (n, T)
    labels = torch.full((n,), conditions.index(condition), dtype=torch.long)

    clips = ClipStore(den.info["clip_store"])
    vqgan = stage1.load_vqgan(Path(den.info["vqgan_checkpoint"]), clips.mask)
    generator = torch.Generator().manual_seed(seed)
    out = Path(out)
    tmp = out / f".tmp-sample-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stem = f"{condition.replace(':', '-')}_seed{seed}"
    written = []
    try:
        for start in range(0, n, batch_size):
            z = den.generate(labels[start : start + batch_size], designs[start : start + batch_size], steps, sampler,
                             guidance, generator)  # fmt: skip  # (b, T, c, d, h, w)
            try:
                volumes = stage1.decode(vqgan, z).numpy()  # (b, T, D, H, W)
            except RuntimeError as e:
                raise FmrisynthError(f"the VQ-GAN cannot decode these latents ({str(e).splitlines()[0]})",
                                     den.info["vqgan_checkpoint"]) from None  # fmt: skip
            for i, volume in enumerate(volumes, start):
                onset, duration, tr = timing[i]
                sidecar = {"condition": condition, "onset_s": float(onset), "duration_s": float(duration),
                           "tr": float(tr), "seed": seed, "index": i, "guidance": guidance, "sampler": sampler,
                           "steps": steps, "checkpoint": str(den.checkpoint.resolve())}  # fmt: skip
                _write_clip(tmp, f"{stem}_{i:03d}", volume, clips.affine, sidecar)
        for f in sorted(tmp.iterdir()):
            f.replace(out / f.name)
            written += [out / f.name] if f.name.endswith("_bold.nii.gz") else []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written

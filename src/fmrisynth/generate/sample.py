"""Generation: load a trained stage-2 run and turn noise into clips on the model grid.

A clip is made in three parts, each from its own model (DESIGN.md, "The pipeline"):

    residual latents  the space-time denoiser, conditioned on label and design  (B, T, c, d, h, w)
      -> decode       the VQ-GAN, frame by frame                                (B, T, D, H, W)
      + codec noise   what the VQ-GAN drops, per voxel and spatially smooth     (B, T, V)
      + response      the task response of the design, through a drawn subject (B, T, V)

With ``stage2.response: none`` the denoiser makes whole clips and there is no response to add.
``sample`` writes one clip per sample, in the format ``fmrisynth evaluate`` reads::

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

from fmrisynth.config import Config
from fmrisynth.data.store import ClipStore
from fmrisynth.errors import FmrisynthError
from fmrisynth.generate import codec
from fmrisynth.models.diffusion import Diffusion
from fmrisynth.models.presets import build_denoiser
from fmrisynth.models.response import Event, ResponseModel
from fmrisynth.models.vqgan import VQGAN
from fmrisynth.training.diffusion import RUN_INFO, design_boxcar
from fmrisynth.training.loop import autocast, default_device, latest_checkpoint, load_checkpoint


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
        """Raw latent clips (B, T, c, d, h, w) for labels (B,) and designs (B, T), in the store's units.

        T is the designs' length: ours runs on any number of frames, the MONAI U-Net on its own.
        """
        _, c, *spatial = self.info["latent_shape"]
        device = next(self.model.parameters()).device
        with autocast(device, self.config.train.amp):
            z = self.diffusion.sample(self.model, labels.to(device), designs.to(device), (designs.shape[1], c, *spatial),
                                      steps, sampler, guidance, generator)  # fmt: skip  # (B, T, c, d, h, w)
        mean, std = (torch.tensor(self.info[k]).reshape(c, 1, 1, 1) for k in ("latent_mean", "latent_std"))
        return z.float().cpu() * std + mean


def load_denoiser(checkpoint: str | Path, device: str | torch.device | None = None) -> Denoiser:
    """The stage-2 model of a run directory (newest checkpoint) or of one checkpoint directory."""
    path = latest_checkpoint(checkpoint)
    info_file = path.parent.parent / RUN_INFO
    if not info_file.is_file():
        raise FmrisynthError(f"not a diffusion checkpoint (no {RUN_INFO} in its run directory)", checkpoint)
    ckpt = load_checkpoint(path)
    try:
        info = json.loads(info_file.read_text())
        shape, conditions = info["latent_shape"], info["conditions"]
        [info[k] for k in ("latent_mean", "latent_std", "vqgan_checkpoint", "clip_store", "blocks")]
    except (ValueError, KeyError, TypeError) as e:
        raise FmrisynthError(f"run description is damaged or incomplete ({e})", info_file) from None
    model = build_denoiser(ckpt.config.model, shape, len(conditions))
    try:
        model.load_state_dict(ckpt.module_state("model", ema=True))
    except RuntimeError as e:
        raise FmrisynthError(f"weights do not match the model in its config ({str(e).splitlines()[0]})", path) from None
    device = device or default_device()
    diffusion = Diffusion(ckpt.config.diffusion, len(conditions))
    return Denoiser(model.to(device).eval(), diffusion, ckpt.config, info, path)


@dataclass
class Generator:
    """Everything a stage-2 run generates with: denoiser, VQ-GAN, response and codec noise models."""

    denoiser: Denoiser
    vqgan: VQGAN
    response: ResponseModel | None
    noise: codec.CodecNoise | None  # None when the run's config turns it off
    mask: np.ndarray  # (D, H, W) bool
    affine: np.ndarray  # (4, 4)

    @property
    def conditions(self) -> list[str]:
        return self.denoiser.info["conditions"]

    def clips(self, labels: np.ndarray, designs: np.ndarray, events: list[list[Event]], tr: np.ndarray, seed: int,
              steps: int, sampler: str, guidance: float) -> np.ndarray:  # fmt: skip
        """Clips (B, T, V) of in-mask voxels, for labels (B,), boxcars (B, T), events and TR per clip.

        All randomness flows from ``seed``: the diffusion noise (torch), subjects and codec noise (numpy).
        """
        frames = designs.shape[1]
        torch_gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
        z = self.denoiser.generate(torch.as_tensor(labels), torch.as_tensor(designs, dtype=torch.float32), steps,
                                   sampler, guidance, torch_gen)  # fmt: skip  # (B, T, c, d, h, w)
        try:
            clips = codec.decode(self.vqgan, z)[:, :, torch.from_numpy(self.mask)].numpy()  # (B, T, V)
        except RuntimeError as e:
            raise FmrisynthError(f"the VQ-GAN cannot decode these latents ({str(e).splitlines()[0]})",
                                 self.denoiser.info["vqgan_checkpoint"]) from None  # fmt: skip
        for b in range(len(clips)):
            if self.noise is not None:
                clips[b] += self.noise.sample(frames, self.mask, rng)
            if self.response is not None:
                subject = self.response.maps(self.response.draw_subjects(1, rng)[0])  # (C, K, V)
                clips[b] += self.response.predict(events[b], float(tr[b]), frames, subject)
        if not np.isfinite(clips).all():
            raise FmrisynthError("the model produced non-finite values; the checkpoint is damaged or diverged",
                                 self.denoiser.checkpoint)  # fmt: skip
        return clips


def load_generator(checkpoint: str | Path, device: str | torch.device | None = None) -> Generator:
    """The generator of a stage-2 run directory or checkpoint, with its VQ-GAN and extra models."""
    den = load_denoiser(checkpoint, device)
    store = ClipStore(den.info["clip_store"])
    vqgan = codec.load_vqgan(Path(den.info["vqgan_checkpoint"]), store.mask)
    response, noise = codec.latent_extras(ClipStore(den.info["latents"]))
    stage2 = den.config.stage2
    return Generator(den, vqgan, response, noise if stage2.codec_noise else None, store.mask, store.affine)


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
    gen = load_generator(checkpoint)
    den = gen.denoiser
    dcfg = den.config.diffusion
    guidance = dcfg.guidance if guidance is None else guidance
    steps, sampler = steps or dcfg.sample_steps, sampler or dcfg.sampler
    conditions = gen.conditions
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
    designs = design_boxcar(*torch.tensor(timing.T, dtype=torch.float32), frames).numpy()  # (n, T)
    labels = np.full(n, conditions.index(condition))
    events = [[Event(condition, float(o), float(d))] for o, d, _ in timing]
    full = np.zeros((frames, *gen.mask.shape), np.float32)  # (T, D, H, W)
    out = Path(out)
    tmp = out / f".tmp-sample-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stem = f"{condition.replace(':', '-')}_seed{seed}"
    written = []
    try:
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            clips = gen.clips(labels[part], designs[part], events[part], timing[part, 2], seed + start, steps,
                              sampler, guidance)  # fmt: skip  # (b, T, V)
            for i, clip in enumerate(clips, start):
                onset, duration, tr = timing[i]
                full[:, gen.mask] = clip
                sidecar = {"condition": condition, "onset_s": float(onset), "duration_s": float(duration),
                           "tr": float(tr), "seed": seed, "index": i, "guidance": guidance, "sampler": sampler,
                           "steps": steps, "checkpoint": str(den.checkpoint.resolve())}  # fmt: skip
                _write_clip(tmp, f"{stem}_{i:03d}", full, gen.affine, sidecar)
        for f in sorted(tmp.iterdir()):
            f.replace(out / f.name)
            written += [out / f.name] if f.name.endswith("_bold.nii.gz") else []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written

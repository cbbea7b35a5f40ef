"""The stage-1 codec: load a trained VQ-GAN, cache latent clips, decode latents back to volumes.

``encode_store`` turns a clip store into a *latent store* (a ClipStore of kind "latents": item
(T, c, d, h, w) float16, the same manifest rows in the same order, and per-channel latent mean/std
over the train split for the diffusion stage to normalise with); ``decode`` maps generated latents
back to volumes; ``reconstruct_store`` writes decoded clips as a clip store, so that
``fmrisynth evaluate`` measures what decoding alone loses (the ``codec`` reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fmrisynth.data.store import ClipStore, StoreWriter
from fmrisynth.errors import FmrisynthError
from fmrisynth.models.vqgan import VQGAN
from fmrisynth.training.loop import load_checkpoint
from fmrisynth.training.vqgan import require_clip_store


def load_vqgan(checkpoint: Path, mask: np.ndarray | None = None) -> VQGAN:
    """The VQ-GAN of a run or checkpoint directory, in eval mode on the CPU.

    Args:
        checkpoint: a train-vae run directory (newest checkpoint) or one checkpoint directory.
        mask: if given, the brain mask of the data it will see; a different grid or mask is an error.
    """
    ckpt = load_checkpoint(checkpoint)
    state = ckpt.module_state("vqgan", ema=False)
    if "mask" not in state:
        raise FmrisynthError("not a VQ-GAN checkpoint (no vqgan.mask); pass the output of `fmrisynth train-vae`", ckpt.path)
    model = VQGAN(ckpt.config.vae, state["mask"][0, 0].numpy() > 0)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise FmrisynthError(f"checkpoint does not match its VQ-GAN config ({str(e).splitlines()[0]})", ckpt.path) from None
    if mask is not None:
        if tuple(mask.shape) != model.grid_shape:
            raise FmrisynthError(
                f"grid {'x'.join(map(str, mask.shape))} does not match the VQ-GAN's "
                f"{'x'.join(map(str, model.grid_shape))}; prepare the data on the grid it was trained on",
                ckpt.path,
            )
        if not np.array_equal(np.asarray(mask, bool), model.mask[0, 0].numpy() > 0):
            raise FmrisynthError("brain mask differs from the one the VQ-GAN was trained with", ckpt.path)
    return model.eval()


def _provenance(vqgan_checkpoint: Path, clips: ClipStore) -> dict:
    """Header entries saying which checkpoint and store an encoded or reconstructed store came from."""
    return {
        "vqgan_checkpoint": str(Path(vqgan_checkpoint).resolve()),
        "clip_store": str(clips.path.resolve()),
        "grid": clips.header.get("grid", "x".join(map(str, clips.grid_shape))),
    }


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def _per_clip(
    fn, store: ClipStore, indices: np.ndarray, batch: int, progress: bool, desc: str
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (index, fn(frames)) per clip, frames (T, 1, D, H, W) fed ``batch`` at a time."""
    from tqdm import tqdm

    for i in tqdm(indices, desc=desc, disable=not progress, dynamic_ncols=True):
        frames = torch.from_numpy(store.clip(int(i)))[:, None].to(_device())  # (T, 1, D, H, W)
        yield int(i), torch.cat([fn(chunk) for chunk in frames.split(batch)]).cpu()


def encode_store(
    vqgan_checkpoint: Path, clip_store: Path, out: Path, progress: bool = True, batch: int = 32,
    splits: tuple[str, ...] | None = None,
) -> Path:  # fmt: skip
    """Encode every clip of ``clip_store`` (or those of ``splits``) once into a latent store at ``out``.

    Items are the unquantised encoder outputs (T, c, d, h, w); ``decode`` quantises them. The header
    records the checkpoint, the source store, the grid and the per-channel mean and std of the train
    split's latents. Stage 2 trains on the train split only, so ``splits=("train",)`` saves the time of
    encoding held-out clips nothing downstream reads. Returns ``out``.
    """
    clips = require_clip_store(Path(clip_store))
    model = load_vqgan(vqgan_checkpoint, clips.mask).to(_device())
    c, f = model.quantizer.codebook.shape[1], model.downsample
    item_shape = (clips.item_shape[0], c, *(s // f for s in clips.grid_shape))
    meta = _provenance(vqgan_checkpoint, clips)
    train = set(clips.indices(split="train").tolist())
    moments = torch.zeros(3, c, dtype=torch.float64)  # count, sum, sum of squares per channel
    with StoreWriter(out, item_shape, clips.affine, clips.grid_shape, clips.conditions, kind="latents", meta=meta) as w:
        keep = np.arange(len(clips)) if splits is None else np.flatnonzero(clips.manifest["split"].isin(splits).to_numpy())
        for i, z in _per_clip(model.latent, clips, keep, batch, progress, "encode"):  # z (T, c, d, h, w)
            z16 = z.half()
            w.add(z16.numpy(), **clips.manifest.iloc[i].to_dict())
            if i in train:
                zc = z16.double().transpose(0, 1).reshape(c, -1)  # (c, T·d·h·w), as stored
                moments += torch.stack([torch.full((c,), zc.shape[1], dtype=torch.float64), zc.sum(1), zc.pow(2).sum(1)])
        if moments[0, 0] == 0:
            raise FmrisynthError("the clip store has no train split to compute latent statistics on", clips.path)
        mean = moments[1] / moments[0]
        std = (moments[2] / moments[0] - mean**2).clamp(min=1e-12).sqrt()
        w.header.update(latent_mean=mean.tolist(), latent_std=std.tolist())
    return Path(out)


@torch.no_grad()
def decode(model: VQGAN, z: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Raw latents z (B, T, c, d, h, w) -> volumes (B, T, D, H, W), zero outside the brain mask.

    Latents are snapped to the codebook first, so generated latents decode like encoded ones.
    """
    device = next(model.parameters()).device
    b, t = z.shape[:2]
    frames = z.reshape(b * t, *z.shape[2:]).to(device, torch.float32)  # (B·T, c, d, h, w)
    out = [model.decode(model.quantizer(chunk)[0]) for chunk in frames.split(batch)]  # (n, 1, D, H, W) each
    return torch.cat(out)[:, 0].reshape(b, t, *model.grid_shape)  # (B, T, D, H, W)


def reconstruct_store(
    vqgan_checkpoint: Path, clip_store: Path, out: Path, split: str | None = "test", progress: bool = True, batch: int = 32
) -> Path:
    """Write the VQ-GAN reconstructions (encode, quantise, decode) of a split as a clip store at ``out``."""
    clips = require_clip_store(Path(clip_store))
    model = load_vqgan(vqgan_checkpoint, clips.mask).to(_device())
    indices = clips.indices(split=split)
    if len(indices) == 0:
        raise FmrisynthError(f"no clips in split {split!r}", clips.path)
    mask = torch.from_numpy(clips.mask)
    meta = _provenance(vqgan_checkpoint, clips)
    with StoreWriter(out, clips.item_shape, clips.affine, clips.grid_shape, clips.conditions, mask=clips.mask, meta=meta) as w:
        for i, recon in _per_clip(lambda x: model(x)[0], clips, indices, batch, progress, "reconstruct"):
            w.add(recon[:, 0][:, mask].numpy(), **clips.manifest.iloc[i].to_dict())  # (T, V)
    return Path(out)

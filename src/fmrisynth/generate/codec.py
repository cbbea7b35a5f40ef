"""The stage-1 codec: load a trained VQ-GAN, cache latent clips, decode latents back to volumes.

``encode_store`` turns a clip store into a *latent store* (a ClipStore of kind "latents": item
(T, c, d, h, w) float16, the same manifest rows in the same order, and per-channel latent mean/std
over the train split for the diffusion stage to normalise with). Given a task response model
(models/response.py) it encodes each clip minus its subject's response: stage 2 then diffuses what
the task does not explain. The models a latent store keeps beside its latents are fitted in
``generate/fit.py`` (the response before encoding, the Gaussian background models after it);
``latent_extras`` reads them all back as ``Extras``.

``decode`` maps generated latents back to volumes; ``reconstruct_store`` writes decoded clips as a
clip store, so that ``fmrisynth evaluate`` measures what decoding alone loses (the ``codec``
reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from fmrisynth.checkpoint import load_checkpoint
from fmrisynth.data.store import ClipStore, StoreWriter, require_clip_store
from fmrisynth.distributed import default_device
from fmrisynth.errors import FmrisynthError
from fmrisynth.models.background import BACKGROUND, CODEC_RESIDUAL, PRIOR, GaussianBackground
from fmrisynth.models.response import ResponseModel
from fmrisynth.models.vqgan import VQGAN
from fmrisynth.publish import record_path


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


def _provenance(vqgan_checkpoint: Path, clips: ClipStore, out: Path) -> dict:
    """Header entries saying which checkpoint and store the store ``out`` came from (encoded or
    reconstructed), recorded relative to its store.json (``fmrisynth.publish.record_path``)."""
    header = Path(out) / "store.json"
    return {
        "vqgan_checkpoint": record_path(vqgan_checkpoint, header),
        "clip_store": record_path(clips.path, header),
        "grid": clips.header.get("grid", "x".join(map(str, clips.grid_shape))),
    }


@torch.no_grad()
def per_clip(
    fn, store: ClipStore, indices: np.ndarray, batch: int, progress: bool, desc: str,
    transform: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:  # fmt: skip
    """Yield (index, fn(frames)) per clip, frames (T, 1, D, H, W) fed ``batch`` at a time.

    ``transform(i, clip)`` may change the clip (T, D, H, W) first (``minus_response``).
    """
    from tqdm import tqdm

    for i in tqdm(indices, desc=desc, disable=not progress, dynamic_ncols=True):
        clip = store.clip(int(i))  # (T, D, H, W)
        clip = clip if transform is None else transform(int(i), clip)
        frames = torch.from_numpy(clip)[:, None].to(default_device())  # (T, 1, D, H, W)
        yield int(i), torch.cat([fn(chunk) for chunk in frames.split(batch)]).cpu()


def minus_response(clips: ClipStore, response: ResponseModel | None) -> Callable[[int, np.ndarray], np.ndarray] | None:
    """The ``per_clip`` transform that subtracts clip i's task response (T, D, H, W); None without a model."""
    if response is None:
        return None
    return lambda i, clip: clip - clips.unmask(response.clip_response(clips, i))


def train_rows(clips: ClipStore) -> np.ndarray:
    """The train split's rows: the latent statistics and every model of a latent store are fitted on them."""
    rows = clips.indices(split="train")
    if len(rows) < 2:
        raise FmrisynthError("the clip store needs at least 2 train clips to compute latent statistics on", clips.path)
    return rows


def encode_store(
    vqgan_checkpoint: Path, clip_store: Path, out: Path, progress: bool = True, batch: int = 32,
    splits: tuple[str, ...] | None = None, response: ResponseModel | None = None,
) -> Path:  # fmt: skip
    """Encode every clip of ``clip_store`` (or those of ``splits``) once into a latent store at ``out``.

    Items are the unquantised encoder outputs (T, c, d, h, w) of each clip minus its task response
    when ``response`` is given (``generate.fit.fit_response``; kept beside them as response.npz), of
    the whole clip otherwise; ``decode`` quantises them. The header records the checkpoint, the
    source store, the grid, ``response`` ("hrf" or "none") and the per-channel mean and std of the
    train split's latents. Stage 2 trains on the train split only, so ``splits=("train",)`` saves
    the time of encoding held-out clips nothing downstream reads. Returns ``out``.
    """
    clips = require_clip_store(Path(clip_store))
    model = load_vqgan(vqgan_checkpoint, clips.mask).to(default_device())
    c, f = model.quantizer.codebook.shape[1], model.downsample
    item_shape = (clips.item_shape[0], c, *(s // f for s in clips.grid_shape))
    meta = {**_provenance(vqgan_checkpoint, clips, out), "response": "none" if response is None else "hrf"}
    train = set(train_rows(clips).tolist())
    keep = np.arange(len(clips)) if splits is None else np.flatnonzero(clips.manifest["split"].isin(splits).to_numpy())
    moments = torch.zeros(3, c, dtype=torch.float64)  # count, sum, sum of squares per channel
    with StoreWriter(out, item_shape, clips.affine, clips.grid_shape, clips.conditions, kind="latents", meta=meta) as w:
        for i, z in per_clip(model.latent, clips, keep, batch, progress, "encode", minus_response(clips, response)):
            z16 = z.half()  # (T, c, d, h, w)
            w.add(z16.numpy(), **clips.manifest.iloc[i].to_dict())
            if i in train:
                zc = z16.double().transpose(0, 1).reshape(c, -1)  # (c, T·d·h·w), as stored
                moments += torch.stack([torch.full((c,), zc.shape[1], dtype=torch.float64), zc.sum(1), zc.pow(2).sum(1)])
        mean = moments[1] / moments[0]
        std = (moments[2] / moments[0] - mean**2).clamp(min=1e-12).sqrt()
        w.header.update(latent_mean=mean.tolist(), latent_std=std.tolist())
        if response is not None:
            response.save(w.tmp / "response.npz")
    return Path(out)


@dataclass
class Extras:
    """The models a latent store keeps beside its latents (written by ``encode_store`` and
    ``generate.fit.fit_backgrounds``, read here)."""

    response: ResponseModel | None  # the task response (None for stage2.response: none)
    background: GaussianBackground  # clip - response in voxels (T, V): the Gaussian generator
    prior: GaussianBackground  # normalised residual latents (T, c·d·h·w): the diffusion prior
    codec: GaussianBackground  # clip - decode(encode(clip)) in voxels (T, V): what the VQ-GAN drops


def stored_response(latents: ClipStore) -> ResponseModel | None:
    """The task response model the latents of a latent store are relative to (None: whole clips)."""
    return ResponseModel.load(latents.path / "response.npz") if latents.header.get("response") == "hrf" else None


def latent_extras(latents: ClipStore) -> Extras:
    """The response and Gaussian background models stored with a latent store."""
    load = lambda name: GaussianBackground.load(latents.path / name)  # noqa: E731
    return Extras(stored_response(latents), load(BACKGROUND), load(PRIOR), load(CODEC_RESIDUAL))


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
    model = load_vqgan(vqgan_checkpoint, clips.mask).to(default_device())
    indices = clips.indices(split=split)
    if len(indices) == 0:
        raise FmrisynthError(f"no clips in split {split!r}", clips.path)
    mask = torch.from_numpy(clips.mask)
    meta = _provenance(vqgan_checkpoint, clips, out)
    with StoreWriter(out, clips.item_shape, clips.affine, clips.grid_shape, clips.conditions, mask=clips.mask, meta=meta) as w:
        for i, recon in per_clip(lambda x: model(x)[0], clips, indices, batch, progress, "reconstruct"):
            w.add(recon[:, 0][:, mask].numpy(), **clips.manifest.iloc[i].to_dict())  # (T, V)
    return Path(out)

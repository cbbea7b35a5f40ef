"""The stage-1 codec: load a trained VQ-GAN, cache latent clips, decode latents back to volumes.

``encode_store`` turns a clip store into a *latent store* (a ClipStore of kind "latents": item
(T, c, d, h, w) float16, the same manifest rows in the same order, and per-channel latent mean/std
over the train split for the diffusion stage to normalise with). With ``response="hrf"`` it first
fits the task response model on the train clips (models/response.py) and encodes each clip minus
its subject's response: stage 2 then diffuses what the task does not explain. It also fits three
Gaussian background models (models/background.py), kept inside the latent store as ``Extras``:
``background.npz`` (clip - response in voxels: the training-free Gaussian generator),
``latent_prior.npz`` (the normalised residual latents: the diffusion's prior) and
``codec_residual.npz`` (clip - decode(encode(clip)), what the VQ-GAN drops: about 38 % of the
variance on the demo, structured in space and time, added back to decoded clips).

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
from fmrisynth.config import Stage2Config
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
def _per_clip(
    fn, store: ClipStore, indices: np.ndarray, batch: int, progress: bool, desc: str,
    transform: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:  # fmt: skip
    """Yield (index, fn(frames)) per clip, frames (T, 1, D, H, W) fed ``batch`` at a time.

    ``transform(i, clip)`` may change the clip (T, D, H, W) first (subtract its task response).
    """
    from tqdm import tqdm

    for i in tqdm(indices, desc=desc, disable=not progress, dynamic_ncols=True):
        clip = store.clip(int(i))  # (T, D, H, W)
        clip = clip if transform is None else transform(int(i), clip)
        frames = torch.from_numpy(clip)[:, None].to(default_device())  # (T, 1, D, H, W)
        yield int(i), torch.cat([fn(chunk) for chunk in frames.split(batch)]).cpu()


def encode_store(
    vqgan_checkpoint: Path, clip_store: Path, out: Path, progress: bool = True, batch: int = 32,
    splits: tuple[str, ...] | None = None, stage2: Stage2Config | None = None, seed: int = 0,
) -> Path:  # fmt: skip
    """Encode every clip of ``clip_store`` (or those of ``splits``) once into a latent store at ``out``.

    Items are the unquantised encoder outputs (T, c, d, h, w); ``decode`` quantises them. The header
    records the checkpoint, the source store, the grid, ``stage2.response`` ("hrf": items encode
    clip - response, "none": whole clips) and the per-channel mean and std of the train split's
    latents. Up to ``stage2.background_clips`` train clips (drawn with ``seed``) fit the voxel and
    latent Gaussian models, ``stage2.noise_clips`` of them the codec residual model (``Extras``).
    Stage 2 trains on the train split only, so ``splits=("train",)`` saves the time of encoding
    held-out clips nothing downstream reads. Returns ``out``.
    """
    clips = require_clip_store(Path(clip_store))
    stage2 = stage2 or Stage2Config()
    response = stage2.response
    if response not in ("hrf", "none"):
        raise FmrisynthError(f"unknown response model {response!r}; choose hrf or none")
    model = load_vqgan(vqgan_checkpoint, clips.mask).to(default_device())
    c, f = model.quantizer.codebook.shape[1], model.downsample
    item_shape = (clips.item_shape[0], c, *(s // f for s in clips.grid_shape))
    meta = {**_provenance(vqgan_checkpoint, clips, out), "response": response}
    train_rows = clips.indices(split="train")
    if len(train_rows) < 2:
        raise FmrisynthError("the clip store needs at least 2 train clips to compute latent statistics on", clips.path)
    fitted = ResponseModel.fit(clips, train_rows, stage2.response_rank) if response == "hrf" else None
    rng = np.random.default_rng(seed)
    fit_rows = set(rng.choice(train_rows, min(stage2.background_clips, len(train_rows)), replace=False).tolist())
    noise_rows = np.sort(rng.choice(train_rows, min(stage2.noise_clips, len(train_rows)), replace=False))
    voxels, latents = {}, {}  # train clip -> its residual (T, V) float16 / latent (T, c, d, h, w) float16

    def residual(i: int, clip: np.ndarray) -> np.ndarray:  # (T, D, H, W) minus the clip's response
        clip = clip - clips.unmask(fitted.clip_response(clips, i)) if fitted is not None else clip
        if i in fit_rows and i not in voxels:
            voxels[i] = clip[:, clips.mask].astype(np.float16)
        return clip

    train = set(train_rows.tolist())
    moments = torch.zeros(3, c, dtype=torch.float64)  # count, sum, sum of squares per channel
    with StoreWriter(out, item_shape, clips.affine, clips.grid_shape, clips.conditions, kind="latents", meta=meta) as w:
        keep = np.arange(len(clips)) if splits is None else np.flatnonzero(clips.manifest["split"].isin(splits).to_numpy())
        for i, z in _per_clip(model.latent, clips, keep, batch, progress, "encode", residual):  # z (T, c, d, h, w)
            z16 = z.half()
            w.add(z16.numpy(), **clips.manifest.iloc[i].to_dict())
            if i in train:
                zc = z16.double().transpose(0, 1).reshape(c, -1)  # (c, T·d·h·w), as stored
                moments += torch.stack([torch.full((c,), zc.shape[1], dtype=torch.float64), zc.sum(1), zc.pow(2).sum(1)])
            if i in fit_rows:
                latents[i] = z16.numpy()
        mean = moments[1] / moments[0]
        std = (moments[2] / moments[0] - mean**2).clamp(min=1e-12).sqrt()
        w.header.update(latent_mean=mean.tolist(), latent_std=std.tolist())
        if fitted is not None:
            fitted.save(w.tmp / "response.npz")
        dropped = dict(_per_clip(lambda v: v - model(v)[0], clips, noise_rows, batch, False, "", residual))
        subjects = clips.manifest["subject"].astype(str)
        fit = lambda x, rows: GaussianBackground.fit(  # noqa: E731
            np.stack([x[i] for i in rows]), subjects.iloc[rows].tolist(), stage2.background_components,
            stage2.prior_clips, seed=seed)  # fmt: skip
        rows = sorted(fit_rows & set(latents))
        fit(voxels, rows).save(w.tmp / BACKGROUND)
        mu, sd = (v.float().numpy()[:, None, None, None] for v in (mean, std))  # (c, 1, 1, 1): the model's units
        fit({i: ((latents[i] - mu) / sd).reshape(item_shape[0], -1) for i in rows}, rows).save(w.tmp / PRIOR)  # (T, E)
        dropped = {i: d[:, 0][:, torch.from_numpy(clips.mask)].numpy() for i, d in dropped.items()}  # (T, V) each
        fit(dropped, list(noise_rows)).save(w.tmp / CODEC_RESIDUAL)
    return Path(out)


@dataclass
class Extras:
    """The models a latent store keeps beside its latents (written by ``encode_store``, read here)."""

    response: ResponseModel | None  # the task response (None for stage2.response: none)
    background: GaussianBackground  # clip - response in voxels (T, V): the Gaussian generator
    prior: GaussianBackground  # normalised residual latents (T, c·d·h·w): the diffusion prior
    codec: GaussianBackground  # clip - decode(encode(clip)) in voxels (T, V): what the VQ-GAN drops


def latent_extras(latents: ClipStore) -> Extras:
    """The response and Gaussian background models stored with a latent store."""
    response = ResponseModel.load(latents.path / "response.npz") if latents.header.get("response") == "hrf" else None
    load = lambda name: GaussianBackground.load(latents.path / name)  # noqa: E731
    return Extras(response, load(BACKGROUND), load(PRIOR), load(CODEC_RESIDUAL))


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
        for i, recon in _per_clip(lambda x: model(x)[0], clips, indices, batch, progress, "reconstruct"):
            w.add(recon[:, 0][:, mask].numpy(), **clips.manifest.iloc[i].to_dict())  # (T, V)
    return Path(out)

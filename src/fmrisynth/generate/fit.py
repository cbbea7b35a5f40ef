"""The fit stage: the statistical models a latent store keeps beside its latents.

Encoding (``generate/codec.py``) is a fixed function of the trained VQ-GAN; these are models of the
data, fitted on the train split, with settings of their own (``stage2.*`` takes effect here). So
they are a stage of their own, a function from artifacts to artifacts that can be run and tested
alone, and refitted without encoding again:

* ``fit_response`` (clip store -> ResponseModel): the task response per condition
  (models/response.py). It comes first because the latents are of clip - response, so
  ``encode_store`` takes it, and keeps it in the latent store as ``response.npz``.
* ``fit_backgrounds`` (latent store + the clip store and VQ-GAN it records -> three files in the
  latent store): Gaussian models (models/background.py) of ``background.npz`` (clip - response in
  voxels: the training-free Gaussian generator), ``latent_prior.npz`` (the normalised residual
  latents: the diffusion's prior) and ``codec_residual.npz`` (clip - decode(encode(clip)), what the
  VQ-GAN drops: about 38 % of the variance on the demo, structured in space and time, added back to
  decoded clips).

``encode_and_fit`` runs fit_response -> encode_store -> fit_backgrounds: the latent store that
``fmrisynth train-vae`` leaves. ``codec.latent_extras`` reads the models back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fmrisynth.config import Stage2Config
from fmrisynth.data.store import ClipStore, require_clip_store
from fmrisynth.distributed import default_device
from fmrisynth.errors import FmrisynthError
from fmrisynth.generate.codec import encode_store, load_vqgan, minus_response, per_clip, stored_response, train_rows
from fmrisynth.models.background import BACKGROUND, CODEC_RESIDUAL, PRIOR, GaussianBackground
from fmrisynth.models.response import ResponseModel
from fmrisynth.publish import resolve_recorded, staged_file


def fit_response(clips: ClipStore, stage2: Stage2Config) -> ResponseModel | None:
    """The task response model of ``stage2.response`` on the train clips: "hrf" (with
    ``stage2.response_rank`` subject components) or "none" (None: stage 2 diffuses whole clips)."""
    if stage2.response not in ("hrf", "none"):
        raise FmrisynthError(f"unknown response model {stage2.response!r}; choose hrf or none")
    rows = train_rows(clips)
    return ResponseModel.fit(clips, rows, stage2.response_rank) if stage2.response == "hrf" else None


def fit_backgrounds(latent_store: Path, stage2: Stage2Config | None = None, seed: int = 0, batch: int = 32) -> Path:
    """Fit the three Gaussian background models into ``latent_store`` (see the module docstring).

    Up to ``stage2.background_clips`` train clips (drawn with ``seed``) that the store encodes fit
    the voxel and latent models, ``stage2.noise_clips`` train clips the codec residual model, each
    with ``stage2.background_components`` directions and ``stage2.prior_clips`` shrinkage. The clip
    store and VQ-GAN are those the latent store records. Returns ``latent_store``.
    """
    stage2, latents = stage2 or Stage2Config(), ClipStore(latent_store)
    if latents.kind != "latents":
        raise FmrisynthError("not a latent store (write one with `fmrisynth train-vae`)", latents.path)
    recorded = {k: resolve_recorded(latents.header[k], latents.path / "store.json") for k in ("clip_store", "vqgan_checkpoint")}
    clips = require_clip_store(recorded["clip_store"])
    residual = minus_response(clips, stored_response(latents))  # (T, D, H, W) -> clip minus its response
    train, rng = train_rows(clips), np.random.default_rng(seed)
    fit_rows = set(rng.choice(train, min(stage2.background_clips, len(train)), replace=False).tolist())
    noise_rows = np.sort(rng.choice(train, min(stage2.noise_clips, len(train)), replace=False))
    position = _positions(clips, latents)  # clip row -> its row in the latent store
    rows = sorted(fit_rows & set(position))
    subjects = clips.manifest["subject"].astype(str)

    def fit(x: list[np.ndarray], of: list[int]) -> GaussianBackground:  # x: one (T, E) array per clip row of ``of``
        return GaussianBackground.fit(np.stack(x), subjects.iloc[of].tolist(), stage2.background_components,
                                      stage2.prior_clips, seed=seed)  # fmt: skip

    def save(model: GaussianBackground, name: str) -> None:  # staged (fmrisynth.publish): never half-written
        with staged_file(latents.path / name) as tmp, open(tmp, "wb") as f:
            model.save(f)

    voxels = [(clips.clip(i) if residual is None else residual(i, clips.clip(i)))[:, clips.mask] for i in rows]
    save(fit([v.astype(np.float16) for v in voxels], rows), BACKGROUND)  # (T, V) each
    mu, sd = (np.asarray(latents.header[k], np.float32)[:, None, None, None] for k in ("latent_mean", "latent_std"))
    normalised = [((latents.item(position[i]) - mu) / sd).reshape(latents.item_shape[0], -1) for i in rows]
    save(fit(normalised, rows), PRIOR)  # (T, c·d·h·w) each, in the units the diffusion model sees
    # building the VQ-GAN draws initial weights from torch's global RNG, which the fits' svd_lowrank draws
    # from too: leave it as the fits before found it, so that encode + fit make what one pass made before
    with torch.random.fork_rng(devices=[]):
        model = load_vqgan(recorded["vqgan_checkpoint"], clips.mask).to(default_device())
    mask = torch.from_numpy(clips.mask)
    dropped = per_clip(lambda v: v - model(v)[0], clips, noise_rows, batch, False, "", residual)  # (T, 1, D, H, W) each
    save(fit([d[:, 0][:, mask].numpy() for _, d in dropped], list(noise_rows)), CODEC_RESIDUAL)  # (T, V) each
    return latents.path


def _positions(clips: ClipStore, latents: ClipStore) -> dict[int, int]:
    """Clip store row -> latent store row. A latent store holds the rows of some splits, in order."""
    kept = np.flatnonzero(clips.manifest["split"].isin(set(latents.manifest["split"])).to_numpy())
    if len(kept) != len(latents):
        raise FmrisynthError(f"holds {len(latents)} clips, its clip store {len(kept)} of those splits", latents.path)
    return {int(i): k for k, i in enumerate(kept)}


def encode_and_fit(vqgan_checkpoint: Path, clip_store: Path, out: Path, stage2: Stage2Config | None = None,
                   seed: int = 0, splits: tuple[str, ...] | None = None, progress: bool = True) -> Path:  # fmt: skip
    """The latent store ``out`` of ``clip_store`` with its models: fit_response -> encode_store -> fit_backgrounds."""
    stage2 = stage2 or Stage2Config()
    response = fit_response(require_clip_store(Path(clip_store)), stage2)
    encode_store(vqgan_checkpoint, clip_store, out, progress=progress, splits=splits, response=response)
    return fit_backgrounds(out, stage2, seed)

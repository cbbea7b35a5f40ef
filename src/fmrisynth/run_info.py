"""``stage2.json``: what sampling needs from a stage-2 run besides its weights; the one writer and reader.

``training/diffusion.py`` writes it into the run directory beside ``checkpoints/`` (the latent shape,
conditions, latent statistics, the latent store, VQ-GAN and clip store to decode with, the training
blocks of each condition, the data's reference losses and, after training, the model's x0 error per
timestep); ``generate/sample.py`` reads it. It lives below both, so that generation needs nothing
from training. Paths are recorded relative to the file (``fmrisynth.publish``), so run folders move.
"""

from __future__ import annotations

import json
from pathlib import Path

from fmrisynth.errors import FmrisynthError
from fmrisynth.publish import record_path, resolve_recorded, staged_file

RUN_INFO = "stage2.json"
PATHS = ("latents", "vqgan_checkpoint", "clip_store")  # the entries that name files, recorded relative
REQUIRED = ("latent_shape", "conditions", "latent_mean", "latent_std", "blocks")


def write_run_info(run: Path, info: dict) -> None:
    """Write ``info`` as ``run/stage2.json``, its ``PATHS`` entries recorded relative to the file."""
    target = Path(run) / RUN_INFO
    with staged_file(target) as tmp:
        tmp.write_text(json.dumps({**info, **{k: record_path(info[k], target) for k in PATHS}}))


def read_run_info(path: Path, given: str | Path) -> dict:
    """``stage2.json`` of the run of checkpoint ``path`` (``given`` by the user), its recorded paths
    resolved; a missing or damaged one is one line naming it."""
    info_file = path.parent.parent / RUN_INFO
    if not info_file.is_file():
        raise FmrisynthError(f"not a diffusion checkpoint (no {RUN_INFO} in its run directory)", given)
    try:
        info = json.loads(info_file.read_text())
        info.update({k: str(resolve_recorded(info[k], info_file)) for k in PATHS})
        [info[k] for k in REQUIRED]
    except (ValueError, KeyError, TypeError) as e:
        raise FmrisynthError(f"run description is damaged or incomplete ({e})", info_file) from None
    return info

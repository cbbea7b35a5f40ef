"""Stage 1's objective: train the VQ-GAN on the frames of a clip store.

``train_vae`` writes a run directory (checkpoints, train_log.jsonl, config.yaml) through the one
training loop; ``fmrisynth.generate.codec`` loads it to encode and decode.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fmrisynth.config import Config, validate_train
from fmrisynth.data.store import require_clip_store
from fmrisynth.models.vqgan import VQGAN
from fmrisynth.models.vqgan_loss import VQGANLoss
from fmrisynth.training.loop import Objective, fit


class VQGANObjective(Objective):
    """The two-player VQ-GAN objective for ``fit``: part "vqgan" (generator), then part "disc".

    The generator pass caches its reconstructions (detached, per micro-batch) so the discriminator
    pass of the same step does not run the VQ-GAN again.
    """

    parts = ("vqgan", "disc")
    ema_target = None
    config_sections = ("vae",)

    def __init__(self, vqgan: VQGAN, loss: VQGANLoss):
        super().__init__()
        self.vqgan, self.loss = vqgan, loss
        self._fakes: dict[int, torch.Tensor] = {}
        self._fakes_step = -1

    def parameters_of(self, part: str):
        return self.vqgan.parameters() if part == "vqgan" else self.loss.discriminator.parameters()

    def forward(self, batch: dict, step: int, part: str) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["x"]  # (B, 1, D, H, W)
        if part == "vqgan":
            recon, codebook_loss, info = self.vqgan(x)  # (B, 1, D, H, W)
            if step != self._fakes_step:
                self._fakes, self._fakes_step = {}, step
            self._fakes[id(x)] = recon.detach()
            loss, logs = self.loss.generator_loss(
                x, recon, codebook_loss, self.vqgan.mask, step, self.vqgan.decoder.conv_out.weight
            )
            return loss, {**logs, "perplexity": info["perplexity"].item(), "codes_used": info["codes_used"].item()}
        fake = self._fakes.pop(id(x), None)
        if fake is None:
            with torch.no_grad():
                fake = self.vqgan(x)[0]
        return self.loss.discriminator_loss(x, fake, step)


def train_vae(cfg: Config, store: Path, out: Path, resume: bool = False, progress: bool = True) -> Path:
    """Train the VQ-GAN of ``cfg.vae`` on the train-split frames of ``store``; return the last checkpoint."""
    from fmrisynth.data.dataset import ClipDataset

    clips = require_clip_store(Path(store))
    validate_train(cfg.vae_train, "vae_train")
    dataset = ClipDataset(clips, split="train", frames=True)
    dataset.check_finite()  # a NaN clip would otherwise train (and be encoded) silently
    torch.manual_seed(cfg.seed)
    objective = VQGANObjective(VQGAN(cfg.vae, clips.mask), VQGANLoss(cfg.vae))
    return fit(objective, dataset, cfg.vae_train, Path(out), cfg.seed, resume=resume, config=cfg, desc="train-vae", progress=progress)

"""Stage 2's objective: train the latent diffusion model on a latent store.

``train_diffusion`` wraps denoiser + diffusion in an ``Objective`` for the project's one training
loop and writes, next to the checkpoints, ``stage2.json`` (``fmrisynth.run_info``): what sampling
needs besides weights (the latent shape, conditions, latent statistics, the VQ-GAN and clip store to
decode with, the response and background models, the training blocks of each condition to draw
default timings from, and, measured after training, the model's x0 error per timestep for the
analytic sampler).

Every logged row carries the data's reference losses (``Diffusion.reference_losses``), computed
once from the training latents, so a run that is not learning shows at step 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import default_collate

from fmrisynth.config import Config, Stage2Config, validate_train
from fmrisynth.data.store import ClipStore
from fmrisynth.errors import FmrisynthError
from fmrisynth.models.background import PRIOR, GaussianBackground
from fmrisynth.checkpoint import load_checkpoint
from fmrisynth.distributed import main_only
from fmrisynth.models.diffusion import Diffusion, design_boxcar
from fmrisynth.models.presets import build_denoiser
from fmrisynth.publish import resolve_recorded
from fmrisynth.run_info import write_run_info
from fmrisynth.training.loop import Objective, fit

MEASURE_CLIPS = 64  # training clips behind the model's x0 error per timestep (stage2.json "x0_error")


class DiffusionObjective(Objective):
    """Denoising loss on per-channel normalised latent clips, conditioned on label and block design.

    With a Gaussian prior (``stage2.prior: gaussian``) the clips are whitened by it first, each by
    its own subject's model (PriorGrad): the zero-initialised network then starts as the prior's
    exact denoiser. Timesteps, noise and condition dropout come from the run's generator
    (``Objective.randn`` ...), so a resumed run and N ranks draw exactly what one uninterrupted
    process would.
    """

    config_sections = ("model", "diffusion", "stage2")

    def __init__(self, model: torch.nn.Module, diffusion: Diffusion, mean: list, std: list, designs: torch.Tensor,
                 prior: GaussianBackground | None = None, subjects: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        self.model, self.diffusion, self.prior = model, diffusion, prior
        self.references: dict[str, float] = {}  # logged with every loss; measured on ``clean`` clips once built
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)  # (c,)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)  # (c,)
        self.register_buffer("designs", designs, persistent=False)  # (n items in the store, T)
        if prior is not None:
            self.register_buffer("subjects", subjects, persistent=False)  # (n items,) prior subject index

    def clean(self, batch: dict) -> torch.Tensor:
        """The clips the model learns to make: normalised, and whitened by the prior (B, T, c, d, h, w)."""
        z = (batch["x"] - self.mean[:, None, None, None]) / self.std[:, None, None, None]  # (B, T, c, d, h, w)
        if self.prior is not None:
            subjects = self.subjects[batch["index"]]  # (B,)
            z = self.prior.whiten(z.flatten(2), subjects).reshape(z.shape)  # (B, T, c, d, h, w)
        return z

    def forward(self, batch: dict, step: int, part: str) -> tuple[torch.Tensor, dict[str, float]]:
        z = self.clean(batch)
        b, d = z.shape[0], self.diffusion
        draws = (self.randint(d.num_steps, b), self.randn(*z.shape), self.rand(b) < d.cfg.cond_drop)
        return d.loss(self.model, z, batch["label"], self.designs[batch["index"]], draws), self.references


def load_prior(store: ClipStore, stage2: Stage2Config) -> tuple[GaussianBackground | None, torch.Tensor | None]:
    """The latent store's Gaussian prior and each item's subject index in it, or (None, None) for a white prior."""
    if stage2.prior == "none":
        return None, None
    if not (store.path / PRIOR).is_file():
        raise FmrisynthError(f"stage2.prior is gaussian but the latent store has no {PRIOR}; re-run train-vae "
                             "(or set stage2.prior=none)", store.path)  # fmt: skip
    prior = GaussianBackground.load(store.path / PRIOR)
    return prior, torch.from_numpy(prior.index(store.manifest["subject"].astype(str).tolist()))


def _latent_store(path: Path) -> ClipStore:
    store = ClipStore(path)
    missing = [k for k in ("latent_mean", "latent_std", "vqgan_checkpoint", "clip_store") if k not in store.header]
    if store.kind != "latents" or missing:
        raise FmrisynthError("not a latent store (write one with `fmrisynth train-vae`)", path)
    return store


def block_contexts(store: ClipStore, train) -> dict[str, list] | None:
    """Per condition, the events of each training clip (rows of ``train``, in "blocks" order) whose
    response shows in it: its block and the tails of the blocks before it ([condition, onset_s,
    duration_s], onsets from the clip's first frame). A generated clip at a training timing takes
    the response of its whole context, as the real clip it imitates has; None without a response model.
    """
    from fmrisynth.data.run_events import read_run_events
    from fmrisynth.models.response import ResponseModel, context_events

    if store.header.get("response") != "hrf":
        return None
    response = ResponseModel.load(store.path / "response.npz")
    clips = ClipStore(resolve_recorded(store.header["clip_store"], store.path / "store.json"))
    events, known = read_run_events(clips)[0], response.conditions + response.nuisance
    return {c: [[[e.condition, e.onset_s, e.duration_s] for e in context_events(row, events, known, store.item_shape[0])]
                for _, row in rows.iterrows()] for c, rows in train.groupby("condition")}  # fmt: skip


def clean_batches(objective: DiffusionObjective, dataset, positions: np.ndarray,
                  size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """(clips as the model learns them (b, T, c, d, h, w), labels (b,), designs (b, T)) of the dataset
    items ``positions``, about ``size`` at a time, on the objective's device."""
    device = objective.mean.device
    for chunk in np.array_split(positions, max(1, len(positions) // size)):
        batch = {k: v.to(device) for k, v in default_collate([dataset[int(k)] for k in chunk]).items()}
        yield objective.clean(batch), batch["label"], objective.designs[batch["index"]]


def element_variance(objective: DiffusionObjective, dataset) -> torch.Tensor:
    """Variance of each latent element (T, c, d, h, w) over the dataset's clips, in the units the model
    sees (``DiffusionObjective.clean``: normalised per channel, whitened by the prior when there is one)."""
    total, squares = 0.0, 0.0
    for z, _, _ in clean_batches(objective, dataset, np.arange(len(dataset)), 64):
        total, squares = total + z.double().sum(0), squares + z.double().pow(2).sum(0)
    n = max(len(dataset), 1)
    return (squares / n - (total / n) ** 2).clamp(min=0)


def train_diffusion(cfg: Config, latents: Path, out: Path, resume: bool = False, progress: bool = True) -> Path:
    """Train the denoiser of ``cfg.model`` on the train split of a latent store; return the last checkpoint."""
    from fmrisynth.data.dataset import ClipDataset

    validate_train(cfg.train, "train")
    store, out = _latent_store(Path(latents)), Path(out)
    if not resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step_*")):
        raise FmrisynthError("output directory already has checkpoints; pass --resume or choose another --out", out)
    m = store.manifest
    frames = store.item_shape[0]
    designs = design_boxcar(*(torch.tensor(m[k].to_numpy(float)) for k in ("onset_s", "duration_s", "tr")), frames)
    dataset = ClipDataset(store, split="train")
    torch.manual_seed(cfg.seed)
    model = build_denoiser(cfg.model, store.item_shape, len(store.conditions))
    diffusion = Diffusion(cfg.diffusion, len(store.conditions))
    prior, subjects = load_prior(store, cfg.stage2)
    objective = DiffusionObjective(model, diffusion, store.header["latent_mean"], store.header["latent_std"], designs,
                                   prior, subjects)  # fmt: skip
    objective.references = references = diffusion.reference_losses(element_variance(objective, dataset))
    train = m.iloc[dataset.rows]
    info = {  # stage2.json (fmrisynth.run_info)
        "latents": store.path,
        "latent_shape": list(store.item_shape),
        "conditions": store.conditions,
        "response": store.header.get("response", "none"),
        "prior": cfg.stage2.prior,
        **{k: store.header[k] for k in ("latent_mean", "latent_std")},
        **{k: resolve_recorded(store.header[k], store.path / "store.json") for k in ("vqgan_checkpoint", "clip_store")},
        "blocks": {c: rows[["onset_s", "duration_s", "tr"]].to_numpy(float).tolist() for c, rows in train.groupby("condition")},
        "contexts": block_contexts(store, train),
        **references,
    }
    main_only(write_run_info, out, info)  # under torchrun: rank 0 only
    last = fit(objective, dataset, cfg.train, out, cfg.seed, resume=resume, config=cfg, desc="train", progress=progress)

    def measure() -> None:  # after training, on rank 0: the x0 error the analytic sampler's variance needs
        ema = build_denoiser(cfg.model, store.item_shape, len(store.conditions))
        ema.load_state_dict(load_checkpoint(last).module_state("model", ema=True))
        picked = np.random.default_rng(cfg.seed).permutation(len(dataset))[:MEASURE_CLIPS]
        batches = list(clean_batches(objective, dataset, picked, cfg.train.batch_size))
        info["x0_error"] = diffusion.measure_x0_error(ema.to(objective.mean.device).eval(), batches, seed=cfg.seed)
        write_run_info(out, info)

    main_only(measure)
    return last

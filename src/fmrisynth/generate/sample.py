"""Generation: load a trained stage-2 run and turn noise into clips or whole runs on the model grid.

A clip or run is made in three parts, each from its own model (README, "How a clip is made"):

    residual latents  the space-time denoiser, conditioned on label and design, in the whitened
                      units of the Gaussian prior, coloured by one drawn subject's prior    (B, T, c, d, h, w)
      -> decode       the VQ-GAN, frame by frame                                           (B, T, D, H, W)
      + codec residual what the VQ-GAN drops: a Gaussian model of it, same subject          (B, T, V)
      + response      the task response of the design, through a drawn subject's maps       (B, T, V)

``kind="gaussian"`` replaces the first three by a draw of the Gaussian background model fitted on
the voxels (models/background.py): the training-free generator every deep model is measured against.
With ``stage2.response: none`` the denoiser makes whole clips and there is no response to add.

Randomness: clip k of condition c with seed s is made from ``clip_seed(s, c, k)`` alone (noise,
subject, timing, codec residual, response), so it is the same whatever ``n`` or the batch size,
and conditions sampled with one seed do not share their background.

Two ways to sample, both written as one BIDS derivative dataset (generate/bids.py):

* ``sample``: ``n`` clips of one condition (a block at a training timing, or ``onset_s``/``duration_s``),
  one run per clip, for ``fmrisynth evaluate``.
* ``sample_runs``: whole runs of any design (an events.tsv, data/design.py), one per generated
  subject. The denoiser learned the task-free residual, so a run's background is generated with
  the null condition (the classifier-free-guidance class, an all-zero design) over all T frames in
  one pass (temporal convolutions and rotary attention take any T: no windows, hence no seams; the
  prior's time covariances take their stationary form), and the task is the response model's
  prediction for the full design through the subject's own drawn maps. ``response: none`` models
  have no task-free background and no response model: whole runs are refused with one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmrisynth.checkpoint import latest_checkpoint, load_checkpoint
from fmrisynth.config import Config
from fmrisynth.data.design import Event, default_task, read_design
from fmrisynth.data.store import ClipStore
from fmrisynth.distributed import autocast, default_device
from fmrisynth.errors import FmrisynthError
from fmrisynth.generate import bids, codec
from fmrisynth.models.background import GaussianBackground
from fmrisynth.models.diffusion import Diffusion, design_boxcar
from fmrisynth.models.presets import build_denoiser
from fmrisynth.models.vqgan import VQGAN
from fmrisynth.run_info import RUN_INFO, read_run_info


@dataclass
class Denoiser:
    """A trained stage-2 model (EMA weights, eval mode) with what it needs to generate latents."""

    model: torch.nn.Module
    diffusion: Diffusion
    config: Config
    info: dict  # stage2.json of the run
    checkpoint: Path
    prior: GaussianBackground | None  # the latent prior the model diffuses in (None: white)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, designs: torch.Tensor, steps: int, sampler: str, guidance: float,
                 generators: list[torch.Generator], subjects: list[str], zeta: np.ndarray) -> torch.Tensor:  # fmt: skip
        """Raw latent clips (B, T, c, d, h, w) for labels (B,), designs (B, T), prior subjects and gains zeta (B,).

        T is the designs' length: ours runs on any number of frames, the MONAI U-Net on its own.
        """
        _, c, *spatial = self.info["latent_shape"]
        device = next(self.model.parameters()).device
        with autocast(device, self.config.train.amp):
            z = self.diffusion.sample(self.model, labels.to(device), designs.to(device), (designs.shape[1], c, *spatial),
                                      steps, sampler, guidance, generators)  # fmt: skip  # (B, T, c, d, h, w)
        z = z.float().cpu()
        if self.prior is not None:
            z = self.prior.color(z.flatten(2), self.prior.index(subjects), zeta=torch.as_tensor(zeta)).reshape(z.shape)
        mean, std = (torch.tensor(self.info[k]).reshape(c, 1, 1, 1) for k in ("latent_mean", "latent_std"))
        return z * std + mean


def find_run(path: str | Path) -> Path:
    """A stage-2 run directory, one of its checkpoints, or a demo's output folder (its ``diffusion/``)."""
    path = Path(path)
    if not (path / RUN_INFO).is_file() and (path / "diffusion" / RUN_INFO).is_file():
        return path / "diffusion"
    return path


def load_denoiser(checkpoint: str | Path, device: str | torch.device | None = None,
                  prior: GaussianBackground | None = None) -> Denoiser:  # fmt: skip
    """The stage-2 model of a run directory (newest checkpoint), one checkpoint, or a demo folder."""
    path = latest_checkpoint(find_run(checkpoint))
    info = read_run_info(path, checkpoint)
    ckpt = load_checkpoint(path)
    shape, conditions = info["latent_shape"], info["conditions"]
    model = build_denoiser(ckpt.config.model, shape, len(conditions))
    try:
        model.load_state_dict(ckpt.module_state("model", ema=True))
    except RuntimeError as e:
        raise FmrisynthError(f"weights do not match the model in its config ({str(e).splitlines()[0]})", path) from None
    device = device or default_device()
    diffusion = Diffusion(ckpt.config.diffusion, len(conditions), info.get("x0_error"))  # measured after training
    return Denoiser(model.to(device).eval(), diffusion, ckpt.config, info, path,
                    prior if info.get("prior", "none") == "gaussian" else None)  # fmt: skip


KINDS = ("ours", "gaussian")  # the deep generator, or the Gaussian background model in voxels (no network)


@dataclass
class Generator:
    """Everything a stage-2 run generates with: denoiser, VQ-GAN, the response and background models.

    ``denoiser`` and ``vqgan`` are None for the Gaussian generator (``kind="gaussian"``).
    """

    denoiser: Denoiser | None
    vqgan: VQGAN | None
    extras: codec.Extras
    codec_residual: bool  # add the codec residual model's draw to decoded clips (stage2.codec_noise)
    info: dict  # stage2.json of the run
    config: Config
    source: Path  # the checkpoint (ours) or latent store (gaussian) the clips come from
    mask: np.ndarray  # (D, H, W) bool
    affine: np.ndarray  # (4, 4)

    @property
    def kind(self) -> str:
        return "ours" if self.denoiser is not None else "gaussian"

    @property
    def conditions(self) -> list[str]:
        return self.info["conditions"]

    @property
    def frames(self) -> int:
        return self.info["latent_shape"][0]

    @property
    def null_label(self) -> int:
        """The classifier-free-guidance class: "no condition" (trained with an all-zero design)."""
        return len(self.conditions)

    def blocks(self, condition: str) -> np.ndarray:
        """The training blocks (n, 3) of ``condition``: onset_s, duration_s, tr of each training clip."""
        if condition not in self.conditions:
            raise FmrisynthError(f"unknown condition {condition!r}; this model knows {', '.join(self.conditions)}")
        blocks = np.asarray(self.info["blocks"].get(condition, []), dtype=float).reshape(-1, 3)
        if len(blocks) == 0:
            raise FmrisynthError(f"condition {condition!r} has no training clips to take its timing from")
        return blocks

    def contexts(self, condition: str) -> list[list[Event]] | None:
        """Per training block of ``condition`` (``blocks`` order), the events whose response shows in its
        clip (its own block and the tails before it); None for runs trained before they were recorded."""
        rows = (self.info.get("contexts") or {}).get(condition)
        return None if rows is None else [[Event(c, float(o), float(d)) for c, o, d in row] for row in rows]

    def check_runs(self, frames: int) -> None:
        """Refuse, in one line, whole runs this model cannot make (see the module docstring)."""
        if self.extras.response is None:
            raise FmrisynthError("this model was trained with stage2.response: none (whole clips, no response model); "
                                 "whole runs need stage2.response: hrf, or sample clips with --condition",
                                 self.source)  # fmt: skip
        if self.kind == "ours" and self.config.model.backbone != "ours" and frames != self.frames:
            raise FmrisynthError(f"the {self.config.model.backbone} backbone makes only its training "
                                 f"length ({self.frames} frames); use the ours backbone for runs",
                                 self.source)  # fmt: skip

    def run(self, events: list[Event], tr: float, frames: int, seed: int, steps: int, sampler: str) -> np.ndarray:
        """One whole run (T, V) of a new subject: null-condition background in one pass + the design's response."""
        self.check_runs(frames)
        return self.clips(np.array([self.null_label]), np.zeros((1, frames), np.float32), [events], np.array([tr]),
                          [seed], steps, sampler, 1.0)[0]  # fmt: skip

    def clips(self, labels: np.ndarray, designs: np.ndarray, events: list[list[Event]], tr: np.ndarray,
              seeds: list[int], steps: int, sampler: str, guidance: float) -> np.ndarray:  # fmt: skip
        """Clips (B, T, V) of in-mask voxels, for labels (B,), boxcars (B, T), events, TR and a seed per clip.

        Clip b is made from ``seeds[b]`` alone: its diffusion noise (torch), its subject and gain
        (one for every background model), codec residual and response (numpy), whatever else is in
        the batch.
        """
        rngs = [np.random.default_rng(s) for s in seeds]
        style = self.extras.background if self.denoiser is None else self.extras.prior  # whose subjects to draw
        subjects = [style.subjects[int(style.draw_subjects(1, r)[0])] for r in rngs]
        zeta = np.array([r.standard_normal() for r in rngs])  # (B,) each clip's gain, shared by its models
        frames = designs.shape[1]
        if self.denoiser is None:
            index = self.extras.background.index(subjects)
            background = np.concatenate([self.extras.background.sample(frames, index[b : b + 1], r, zeta[b : b + 1])
                                         for b, r in enumerate(rngs)])  # fmt: skip  # (B, T, V)
            return self._add_response(background, events, tr, rngs)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        z = self.denoiser.generate(torch.as_tensor(labels), torch.as_tensor(designs, dtype=torch.float32), steps,
                                   sampler, guidance, generators, subjects, zeta)  # fmt: skip  # (B, T, c, d, h, w)
        return self.finish(z, events, tr, rngs, subjects, zeta)

    def finish(self, z: torch.Tensor, events: list[list[Event]], tr: np.ndarray, rngs: list[np.random.Generator],
               subjects: list[str], zeta: np.ndarray) -> np.ndarray:  # fmt: skip
        """Residual latents (B, T, c, d, h, w) -> clips (B, T, V): decode, + codec residual, + the events' response.

        Given the stored latents of real clips instead of generated ones, this is a perfect latent
        generator: what the rest of the chain allows (benchmarks/stage2_oracle.py).
        """
        try:
            clips = codec.decode(self.vqgan, z)[:, :, torch.from_numpy(self.mask)].numpy()  # (B, T, V)
        except RuntimeError as e:
            raise FmrisynthError(f"the VQ-GAN cannot decode these latents ({str(e).splitlines()[0]})",
                                 self.info["vqgan_checkpoint"]) from None  # fmt: skip
        if self.codec_residual:
            index = self.extras.codec.index(subjects)
            clips += np.concatenate([self.extras.codec.sample(z.shape[1], index[b : b + 1], r, zeta[b : b + 1])
                                     for b, r in enumerate(rngs)])  # fmt: skip
        return self._add_response(clips, events, tr, rngs)

    def _add_response(self, clips: np.ndarray, events: list[list[Event]], tr: np.ndarray,
                      rngs: list[np.random.Generator]) -> np.ndarray:  # fmt: skip
        """clips (B, T, V) + each clip's response through a freshly drawn subject (and, with
        ``stage2.trial_gains``, a gain per event); checked finite."""
        response = self.extras.response
        for b, rng in enumerate(rngs):
            if response is not None:
                subject = response.maps(response.draw_subjects(1, rng)[0])  # (C, K, V)
                mine = response.draw_gains(events[b], rng) if self.config.stage2.trial_gains else events[b]
                clips[b] += response.predict(mine, float(tr[b]), clips.shape[1], subject)
        if not np.isfinite(clips).all():
            raise FmrisynthError("the model produced non-finite values; the checkpoint is damaged or diverged",
                                 self.source)  # fmt: skip
        return clips


def load_generator(checkpoint: str | Path, device: str | torch.device | None = None, kind: str = "ours") -> Generator:
    """The generator of a stage-2 run directory or checkpoint: ``kind`` "ours" or "gaussian" (see KINDS)."""
    if kind not in KINDS:
        raise FmrisynthError(f"unknown generator {kind!r}; choose {' or '.join(KINDS)}")
    path = latest_checkpoint(find_run(checkpoint))
    info = read_run_info(path, checkpoint)
    latents, clip_store = ClipStore(info["latents"]), ClipStore(info["clip_store"])
    extras = codec.latent_extras(latents)
    if kind == "gaussian":
        config = load_checkpoint(path).config
        return Generator(None, None, extras, False, info, config, latents.path, clip_store.mask, clip_store.affine)
    den = load_denoiser(path, device, extras.prior)
    vqgan = codec.load_vqgan(Path(den.info["vqgan_checkpoint"]), clip_store.mask)
    return Generator(den, vqgan, extras, den.config.stage2.codec_noise, den.info, den.config, den.checkpoint,
                     clip_store.mask, clip_store.affine)  # fmt: skip


def clip_seed(seed: int, *keys: int) -> int:
    """The seed of generated clip or subject ``keys`` (e.g. condition, index): independent of what is made beside it."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def _settings(gen: Generator, guidance: float | None, steps: int | None, sampler: str | None) -> tuple[float, int, str]:
    dcfg = gen.config.diffusion
    return (dcfg.guidance if guidance is None else guidance), steps or dcfg.sample_steps, sampler or dcfg.sampler


def sample(
    checkpoint: str | Path | Generator,
    condition: str | None,
    n: int,
    out: str | Path,
    guidance: float | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    seed: int = 0,
    onset_s: float | None = None,
    duration_s: float | None = None,
    batch_size: int = 8,
    kind: str = "ours",
) -> list[Path]:
    """Generate ``n`` clips of ``condition`` into the BIDS dataset ``out``; return the bold paths.

    The block's timing is ``onset_s``/``duration_s`` when given, otherwise a training block of the
    condition drawn from the clip's seed, with the response of its whole context (the tails of the
    blocks before it, as in the real clip). ``guidance``, ``steps`` and ``sampler`` default to the
    run's diffusion config; ``kind`` picks the deep or the Gaussian generator (``checkpoint`` may
    also be a loaded ``Generator``). Clip k comes from ``clip_seed(seed, condition index, k)`` alone;
    the files appear only once all are written.
    """
    if condition is None:
        raise FmrisynthError("give --condition (clips of one condition) or --events (whole runs of a design)")
    if n < 1:
        raise FmrisynthError(f"--n must be at least 1, got {n}")
    gen = checkpoint if isinstance(checkpoint, Generator) else load_generator(checkpoint, kind=kind)
    guidance, steps, sampler = _settings(gen, guidance, steps, sampler)
    blocks = gen.blocks(condition)  # (rows, onset/dur/tr)
    label = gen.conditions.index(condition)
    seeds = [clip_seed(seed, label, k) for k in range(n)]
    picked = [int(np.random.default_rng([s, 0]).integers(len(blocks))) for s in seeds]  # a training block per clip
    timing = blocks[picked]  # (n, 3)
    if onset_s is not None:
        timing[:, 0] = onset_s
    if duration_s is not None:
        timing[:, 1] = duration_s
    frames = gen.frames
    if (timing[:, 0] < 0).any() or (timing[:, 1] <= 0).any() or (timing[:, 0] >= frames * timing[:, 2]).any():
        raise FmrisynthError(f"the block must start inside the clip ({frames} frames) and last > 0 s")
    designs = design_boxcar(*torch.tensor(timing.T, dtype=torch.float32), frames).numpy()  # (n, T)
    contexts = gen.contexts(condition) if onset_s is None and duration_s is None else None
    events = ([contexts[k] for k in picked] if contexts else
              [[Event(condition, float(o), float(d))] for o, d, _ in timing])  # fmt: skip  # the response's events
    task, subjects = bids.condition_task(condition), bids.subject_labels(n)
    written = []
    with bids.DatasetWriter(out, [(s, task) for s in subjects], gen.affine, gen.mask, gen.source) as writer:
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            clips = gen.clips(np.full(len(seeds[part]), label), designs[part], events[part], timing[part, 2], seeds[part],
                              steps, sampler, guidance)  # fmt: skip  # (b, T, V)
            for i, clip in enumerate(clips, start):
                onset, duration, tr = map(float, timing[i])
                sidecar = {"mode": "clip", "generator": gen.kind, "condition": condition, "onset_s": onset,
                           "duration_s": duration, "tr": tr, "seed": seed, "index": i, "clip_seed": seeds[i],
                           "guidance": guidance, "sampler": sampler, "steps": steps}  # fmt: skip
                written.append(writer.add(subjects[i], task, clip, tr, [Event(condition, onset, duration)], sidecar))
    return written


def sample_runs(
    checkpoint: str | Path,
    events_file: str | Path,
    tr: float | None,
    frames: int | None,
    out: str | Path,
    subjects: int = 1,
    task: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    sampler: str | None = None,
    progress: bool = False,
    clip_flags: list[str] = (),
    kind: str = "ours",
) -> list[Path]:
    """Whole runs of the design ``events_file``, one per generated subject, into the BIDS dataset ``out``.

    Subject k is made from ``clip_seed(seed, k)`` alone: its response maps, background and codec
    residual are its own, and the same whatever ``subjects`` is. ``task`` defaults to the events
    file's name; ``clip_flags`` are clip-mode options the user also gave (refused). Returns the bold paths.
    """
    from tqdm import tqdm

    if clip_flags:
        raise FmrisynthError(f"--events makes whole runs; --{clip_flags[0]} belongs to clip mode (--condition)")
    if tr is None or frames is None:
        raise FmrisynthError("--events needs --tr (s) and --frames")
    if not (math.isfinite(tr) and tr > 0) or frames < 1 or subjects < 1:
        raise FmrisynthError(f"--tr must be > 0 s and --frames, --subjects >= 1 (got {tr}, {frames}, {subjects})")
    task = bids.task_label(task or default_task(events_file, "synth"))
    gen = load_generator(checkpoint, kind=kind)
    gen.check_runs(frames)
    design = read_design(events_file, gen.conditions, tr, frames, task)
    _, steps, sampler = _settings(gen, None, steps, sampler)
    names = bids.subject_labels(subjects)
    settings = {"kind": gen.kind, "steps": steps, "sampler": sampler, "guidance": 1.0, "frames": frames,
                "background": "null condition" if gen.kind == "ours" else "gaussian", "response": "hrf",
                "codec_residual": gen.codec_residual, "events_file": str(Path(events_file).resolve())}  # fmt: skip
    written = []
    with bids.DatasetWriter(out, [(s, task) for s in names], gen.affine, gen.mask, gen.source) as writer:
        for k, name in enumerate(tqdm(names, desc="sample", unit="run", disable=not progress)):
            run = gen.run(design, tr, frames, clip_seed(seed, k), steps, sampler)  # (T, V)
            sidecar = {"mode": "events", "seed": seed, "subject_index": k, "subject_seed": clip_seed(seed, k),
                       "generator": settings}  # fmt: skip
            written.append(writer.add(name, task, run, tr, design, sidecar))
    return written

"""The one training loop of fmrisynth, for both stages: CPU, one GPU, or torchrun + DDP.

A stage describes *what* it trains as an ``Objective`` (networks as submodules, a loss per optimiser
"part"); ``fit`` owns *how*: device, DDP, autocast, AdamW per part with linear warm-up, gradient
accumulation and clipping, an EMA copy with decay warm-up, ``train_log.jsonl``
(``run_log``), checkpoints (``fmrisynth.checkpoint``) and exact resume.

Randomness contract (what makes resume and torchrun exact):

- Data order is a pure function of (seed, epoch). Step s reads one *global* batch of
  ``batch_size x ranks`` items per micro-batch; rank r takes its r-th slice (``_batches``). The
  DataLoader gets its own generator, so building its iterator (at resume, at each epoch) draws
  nothing from torch's global RNG.
- ``objective.generator`` is one ``torch.Generator`` per run on the training device, seeded with the
  run's seed, identical on every rank and saved in state.pt. Objectives draw their noise through
  ``objective.randn / rand / randint(shape of the LOCAL batch)``: each call draws the noise of the
  whole global batch (first dim x ranks) from that generator and returns this rank's slice, so N
  processes x batch B see exactly the noise of 1 process x batch N·B, and a resumed run the noise of
  an uninterrupted one. Draws must be made in the same order on every rank (one call per micro-batch).
- torch's global RNG is seeded with seed + rank (rank 0 = a single process) and restored per rank on
  resume; it serves dropout and model-internal draws (the VQ-GAN's code restarts, made on rank 0 and
  broadcast), not the objective's noise.

Under torchrun only rank 0 writes run files (config.yaml, train_log.jsonl, checkpoints) and shows
progress; ``is_main()``, ``barrier()`` and ``main_only(fn)`` give callers the same rule (the latent
store is encoded by rank 0 while the others wait). The logged loss and logs are means over ranks, so
an objective's logs must have the same keys on every rank. ``default_device()`` and
``autocast(device, amp)`` are the one place for the device and AMP choice (all from
``fmrisynth.distributed``). ``config.validate_train`` refuses impossible settings (``fit`` calls it
before writing anything; a stage calls it before its own preparations).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import fields
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fmrisynth.config import Config, TrainConfig, save_config, to_dict, validate_train
from fmrisynth.errors import FmrisynthError
from fmrisynth.checkpoint import Checkpoint, clean_stale, latest_checkpoint, load_checkpoint, load_state
from fmrisynth.checkpoint import resume_point, save_checkpoint
from fmrisynth.distributed import autocast, barrier, init_distributed, main_only, mean_over_ranks, rank_and_world
from fmrisynth.training.run_log import TrainLog, truncate_log


# --- objective ------------------------------------------------------------------------------------


class Objective(nn.Module):
    """What a stage trains. Subclasses hold their networks as submodules and define the loss.

    Attributes:
        parts: one AdamW optimiser per part, stepped in this order every step (a GAN has two).
        ema_target: attribute name of the submodule to keep an EMA copy of; None for no EMA.
        config_sections: the Config sections that define the networks (e.g. ("vae",)); ``--resume``
            refuses a config that differs from the checkpoint's in them.
        generator: the run's noise generator (set by ``fit``; see the module docstring).
    """

    parts: tuple[str, ...] = ("model",)
    ema_target: str | None = "model"
    config_sections: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def parameters_of(self, part: str) -> Iterable[nn.Parameter]:
        return getattr(self, part).parameters()

    def forward(self, batch: dict, step: int, part: str) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (loss to minimise for ``part``, scalar logs)."""
        raise NotImplementedError

    def _draw(self, fn, shape: tuple[int, ...], **kw) -> torch.Tensor:
        """This rank's slice of ``fn`` drawn for the whole global batch (first dim x ranks)."""
        rank, world = rank_and_world()
        g = self.generator
        full = fn((shape[0] * world, *shape[1:]), generator=g, device=g.device, **kw)  # (B·ranks, ...)
        return full[rank * shape[0] : (rank + 1) * shape[0]]  # (B, ...)

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal noise of the local-batch ``shape`` (B, ...), on the generator's device."""
        return self._draw(torch.randn, shape)

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform [0, 1) draws of the local-batch ``shape`` (B, ...)."""
        return self._draw(torch.rand, shape)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        """Integers in [0, high) of the local-batch ``shape`` (B, ...), e.g. diffusion timesteps."""
        return self._draw(lambda s, **kw: torch.randint(high, s, **kw), shape)


# --- config checks --------------------------------------------------------------------------------


def _section_of(cfg: TrainConfig, config: Config | None) -> str:
    """The name of ``cfg`` in ``config`` ("train" or "vae_train"), for error messages."""
    return next((f.name for f in fields(Config) if config is not None and getattr(config, f.name) is cfg), "train")


def _check_compatible(ckpt: Checkpoint, objective: Objective, config: Config | None, seed: int, batch: dict) -> None:
    """Refuse to resume what would not continue the same run: other networks, batch or seed."""
    saved = ckpt.meta.get("batch")
    if saved is not None and saved["batch_size"] * saved["grad_accum"] * saved["ranks"] != (
        batch["batch_size"] * batch["grad_accum"] * batch["ranks"]
    ):
        raise FmrisynthError(
            "--resume with batch_size {batch_size} x grad_accum {grad_accum} x {ranks} ranks, but the checkpoint "
            "was trained with {b[batch_size]} x {b[grad_accum]} x {b[ranks]}; keep the batch size or use a new --out"
            .format(**batch, b=saved), ckpt.path)  # fmt: skip
    if ckpt.meta.get("seed", seed) != seed:
        raise FmrisynthError(f"--resume with seed {seed}, but the checkpoint was trained with seed {ckpt.meta['seed']}",
                             ckpt.path)  # fmt: skip
    if config is not None:
        new, old = to_dict(config), to_dict(ckpt.config)
        for section in objective.config_sections:
            diff = [k for k in new[section] if new[section][k] != old[section].get(k)]
            if diff:
                k = diff[0]
                raise FmrisynthError(f"--resume with {section}.{k}={new[section][k]}, but the checkpoint was trained "
                                     f"with {section}.{k}={old[section].get(k)}; use a new --out", ckpt.path)  # fmt: skip
    mine = {k: tuple(v.shape) for k, v in objective.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt.weights.items()}
    if mine != theirs:
        k = next(k for k in sorted(mine.keys() | theirs.keys()) if mine.get(k) != theirs.get(k))
        raise FmrisynthError(f"checkpoint does not match this model ({k}: {theirs.get(k)} in the checkpoint, "
                             f"{mine.get(k)} here); was the preset changed?", ckpt.path)  # fmt: skip


def _prepare_run(out: Path, resume: bool, objective: Objective, config: Config | None, seed: int, batch: dict,
                 loaded: list) -> Path | None:  # fmt: skip
    """Rank 0: check, clean and create the run directory; pick the checkpoint to resume (into ``loaded``)."""
    if out.exists() and not out.is_dir():
        raise FmrisynthError("--out is a file; expected a run directory", out)
    if (out / "checkpoints").is_dir():
        clean_stale(out)
    point = None
    if any((out / "checkpoints").glob("step_*")):
        if not resume:
            raise FmrisynthError("output directory already has checkpoints; pass --resume or choose another --out", out)
        point = resume_point(out)
        _check_compatible(point[0], objective, config, seed, batch)
        loaded.append(point)
    truncate_log(out, 0 if point is None else point[0].step)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if config is not None:
            save_config(config, out / "config.yaml")
    except OSError as e:
        raise FmrisynthError(f"cannot create the run directory ({e.strerror or e})", out) from None
    return None if point is None else point[0].path


# --- data -----------------------------------------------------------------------------------------


def _batches(n: int, batch: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation cut into global batches of
    ``batch x world`` items (drop-last), of which rank r takes the r-th slice."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_step = batch * world
    steps = n // per_step
    if steps == 0:  # tiny datasets: sample with replacement rather than never stepping
        order = np.random.default_rng([seed, epoch]).choice(n, per_step)
        steps = 1
    return [order[s * per_step + rank * batch : s * per_step + (rank + 1) * batch].tolist() for s in range(steps)]


def _epochs(dataset, cfg: TrainConfig, seed: int, rank: int, world: int, start_step: int) -> Iterator[dict]:
    """Endless micro-batches in (seed, epoch) order, skipping those consumed before ``start_step``."""
    per_epoch = len(_batches(len(dataset), cfg.batch_size, seed, 0, rank, world))
    epoch, skip = divmod(start_step * cfg.grad_accum, per_epoch)
    while True:
        sampler = _batches(len(dataset), cfg.batch_size, seed, epoch, rank, world)[skip:]
        # its own generator: the iterator's base seed must not come from (and shift) the global RNG
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, generator=g)
        yield from loader
        epoch, skip = epoch + 1, 0


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _rng_state(device: torch.device) -> dict:
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


# --- the loop -------------------------------------------------------------------------------------


def fit(
    objective: Objective,
    dataset: torch.utils.data.Dataset,
    train_cfg: TrainConfig,
    out: str | Path,
    seed: int,
    resume: bool = False,
    config: Config | None = None,
    desc: str = "train",
    progress: bool = True,
) -> Path:
    """Train ``objective`` on ``dataset`` for ``train_cfg.steps`` steps; return the last checkpoint dir.

    ``resume`` continues from the newest intact checkpoint in ``out`` (model, EMA, optimisers, step,
    noise generator, RNG, data position), bit for bit on CPU. ``train_cfg.max_minutes`` stops early,
    cleanly, with a checkpoint.
    """
    cfg, out = train_cfg, Path(out)
    validate_train(cfg, _section_of(cfg, config))
    if len(dataset) == 0:
        raise FmrisynthError("the training set is empty (no clips in the train split)", out)
    device = init_distributed()
    rank, world = rank_and_world()
    _seed_run(objective, seed, rank, device)
    opts, ema = _optimisers_and_ema(objective, cfg)

    batch = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "ranks": world}
    loaded: list = []  # rank 0 keeps what it loaded while choosing; the others load the path it chose
    path = main_only(_prepare_run, out, resume, objective, config, seed, batch, loaded)
    step = 0 if path is None else _restore(path, loaded, objective, ema, opts, rank, device)

    model = _ddp(objective, device) if world > 1 else objective
    log = TrainLog(out, rank, step, cfg.steps, desc, progress)
    batches = _epochs(dataset, cfg, seed, rank, world, step)
    t_start = time.perf_counter()
    objective.train()
    while step < cfg.steps:
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        micro = [_to(next(batches), device) for _ in range(cfg.grad_accum)]
        total, logs = _step(model, objective, opts, micro, step, lr, cfg, device, out)
        step += 1
        if ema is not None:
            _update_ema(ema, getattr(objective, objective.ema_target), min(cfg.ema_decay, (1 + step) / (10 + step)))
        log.stepped(cfg.batch_size * cfg.grad_accum * world)
        timed_out = _out_of_time(cfg, t_start, world, device)
        last = step == cfg.steps or timed_out
        if step % cfg.log_every == 0 or last:
            log.row(step, total, lr, logs, device)
        if step % cfg.ckpt_every == 0 or last:
            rngs = _rng_states(device, world)
            if rank == 0:
                state = {"step": step, "optimizers": {k: o.state_dict() for k, o in opts.items()},
                         "generator": objective.generator.get_state(), "rng": rngs}  # fmt: skip
                meta = {"ema_target": objective.ema_target, "seed": seed, "batch": batch}
                save_checkpoint(out, step, objective, ema, state, meta, config, cfg.keep_ckpts)
        if timed_out:
            break
    log.close()
    barrier()
    return latest_checkpoint(out)


def _seed_run(objective: Objective, seed: int, rank: int, device: torch.device) -> None:
    """Seed the global RNGs per rank (dropout, model-internal draws) and the objective's noise
    generator identically on every rank, on the training device (module docstring: randomness)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    objective.to(device)
    objective.generator = torch.Generator(device=device).manual_seed(seed)


def _optimisers_and_ema(objective: Objective, cfg: TrainConfig) -> tuple[dict[str, torch.optim.AdamW], nn.Module | None]:
    """One AdamW per part, and a frozen copy of ``objective.ema_target`` (None without EMA)."""
    opts = {p: torch.optim.AdamW(objective.parameters_of(p), lr=cfg.lr, weight_decay=cfg.weight_decay) for p in objective.parts}
    ema = None
    if objective.ema_target is not None and cfg.ema_decay > 0:
        ema = copy.deepcopy(getattr(objective, objective.ema_target)).requires_grad_(False).eval()
    return opts, ema


def _restore(path: Path, loaded: list, objective: Objective, ema: nn.Module | None, opts: dict, rank: int,
             device: torch.device) -> int:  # fmt: skip
    """Load the checkpoint at ``path`` into the run (weights, EMA, optimisers, noise generator, this
    rank's RNG) and return its step. Rank 0 reuses what ``_prepare_run`` loaded (``loaded``, emptied
    here); the other ranks read the path it chose."""
    ckpt, state = loaded[0] if loaded else (load_checkpoint(path), None)
    state = state if state is not None else load_state(ckpt)
    objective.load_state_dict(ckpt.weights)
    if ema is not None and ckpt.ema is not None:
        ema.load_state_dict(ckpt.ema)
    for k, o in opts.items():
        o.load_state_dict(state["optimizers"][k])
    if "generator" in state:
        objective.generator.set_state(state["generator"])
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per rank; older: one
    if rank < len(rngs):
        _set_rng_state(rngs[rank], device)
    del loaded[:]
    return state["step"]


def _ddp(objective: Objective, device: torch.device) -> nn.Module:
    """``objective`` wrapped for torchrun; a GAN's parts each leave the other's parameters unused."""
    return nn.parallel.DistributedDataParallel(
        objective, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=len(objective.parts) > 1,
    )


def _step(model: nn.Module, objective: Objective, opts: dict, micro: list[dict], step: int, lr: float,
          cfg: TrainConfig, device: torch.device, out: Path) -> tuple[float, dict[str, float]]:  # fmt: skip
    """One optimiser step of every part over the micro-batches ``micro``; return (the summed loss of
    the parts, this rank's logs averaged over micro-batches). ``model`` is ``objective`` or its DDP
    wrapper: gradients are accumulated locally and averaged over ranks once, on the last micro-batch."""
    world = rank_and_world()[1]
    logs: dict[str, float] = {}
    total = 0.0
    for part in objective.parts:
        opt = opts[part]
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        part_loss = torch.zeros((), device=device)
        for i, mb in enumerate(micro):
            # accumulate locally; gradients are averaged over ranks once, on the last micro-batch
            sync = world == 1 or i == len(micro) - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast(device, cfg.amp):
                    loss, part_logs = model(mb, step, part)
                (loss / cfg.grad_accum).backward()
            part_loss += loss.detach().float() / cfg.grad_accum
            for k, v in part_logs.items():
                logs[k] = logs.get(k, 0.0) + float(v) / cfg.grad_accum
        part_loss = mean_over_ranks(part_loss).item()  # every rank sees the same value, so all stop together
        if not math.isfinite(part_loss):
            raise FmrisynthError(f"loss of part {part!r} became {part_loss} at step {step}; lower the lr", out)
        total += part_loss
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(objective.parameters_of(part), cfg.grad_clip)
        opt.step()
    return total, logs


@torch.no_grad()
def _update_ema(ema: nn.Module, src: nn.Module, decay: float) -> None:
    """Move the EMA parameters towards ``src``'s by ``1 - decay``; copy its buffers (e.g. norm stats)."""
    for e, p in zip(ema.parameters(), src.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), src.buffers()):
        e.copy_(b)


def _out_of_time(cfg: TrainConfig, t_start: float, world: int, device: torch.device) -> bool:
    """Whether ``cfg.max_minutes`` has run out; under torchrun, on any rank (so all stop together)."""
    timed_out = cfg.max_minutes is not None and time.perf_counter() - t_start > 60 * cfg.max_minutes
    if cfg.max_minutes is not None and world > 1:
        timed_out = bool(mean_over_ranks(torch.tensor([float(timed_out)], device=device)).item() > 0)
    return timed_out


def _rng_states(device: torch.device, world: int) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective under torchrun: all ranks must call it)."""
    if world == 1:
        return [_rng_state(device)]
    rngs = [None] * world
    dist.all_gather_object(rngs, _rng_state(device))
    return rngs

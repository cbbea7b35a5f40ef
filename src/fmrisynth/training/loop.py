"""The one training loop of fmrisynth, for both stages: CPU, one GPU, or torchrun + DDP.

A stage describes *what* it trains as an ``Objective`` (networks as submodules, a loss per optimiser
"part"); ``fit`` owns *how*: device, DDP, AMP, AdamW per part with linear warm-up, gradient
accumulation and clipping, an EMA copy with decay warm-up, progress bar, ``train_log.jsonl``,
atomic checkpoints and exact resume.

Checkpoint layout (``<out>/checkpoints/step_NNNNNN/``, written to a temporary name then renamed)::

    weights.safetensors   objective.state_dict() (every part)
    ema.safetensors       EMA of the ``ema_target`` submodule (keys without prefix), if kept
    state.pt              step, optimisers, grad scaler, RNG states
    config.yaml           the resolved Config of the run

Data order is a pure function of (seed, epoch), so a resumed run sees the batches it would have
seen had it never stopped; on CPU the same seed gives the same training curve.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fmrisynth.config import Config, TrainConfig, load_config, save_config
from fmrisynth.errors import FmrisynthError


class Objective(nn.Module):
    """What a stage trains. Subclasses hold their networks as submodules and define the loss.

    Attributes:
        parts: one AdamW optimiser per part, stepped in this order every step (a GAN has two).
        ema_target: attribute name of the submodule to keep an EMA copy of; None for no EMA.
    """

    parts: tuple[str, ...] = ("model",)
    ema_target: str | None = "model"

    def parameters_of(self, part: str) -> Iterable[nn.Parameter]:
        return getattr(self, part).parameters()

    def forward(self, batch: dict, step: int, part: str) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (loss to minimise for ``part``, scalar logs)."""
        raise NotImplementedError


# --- distribution ---------------------------------------------------------------------------------


def _setup_device() -> tuple[torch.device, int, int]:
    """(device, rank, world size); initialises the process group under torchrun (RANK is set)."""
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank, world
    return torch.device("cpu"), rank, world


def _batches(n: int, batch: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation, sharded across ranks, drop-last."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_step = batch * world
    steps = n // per_step
    if steps == 0:  # tiny datasets: sample with replacement rather than never stepping
        order = np.random.default_rng([seed, epoch]).choice(n, per_step)
        steps = 1
    return [order[s * per_step + rank * batch : s * per_step + (rank + 1) * batch].tolist() for s in range(steps)]


def _agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (so all ranks stop at the same step)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# --- checkpoints ----------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A loaded checkpoint: weights of the whole objective, the EMA of its target, the run's config."""

    path: Path
    step: int
    config: Config
    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    ema_target: str | None

    def module_state(self, name: str, ema: bool = True) -> dict[str, torch.Tensor]:
        """State dict of submodule ``name``: its EMA copy when kept and asked for, else the raw weights."""
        if ema and self.ema is not None and self.ema_target == name:
            return dict(self.ema)
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in self.weights.items() if k.startswith(prefix)}
        if not state:
            raise FmrisynthError(f"checkpoint has no weights for {name!r}", self.path)
        return state


def latest_checkpoint(path: str | Path) -> Path:
    """The newest ``step_*`` directory of a run directory, or ``path`` itself if it is a checkpoint."""
    path = Path(path)
    if (path / "weights.safetensors").is_file():
        return path
    steps = sorted((path / "checkpoints").glob("step_*")) if path.is_dir() else []
    steps = [p for p in steps if (p / "weights.safetensors").is_file()]
    if not steps:
        raise FmrisynthError("no checkpoint found (expected checkpoints/step_*/weights.safetensors)", path)
    return steps[-1]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint directory, or the newest one of a run directory, with a clear error if broken."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = latest_checkpoint(path)
    try:
        weights = load_file(ckpt / "weights.safetensors")
        ema = load_file(ckpt / "ema.safetensors") if (ckpt / "ema.safetensors").is_file() else None
        meta = json.loads((ckpt / "meta.json").read_text())
        config = load_config(ckpt / "config.yaml")
    except (OSError, SafetensorError, ValueError, KeyError) as e:
        raise FmrisynthError(f"checkpoint is damaged or incomplete ({e})", ckpt) from None
    return Checkpoint(ckpt, int(meta["step"]), config, weights, ema, meta.get("ema_target"))


def _save(out: Path, step: int, objective: Objective, ema: nn.Module | None, opts: dict, scaler, config: Config | None, keep: int) -> Path:
    from safetensors.torch import save_file

    root = out / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in objective.state_dict().items()}, tmp / "weights.safetensors")
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {"step": step, "optimizers": {k: o.state_dict() for k, o in opts.items()}, "scaler": scaler.state_dict(), "rng": rng}
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "ema_target": objective.ema_target}))
    save_config(config if config is not None else Config(), tmp / "config.yaml")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- the loop -------------------------------------------------------------------------------------


def _autocast(cfg: TrainConfig, device: torch.device):
    use = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def _epochs(dataset, cfg: TrainConfig, seed: int, rank: int, world: int, start_step: int) -> Iterator[dict]:
    """Endless micro-batches in (seed, epoch) order, skipping those consumed before ``start_step``."""
    per_epoch = len(_batches(len(dataset), cfg.batch_size, seed, 0, rank, world))
    consumed = start_step * cfg.grad_accum
    epoch, skip = divmod(consumed, per_epoch)
    while True:
        sampler = _batches(len(dataset), cfg.batch_size, seed, epoch, rank, world)[skip:]
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=cfg.num_workers, persistent_workers=False
        )
        yield from loader
        epoch, skip = epoch + 1, 0


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

    ``resume`` continues from the newest checkpoint in ``out`` (model, EMA, optimisers, step, RNG,
    data position). ``train_cfg.max_minutes`` stops early, cleanly, with a checkpoint.
    """
    from safetensors.torch import load_file
    from tqdm import tqdm

    cfg = train_cfg
    out = Path(out)
    if len(dataset) == 0:
        raise FmrisynthError("the training set is empty (no clips in the train split)", out)
    device, rank, world = _setup_device()
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    objective.to(device)

    opts = {p: torch.optim.AdamW(objective.parameters_of(p), lr=cfg.lr, weight_decay=cfg.weight_decay) for p in objective.parts}
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling
    ema = None
    if objective.ema_target is not None and cfg.ema_decay > 0:
        import copy

        ema = copy.deepcopy(getattr(objective, objective.ema_target)).requires_grad_(False).eval()

    step = 0
    if resume and (out / "checkpoints").is_dir():
        ckpt = latest_checkpoint(out)
        objective.load_state_dict(load_file(ckpt / "weights.safetensors", device=str(device)))
        if ema is not None and (ckpt / "ema.safetensors").is_file():
            ema.load_state_dict(load_file(ckpt / "ema.safetensors", device=str(device)))
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        for k, o in opts.items():
            o.load_state_dict(state["optimizers"][k])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        step = state["step"]
    elif (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step_*")) and rank == 0:
        raise FmrisynthError("output directory already has checkpoints; pass --resume or choose another --out", out)

    model = objective
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=len(objective.parts) > 1,
        )
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if config is not None:
            save_config(config, out / "config.yaml")
    log = open(out / "train_log.jsonl", "a") if rank == 0 else None
    batches = _epochs(dataset, cfg, seed, rank, world, step)
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not progress or rank != 0, dynamic_ncols=True)
    t_start = time.perf_counter()
    t_log, clips_since = t_start, 0
    objective.train()
    while step < cfg.steps:
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        micro = [_to(next(batches), device) for _ in range(cfg.grad_accum)]
        logs: dict[str, float] = {}
        total = 0.0
        for part in objective.parts:
            opt = opts[part]
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            for mb in micro:
                with _autocast(cfg, device):
                    loss, part_logs = model(mb, step, part)
                if not torch.isfinite(loss):
                    raise FmrisynthError(f"loss of part {part!r} became {loss.item()} at step {step}; lower the lr", out)
                (loss / cfg.grad_accum).backward()
                for k, v in part_logs.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / cfg.grad_accum
                total += loss.item() / cfg.grad_accum
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(objective.parameters_of(part), cfg.grad_clip)
            opt.step()
        step += 1
        if ema is not None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                src = getattr(objective, objective.ema_target)
                for e, p in zip(ema.parameters(), src.parameters()):
                    e.lerp_(p, 1.0 - decay)
                for e, b in zip(ema.buffers(), src.buffers()):
                    e.copy_(b)
        clips_since += cfg.batch_size * cfg.grad_accum * world
        bar.update(1)
        timed_out = _agree(cfg.max_minutes is not None and time.perf_counter() - t_start > 60 * cfg.max_minutes, device)
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps or timed_out):
            now = time.perf_counter()
            row = {"step": step, "loss": total, "lr": lr, "clips_per_s": clips_since / max(now - t_log, 1e-9), **logs}
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{total:.4f}", clips_s=f"{row['clips_per_s']:.1f}")
            t_log, clips_since = now, 0
        if rank == 0 and (step % cfg.ckpt_every == 0 or step == cfg.steps or timed_out):
            _save(out, step, objective, ema, opts, scaler, config, cfg.keep_ckpts)
        if timed_out:
            break
    bar.close()
    if log is not None:
        log.close()
    if world > 1:
        dist.barrier()
    return latest_checkpoint(out)

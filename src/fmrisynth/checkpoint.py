"""Checkpoints of the training loop: the one writer and reader of ``<run>/checkpoints/step_NNNNNN/``.

Layout of one checkpoint::

    weights.safetensors   objective.state_dict() (every part)
    ema.safetensors       EMA of the objective's ``ema_target`` submodule (keys without prefix), if kept
    state.pt              step, optimisers, the run's noise generator, every rank's RNG states
    meta.json             step, ema_target, seed, batch (batch_size, grad_accum, ranks), and the
                          sha256 of each file above
    config.yaml           the resolved Config of the run

A checkpoint is written under ``.step_NNNNNN.tmp-<host>-<pid>`` (``fmrisynth.publish``) and renamed, so
readers never see a half-written one; a temporary folder whose process is dead is removed by the next
run (``.tmp_step_*`` of older versions too). The sha256 is there because a flipped bit inside a
tensor leaves the safetensors header valid: without it such a file loads silently and sampling
writes NaN clips. ``load_checkpoint`` refuses a changed file;
``resume_point`` skips a damaged checkpoint (with a warning) for the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fmrisynth.config import Config, load_config, save_config
from fmrisynth.errors import FmrisynthError
from fmrisynth.publish import alive, remove_stale, temp_path

WEIGHTS, EMA, STATE, META = "weights.safetensors", "ema.safetensors", "state.pt", "meta.json"


@dataclass
class Checkpoint:
    """A loaded checkpoint: weights of the whole objective, the EMA of its target, the run's config."""

    path: Path
    step: int
    config: Config
    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    ema_target: str | None
    meta: dict = field(default_factory=dict)

    def module_state(self, name: str, ema: bool = True) -> dict[str, torch.Tensor]:
        """State dict of submodule ``name``: its EMA copy when kept and asked for, else the raw weights."""
        if ema and self.ema is not None and self.ema_target == name:
            return dict(self.ema)
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in self.weights.items() if k.startswith(prefix)}
        if not state:
            raise FmrisynthError(f"checkpoint has no weights for {name!r}", self.path)
        return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _steps(run: Path) -> list[Path]:
    """A run's checkpoint directories, oldest first (temporary ones excluded)."""
    return sorted((run / "checkpoints").glob("step_*")) if run.is_dir() else []


def latest_checkpoint(path: str | Path) -> Path:
    """The newest ``step_*`` directory of a run directory, or ``path`` itself if it is a checkpoint."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    steps = [p for p in _steps(path) if (p / WEIGHTS).is_file()]
    if not steps:
        raise FmrisynthError("no checkpoint found (expected checkpoints/step_*/weights.safetensors)", path)
    return steps[-1]


def _load(ckpt: Path) -> Checkpoint:
    """Load one checkpoint directory, verifying every file against the sha256 in meta.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((ckpt / META).read_text())
        for name, digest in meta.get("sha256", {}).items():  # checkpoints before the sha256 have none
            if not (ckpt / name).is_file():
                raise FmrisynthError(f"checkpoint is incomplete: {name} is missing", ckpt)
            if _sha256(ckpt / name) != digest:
                raise FmrisynthError("file is damaged or was changed since it was written (its sha256 differs "
                                     "from meta.json); restore it or use another checkpoint", ckpt / name)  # fmt: skip
        weights = load_file(ckpt / WEIGHTS)
        ema = load_file(ckpt / EMA) if (ckpt / EMA).is_file() else None
        config = load_config(ckpt / "config.yaml")
        step = int(meta["step"])
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FmrisynthError(f"checkpoint is damaged or incomplete ({e})", ckpt) from None
    return Checkpoint(ckpt, step, config, weights, ema, meta.get("ema_target"), meta)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint directory, or the newest one of a run directory; a damaged or changed file is refused."""
    return _load(latest_checkpoint(path))


def load_state(ckpt: Checkpoint) -> dict:
    """The training state (state.pt) of a loaded checkpoint: step, optimisers, generator, RNG states."""
    try:
        return torch.load(ckpt.path / STATE, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise FmrisynthError(f"checkpoint is damaged or incomplete ({STATE}: {e})", ckpt.path) from None


def resume_point(run: Path) -> tuple[Checkpoint, dict] | None:
    """The newest intact checkpoint of ``run`` and its state; None if it has none at all.

    A damaged one (truncated, empty or missing file, changed sha256) is skipped with a warning:
    losing the steps since the previous checkpoint beats losing the run.
    """
    steps = _steps(run)
    for path in reversed(steps):
        try:
            ckpt = _load(path)
            return ckpt, load_state(ckpt)
        except FmrisynthError as e:
            warnings.warn(f"{e}; resuming from an older checkpoint", stacklevel=2)
    if steps:
        raise FmrisynthError("every checkpoint is damaged; nothing to resume from", run / "checkpoints")
    return None


def clean_stale(run: Path) -> None:
    """Remove temporary checkpoint folders left by dead processes of this host (``fmrisynth.publish``),
    and those of older versions (``.tmp_step_NNNNNN-<host>-<pid>``, or unlabelled) the same way."""
    root = run / "checkpoints"
    remove_stale(root)
    host = socket.gethostname()
    for tmp in root.glob(".tmp_step_*"):
        _, _, rest = tmp.name.partition("-")
        owner, _, pid = rest.rpartition("-")
        if not pid.isdigit() or (owner == host and not alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(run: Path, step: int, objective: nn.Module, ema: nn.Module | None, state: dict, meta: dict,
                    config: Config | None, keep: int) -> Path:  # fmt: skip
    """Write checkpoint ``step`` atomically, keep the newest ``keep``; return its directory."""
    from safetensors.torch import save_file

    root = run / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = temp_path(final)  # .step_NNNNNN.tmp-<host>-<pid>
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in objective.state_dict().items()}, tmp / WEIGHTS)
        if ema is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, tmp / EMA)
        torch.save(state, tmp / STATE)
        digests = {p.name: _sha256(p) for p in (tmp / WEIGHTS, tmp / EMA, tmp / STATE) if p.is_file()}
        (tmp / META).write_text(json.dumps({**meta, "step": step, "sha256": digests}))
        save_config(config if config is not None else Config(), tmp / "config.yaml")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FmrisynthError(f"cannot write a checkpoint ({e.strerror or e})", root) from None
    for old in _steps(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final

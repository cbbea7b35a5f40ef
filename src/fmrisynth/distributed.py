"""Devices, ranks and mixed precision: the one place for these rules, shared by training and generation.

Under torchrun (``RANK`` set) the training loop joins a process group (NCCL on GPUs, gloo on CPU);
rank 0 is the one process that writes run files and prints. ``is_main``, ``barrier`` and
``main_only`` let callers keep to that rule, e.g. rank 0 encodes the latent store while the others
wait. Single-process code calls the same functions and they do the obvious thing.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from fmrisynth.errors import FmrisynthError

T = TypeVar("T")


def default_device() -> torch.device:
    """This process's device: its GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast(device: torch.device | str, amp: str = "auto"):
    """The AMP rule: "auto" is bf16 on CUDA and off elsewhere; "bf16" forces it; "off" disables it.

    bf16 keeps float32's exponent range, so no loss scaling (GradScaler) is needed.
    """
    if amp not in ("auto", "bf16", "off"):
        raise FmrisynthError(f"amp must be 'auto', 'bf16' or 'off', got {amp!r}")
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=amp == "bf16" or (amp == "auto" and kind == "cuda"))


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    """True in a single process and on rank 0 of a torchrun job: the one process that writes and prints."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def main_only(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn`` on rank 0 while the others wait; every rank returns its (picklable) result.

    If it raises ``FmrisynthError`` every rank raises it, so no rank waits forever on a failed one.
    """
    if not dist.is_initialized():
        return fn(*args, **kwargs)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn(*args, **kwargs))]
        except FmrisynthError as e:
            box = [("error", (e.reason, e.path))]
            dist.broadcast_object_list(box, src=0)
            raise
        except BaseException as e:
            dist.broadcast_object_list([("crash", repr(e))], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise FmrisynthError(*value)
    if status == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def init_distributed() -> torch.device:
    """Join the process group under torchrun (RANK is set); return this process's device."""
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        # generous: the other ranks wait at a barrier while rank 0 encodes a whole store
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
        # leave the group before the interpreter tears down: a gloo group left to its destructor at exit
        # can abort the process ("terminate called without an active exception", seen on CI's 2 cores)
        atexit.register(leave_distributed)
    return device


def leave_distributed() -> None:
    """Destroy the process group if this process joined one (registered at exit by ``init_distributed``)."""
    if dist.is_initialized():
        gc.collect()  # DDP wrappers left in reference cycles hold the group: free them while the interpreter is whole
        dist.destroy_process_group()


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks, on every rank (``x`` itself in a single process)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x

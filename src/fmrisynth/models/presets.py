"""Named model sizes, one builder for either backbone, and the numbers that compare them.

Every size of ours is one family, scaled by width alone so that a scaling study varies one thing:
a space-time U-Net with FiLM conv blocks (+ temporal convolutions) at the latent's full resolution
and AdaLN-Zero + cross-attention transformer stages (spatial + temporal attention) at 1/2 and 1/4
of it, widths (m, 2m, 2m), depths (2, 4, 6). At the 2 mm latent (T=20, c=4, 24x28x24),
m = 114, 170, 228, 288, 340, 400 gives the reference scaling grid: 37.7, 83.7, 150.4, 239.7,
333.9 and 462.0 M parameters against 38.1, 85.4, 151.5, 236.5, 340.3 and 462.9 M (each within
2 %). The ``s0.3m`` .. ``s20m`` sizes are the same family at CPU scale, listed at the demo latent
(T=20, c=4, 8x10x8).

Heads are ``width // head_dim``, and each head's size (width / heads) must be even: the rotary
time encoding rotates channel pairs. ``build_denoiser`` refuses a preset that breaks this, and
``describe`` (one forward pass on the meta device) any other that cannot run, each in one line.

Parameter counts depend on c and the number of conditions (a few thousand parameters), never on T
or on the spatial size: positions are a fixed sine-cosine embedding in space and rotary (relative)
in time. GFLOPs per forward pass grow linearly with T. An ablation is a ``variant``; to compare
variants at equal size, use the param-matched entries ``s237m-<variant>`` (their widths are
re-chosen so that each stays within 5 % of 236.5M), or add an entry the same way::

    PRESETS["s85m-all-cnn"] = Preset("2mm", family(m=80, variant="all-cnn"))  # check: fmrisynth presets
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from fmrisynth.config import ModelConfig
from fmrisynth.errors import FmrisynthError

# (T, c, d, h, w) of a latent clip: 20 frames, 4 latent channels, the grid divided by 4.
LATENT_SHAPES = {"6mm": (20, 4, 8, 10, 8), "2mm": (20, 4, 24, 28, 24)}
N_CLASSES = 7  # hcp7: the count at which `fmrisynth presets` lists parameters


class Preset(NamedTuple):
    """Backbone keyword arguments, and the grid whose latent size the preset is meant for."""

    grid: str
    arch: dict


def family(m: int, head_dim: int = 64, **overrides) -> dict:
    """The one architecture family of ours at base width ``m`` (see the module docstring)."""
    arch = dict(widths=(m, 2 * m, 2 * m), depths=(2, 4, 6), kinds=("conv", "attn", "attn"), head_dim=head_dim)
    return {**arch, **overrides}


PRESETS: dict[str, Preset] = {
    # trains on 2 CPU cores in minutes at the demo latent: 8 channels at full resolution, one block per level
    "tiny": Preset("6mm", dict(widths=(8, 16, 16), depths=(1, 1, 1), kinds=("conv", "attn", "attn"), head_dim=8)),
    **{f"s{name}m": Preset("6mm", family(m, head_dim=hd))
       for name, m, hd in [("0.3", 10, 10), ("1", 18, 18), ("3", 32, 32), ("10", 58, 58), ("20", 84, 42)]},
    **{f"s{name}m": Preset("2mm", family(m, head_dim=hd))
       for name, m, hd in [("38", 114, 64), ("85", 170, 64), ("152", 228, 76), ("237", 288, 64), ("340", 340, 64),
                           ("463", 400, 80)]},
    # the ablations at the size of the reference's baseline, each re-widened to ~236.5M parameters
    "s237m-all-cnn": Preset("2mm", family(234, head_dim=72, variant="all-cnn")),
    "s237m-all-transformer": Preset("2mm", family(288, variant="all-transformer", patch=(2, 1, 1))),
    "s237m-adaln-only": Preset("2mm", family(304, head_dim=72, variant="adaln-only")),
    "s237m-xattn-only": Preset("2mm", family(350, variant="xattn-only")),
}  # fmt: skip


def _baseline_presets() -> dict:
    from fmrisynth.models.baseline import BASELINE_PRESETS

    return BASELINE_PRESETS


def build_denoiser(model_cfg: ModelConfig, latent_shape: tuple[int, ...], n_classes: int):
    """The denoiser named by ``model_cfg`` for latent clips of ``latent_shape`` = (T, c, d, h, w).

    Either backbone answers ``forward(x (B, T, c, d, h, w), t (B,), label (B,), design (B, T))``
    with a prediction of the shape of ``x``; ours runs on any T, the MONAI U-Net only on the T it
    was built for (it stacks frames on channels).
    """
    frames, channels = int(latent_shape[0]), int(latent_shape[1])
    if model_cfg.backbone == "monai-unet":
        from fmrisynth.models.baseline import build_baseline

        if model_cfg.preset not in _baseline_presets():
            raise FmrisynthError(f"unknown monai-unet preset {model_cfg.preset!r}; choose one of {', '.join(_baseline_presets())}")
        if model_cfg.variant not in (None, "hybrid"):
            raise FmrisynthError(f"variant {model_cfg.variant!r} applies to backbone 'ours' only")
        return build_baseline(model_cfg.preset, tuple(latent_shape), n_classes)
    if model_cfg.backbone != "ours":
        raise FmrisynthError(f"unknown backbone {model_cfg.backbone!r}; choose ours or monai-unet")
    if model_cfg.preset not in PRESETS:
        raise FmrisynthError(f"unknown preset {model_cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    from fmrisynth.models.backbone import VARIANTS, Backbone

    arch = dict(PRESETS[model_cfg.preset].arch)
    if model_cfg.variant is not None:
        if model_cfg.variant not in VARIANTS:
            raise FmrisynthError(f"unknown variant {model_cfg.variant!r}; choose one of {', '.join(VARIANTS)}")
        arch["variant"] = model_cfg.variant
    try:
        model = Backbone(channels, n_classes, **arch)
    except ValueError as e:
        raise FmrisynthError(f"preset {model_cfg.preset!r} cannot be built: {e}") from None
    from fmrisynth.models.blocks import Attention

    odd = sorted({m.q.out_features // m.heads for m in model.modules()
                  if isinstance(m, Attention) and m.rotary and (m.q.out_features // m.heads) % 2})  # fmt: skip
    if odd:
        raise FmrisynthError(f"preset {model_cfg.preset!r} has attention heads of odd size {odd[0]}; "
                             "the rotary time encoding needs an even head size (change head_dim)")  # fmt: skip
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops(model, latent_shape: tuple[int, ...], batch: int = 1) -> float:
    """GFLOPs of one forward pass per latent clip (a multiply-add counts 2), via FlopCounterMode.

    The pass runs on meta tensors standing in for the weights, so it costs no compute or memory even
    for the largest preset, and attention is counted (PyTorch's CPU attention kernel is not).
    """
    import torch
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    frames, channels, *spatial = latent_shape
    meta = {k: torch.empty_like(v, device="meta") for k, v in [*model.named_parameters(), *model.named_buffers()]}
    inputs = (
        torch.zeros(batch, frames, channels, *spatial, device="meta"),  # x (B, T, c, d, h, w)
        torch.zeros(batch, device="meta"),  # t (B,)
        torch.zeros(batch, dtype=torch.long, device="meta"),  # label (B,)
        torch.zeros(batch, frames, device="meta"),  # design (B, T)
    )
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        functional_call(model, meta, inputs)
    return counter.get_total_flops() / 1e9 / batch


def describe(model_cfg: ModelConfig, latents: str | Path | tuple[int, ...], n_classes: int = N_CLASSES) -> dict:
    """Parameters and GFLOPs of the model ``model_cfg`` names, at a latent store's size or a latent shape.

    The model is built on the meta device and runs one forward pass there: nothing is allocated, so
    this is instant at any size, and a model that cannot run at this size is refused in one line
    (``FmrisynthError``) before a training run writes anything.
    """
    import torch

    if isinstance(latents, (str, Path)):
        from fmrisynth.data.store import ClipStore

        store = ClipStore(latents)
        if store.kind != "latents":
            raise FmrisynthError("not a latent store (write one with `fmrisynth train-vae`)", latents)
        latents, n_classes = tuple(store.item_shape), len(store.conditions)
    with torch.device("meta"):
        model = build_denoiser(model_cfg, latents, n_classes)
    try:
        flops = gflops(model, latents)
    except (RuntimeError, ValueError) as e:
        raise FmrisynthError(f"preset {model_cfg.preset!r} cannot run on latents {tuple(latents)}: "
                             f"{str(e).splitlines()[0]}") from None  # fmt: skip
    return {
        "preset": model_cfg.preset,
        "backbone": model_cfg.backbone,
        "variant": getattr(model, "variant", None),
        "latent_shape": list(latents),
        "params": count_params(model),
        "gflops": flops,
    }


def all_presets() -> list[dict]:
    """``describe`` of every preset: ours at its own latent size, the baselines at both sizes."""
    rows = [describe(ModelConfig(preset=name), LATENT_SHAPES[p.grid]) for name, p in PRESETS.items()]
    for name in _baseline_presets():
        rows += [describe(ModelConfig(backbone="monai-unet", preset=name), shape) for shape in LATENT_SHAPES.values()]
    return rows


def presets_table(rows: list[dict]) -> str:
    """``all_presets`` as the text table of ``fmrisynth presets``: one line per preset and latent size."""
    lines = [f"{'preset':<24}{'backbone':<12}{'latent (T, c, d, h, w)':<26}{'params':>10}{'GFLOPs':>10}"]
    for r in rows:
        shape = "(" + ", ".join(map(str, r["latent_shape"])) + ")"
        lines.append(f"{r['preset']:<24}{r['backbone']:<12}{shape:<26}{r['params'] / 1e6:>9.2f}M{r['gflops']:>10.1f}")
    return "\n".join(lines)

"""Configuration: dataclasses with working defaults, YAML overrides, CLI overrides.

Precedence is ``defaults < YAML file < command line``. Every run saves its resolved config next to
its outputs (``save_config``) so a result can always be traced back to the settings that made it.

A YAML file mirrors the dataclass tree::

    seed: 3
    data: {grid: 2mm, clip_len: 20}
    train: {steps: 2000, batch_size: 8}

and a command-line override is a dotted path: ``train.steps=2000``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fmrisynth.errors import FmrisynthError


@dataclass
class SimConfig:
    """The embedded simulator (``fmrisynth simulate``): an HCP-layout dataset with ground truth."""

    subjects: int = 10
    tasks: str = "hcp7"  # "hcp7" or "all": the seven HCP paradigms, every EV; or a list, "MOTOR,WM"
    grid: str = "6mm"  # "2mm": the real HCP grid (91x109x91, LAS); else a model grid, e.g. "6mm"
    runs: tuple[str, ...] = ("LR", "RL")
    task_amplitude: float = 3.0  # % signal change per 100 units of the real (parcel-averaged) HCP betas
    thermal_sd: float = 1.5  # white noise in % of baseline for a 2 mm voxel (scaled by voxel volume)
    drift_pct: float = 1.0  # slow scanner drift over a run, % of baseline
    subject_jitter: float = 0.3  # added to a subject's real betas, in units of the between-subject sd
    smoothing_mm: float = 3.0  # Gaussian sigma that blends painted parcels
    spikes: bool = False  # motion-like spikes
    trial_sd: float = 0.0  # sd of each block's or event's response gain around 1 (real blocks vary); 0: none


@dataclass
class DataConfig:
    """Preprocessing of runs into labelled clips (``fmrisynth prepare``)."""

    grid: str = "6mm"  # "2mm" (MNI 96x112x96), "6mm" (demo, 32x40x32) or "<mm>mm:<D>x<H>x<W>"
    clip_len: int = 20  # frames per clip (T)
    # "auto": hcp7 for --source hcp, every condition in the events for --source bids; or
    # "hcp7", "hcp24", "all" (every condition found in the events)
    conditions: str = "auto"
    normalise: str = "zscore"  # voxelwise, per run: "zscore", "psc" (percent signal change) or "none"
    strategy: str = "block"  # "block": clips aligned to block onsets
    jitter_frames: int = 2  # the block onset falls uniformly in frames [0, jitter] of the clip
    rest_clips: bool = False  # also cut clips from fixation periods, labelled "rest"
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train/val/test fractions of *subjects*
    mask: str | None = None  # a NIfTI brain mask; default: nilearn's MNI152 mask on the grid


@dataclass
class VQGANConfig:
    """Stage 1 architecture and loss (``fmrisynth train-vae``)."""

    preset: str = "tiny"
    latent_channels: int = 4
    downsample: int = 4  # 4 (default) or 8, per axis
    codebook_size: int = 512
    quantizer: str = "ema"  # codes move as EMA cluster means ("ema") or by gradient ("st", straight-through)
    ema_decay: float = 0.99  # of code usage (and of the codes themselves with "ema")
    dead_code_threshold: float = 0.1  # restart codes used less than this fraction of the uniform share
    commitment: float = 0.25
    l2_weight: float = 0.0  # reconstruction = L1 + l2_weight * L2, both inside the brain mask
    adv_weight: float = 0.1  # scales the adaptive (VQ-GAN) weight of the patch adversarial loss
    disc_start: int = 500  # generator steps before the adversarial loss is switched on


@dataclass
class ModelConfig:
    """Stage 2 backbone: ``ours`` (hierarchical CNN-Transformer) or ``monai-unet`` (the baseline)."""

    backbone: str = "ours"
    preset: str = "tiny"  # see `fmrisynth presets`: tiny, s0.3m ... s463m, s237m-all-cnn, monai-tiny, ...
    # None: the preset's own (hybrid unless the preset is an ablation); else one of
    # hybrid | all-cnn | all-transformer | adaln-only | xattn-only
    variant: str | None = None


@dataclass
class DiffusionConfig:
    """Noise schedule, objective and sampler (reference: DDPM, eps, linear 0.0015->0.0195, 1000).

    ``v`` with the zero-initialised output layer is EDM's preconditioning for unit-variance
    latents: the untrained model is the best linear denoiser (see models/diffusion.py).
    """

    prediction: str = "v"  # "v" or "eps" (the reference's)
    weighting: str = "plain"  # loss weight per timestep: "plain" or "min-snr" (Hang et al. 2023, gamma 5)
    schedule: str = "linear"  # "linear", "scaled-linear" (linear in sqrt(beta), as in LDM) or "cosine"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    num_steps: int = 1000
    cond_drop: float = 0.05  # probability of the null condition during training (for CFG)
    guidance: float = 2.0
    sampler: str = "ddim"  # "ddpm", "ddim" or "analytic" (keeps the variance of near-white data: models/diffusion.py)
    sample_steps: int = 50


@dataclass
class Stage2Config:
    """What stage 2 diffuses and what it adds back (docs/design.md, "Why stage 2 looks like this")."""

    response: str = "hrf"  # "hrf": diffuse clip - task response (models/response.py); "none": whole clips
    response_rank: int = 4  # principal components of subjects' response maps
    # "gaussian": the denoiser diffuses latents whitened by a Gaussian model of the train latents
    # (models/background.py, PriorGrad): untrained, it generates that Gaussian; "none": white prior
    prior: str = "gaussian"
    background_components: int = 50  # principal directions of each Gaussian background model
    background_clips: int = 256  # train clips (at most) that fit the voxel and latent Gaussian models
    prior_clips: float = 10.0  # a subject's time covariances are shrunk to the pool with this many clips' weight
    # draw each event's amplitude with the response model's trial_sd (models/response.py); off by
    # default: on data without trial variability the estimate is an upper bound (0.16-0.40 on the demo's)
    trial_gains: bool = False
    codec_noise: bool = True  # add back a Gaussian model of what the VQ-GAN drops (generate/codec.py)
    noise_clips: int = 48  # training clips whose reconstructions fit that model


@dataclass
class TrainConfig:
    """The one training loop shared by both stages."""

    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU), "bf16" or "off"
    log_every: int = 10
    ckpt_every: int = 500
    keep_ckpts: int = 2
    num_workers: int = 0
    max_minutes: float | None = None  # wall-clock budget; training stops cleanly when it runs out


@dataclass
class EvalConfig:
    """The evaluation protocol of docs/design.md (``fmrisynth evaluate``)."""

    hrf: str = "glover"  # "glover" or "spm"
    drift_order: int = 0  # over a 14 s clip a linear drift absorbs most of the block regressor
    roi_fraction: float = 0.05
    split: str = "test"  # the real store's held-out split, when --real names none
    reference_split: str = "train"  # real clips of other people, from the real store, when --reference names none
    codec: bool = True  # VQ-GAN reconstructions of the reference when samples name their run (~1.5 s/clip on 2 CPU cores)
    parcels: int = 100  # k-means parcels for functional connectivity where no atlas covers the grid
    c2st_components: int = 50  # PCA features of whole clips for the classifier two-sample test
    c2st_folds: int = 5
    feature_voxels: int = 4096  # random in-mask voxels kept per clip for the PCA and memorisation
    pca_components: int = 10
    memorisation_margin: float = 0.1  # flag when train_nn_corr exceeds heldout_nn_corr by more
    batch_clips: int = 16  # clips fitted together (memory: batch x T x V float32, a few times)
    plot_frames: int = 4000  # frames per set kept for the report's PCA scatter


@dataclass
class Config:
    seed: int = 0
    sim: SimConfig = field(default_factory=SimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VQGANConfig = field(default_factory=VQGANConfig)
    vae_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1500, batch_size=16, lr=2e-4, ema_decay=0.0)
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated field type, or raise a one-line error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except FmrisynthError:
                continue
        raise FmrisynthError(f"config {where}: cannot read {value!r} as {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise FmrisynthError(f"config {where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        args = typing.get_args(tp)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise FmrisynthError(f"config {where}: expected {len(item_types)} values, got {value!r}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, item_types))
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if tp is not str and isinstance(value, bool):
                raise ValueError(value)
            value = tp(value)
            if tp is float and not math.isfinite(value):
                raise FmrisynthError(f"config {where}: {value} is not a finite number")
            return value
    except (TypeError, ValueError, OverflowError):
        raise FmrisynthError(f"config {where}: cannot read {value!r} as {tp.__name__}") from None
    return value


def _from_dict(cls: type, values: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FmrisynthError(
            f"config {where or 'top level'}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in values.items()}
    base = cls()
    return dataclasses.replace(base, **kwargs) if kwargs else base


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able Python (tuples become lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def packaged_config(name: str) -> Path:
    """A YAML preset shipped inside the package (``src/fmrisynth/configs/<name>.yaml``)."""
    return Path(__file__).parent / "configs" / f"{name}.yaml"


def load_config(
    path: str | Path | None = None, overrides: typing.Iterable[str] = (), base: str | Path | None = None
) -> Config:
    """Build the resolved config: defaults, a ``base`` preset, the YAML file, ``key.sub=value`` overrides."""
    tree = to_dict(Config())
    for source in (base, path):
        if source is None:
            continue
        source = Path(source)
        if not source.is_file():
            raise FmrisynthError("config file not found", source)
        try:
            loaded = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as e:
            raise FmrisynthError(f"not valid YAML ({str(e).splitlines()[0]})", source) from None
        if not isinstance(loaded, dict):
            raise FmrisynthError("expected a YAML mapping at the top level", source)
        tree = _merge(tree, loaded)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise FmrisynthError(f"override {item!r} is not of the form key.sub=value")
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise FmrisynthError(f"override {item!r}: unknown section {p!r}")
            node = node[p]
        node[leaf] = yaml.safe_load(value) if value else value
    return validate(_from_dict(Config, tree))


def _require(ok: bool, where: str, rule: str, value: Any) -> None:
    if not ok:
        raise FmrisynthError(f"config {where}: must be {rule}, got {value!r}")


def validate_train(t: TrainConfig, name: str = "train") -> None:
    """The training settings' one set of rules, for a config read from YAML and one built in Python alike
    (``fit`` checks again: a TrainConfig made in code never passed ``load_config``, so types and
    finiteness are checked here too)."""
    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep_ckpts"):
        v = getattr(t, key)
        _require(integer(v) and v >= 1, f"{name}.{key}", "an integer >= 1", v)
    for key in ("warmup_steps", "num_workers"):
        v = getattr(t, key)
        _require(integer(v) and v >= 0, f"{name}.{key}", "an integer >= 0", v)
    for key in ("weight_decay", "grad_clip"):
        v = getattr(t, key)
        _require(number(v) and v >= 0, f"{name}.{key}", "a finite number >= 0", v)
    _require(number(t.lr) and t.lr > 0, f"{name}.lr", "a finite number > 0", t.lr)
    _require(number(t.ema_decay) and 0 <= t.ema_decay < 1, f"{name}.ema_decay", "in [0, 1)", t.ema_decay)
    _require(t.amp in ("auto", "bf16", "off"), f"{name}.amp", "auto, bf16 or off", t.amp)
    _require(t.max_minutes is None or (number(t.max_minutes) and t.max_minutes > 0), f"{name}.max_minutes",
             "a finite number > 0 or none", t.max_minutes)  # fmt: skip


def validate(cfg: Config) -> Config:
    """Refuse values no stage can run with, in one line naming the key, before anything is created.

    Checks what is cheap to know from the config alone (counts, rates, probabilities, choices);
    names that need a registry (presets, grids, condition sets) are checked where they are used.
    Non-finite floats never get here: reading the config refuses them.
    """
    _require(cfg.seed >= 0, "seed", ">= 0", cfg.seed)
    _require(cfg.sim.subjects >= 1, "sim.subjects", ">= 1", cfg.sim.subjects)
    d = cfg.data
    _require(d.clip_len >= 1, "data.clip_len", ">= 1", d.clip_len)
    _require(d.jitter_frames >= 0, "data.jitter_frames", ">= 0", d.jitter_frames)
    _require(min(d.split) >= 0 and sum(d.split) > 0, "data.split", "three fractions >= 0, not all 0", d.split)
    v = cfg.vae
    for key in ("latent_channels", "codebook_size"):
        _require(getattr(v, key) >= 1, f"vae.{key}", ">= 1", getattr(v, key))
    for key in ("commitment", "l2_weight", "adv_weight", "disc_start", "dead_code_threshold"):
        _require(getattr(v, key) >= 0, f"vae.{key}", ">= 0", getattr(v, key))
    _require(0 <= v.ema_decay < 1, "vae.ema_decay", "in [0, 1)", v.ema_decay)
    f = cfg.diffusion
    _require(f.num_steps >= 1, "diffusion.num_steps", ">= 1", f.num_steps)
    _require(f.sample_steps >= 1, "diffusion.sample_steps", ">= 1", f.sample_steps)
    _require(0 < f.beta_start <= f.beta_end < 1, "diffusion.beta_start/beta_end", "0 < start <= end < 1",
             (f.beta_start, f.beta_end))  # fmt: skip
    _require(0 <= f.cond_drop <= 1, "diffusion.cond_drop", "in [0, 1]", f.cond_drop)
    _require(f.prediction in ("v", "eps"), "diffusion.prediction", "v or eps", f.prediction)
    _require(f.weighting in ("plain", "min-snr"), "diffusion.weighting", "plain or min-snr", f.weighting)
    _require(cfg.stage2.response in ("hrf", "none"), "stage2.response", "hrf or none", cfg.stage2.response)
    _require(cfg.stage2.response_rank >= 0, "stage2.response_rank", ">= 0", cfg.stage2.response_rank)
    _require(cfg.stage2.noise_clips >= 2, "stage2.noise_clips", ">= 2", cfg.stage2.noise_clips)
    _require(cfg.stage2.prior in ("gaussian", "none"), "stage2.prior", "gaussian or none", cfg.stage2.prior)
    _require(cfg.stage2.background_components >= 1, "stage2.background_components", ">= 1",
             cfg.stage2.background_components)  # fmt: skip
    _require(cfg.stage2.background_clips >= 2, "stage2.background_clips", ">= 2", cfg.stage2.background_clips)
    _require(cfg.stage2.prior_clips >= 0, "stage2.prior_clips", ">= 0", cfg.stage2.prior_clips)
    validate_train(cfg.vae_train, "vae_train")
    validate_train(cfg.train, "train")
    return cfg


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically: a temporary file renamed into place)."""
    from fmrisynth.publish import staged_file

    path = Path(path)
    with staged_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path

"""The ``fmrisynth`` command. Thin: parse arguments, build the config, call the library.

Every verb takes ``--config FILE.yaml``, ``--seed S`` and ``--set key.sub=value`` (repeatable);
the precedence is defaults < YAML < ``--set`` < the verb's own flags. Library imports happen inside
the handlers so that ``fmrisynth --help`` answers instantly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from fmrisynth.errors import FmrisynthError

VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}
HANDLERS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def verb(name: str, help: str):
    """Register ``fn(args)`` as the handler of ``fmrisynth <name>``; ``fn.arguments`` adds its flags."""

    def register(fn):
        HANDLERS[name] = fn
        VERBS[name] = (help, getattr(fn, "arguments", lambda p: None))
        return fn

    return register


def arguments(add: Callable[[argparse.ArgumentParser], None]):
    def attach(fn):
        fn.arguments = add
        return fn

    return attach


def config_from(args: argparse.Namespace, **flags: object):
    """Resolved config: YAML, then --set, then the verb's own flags given as ``section.key=value``."""
    from fmrisynth.config import load_config

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    for key, value in flags.items():
        if value is not None:
            value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            overrides.append(f"{key.replace('__', '.')}={value}")
    return load_config(args.config, overrides)


def not_yet(issue: int):
    def handler(args: argparse.Namespace) -> int:
        print(f"fmrisynth {args.verb}: not available yet (issue #{issue})", file=sys.stderr)
        return 2

    return handler


# --- verbs --------------------------------------------------------------------------------------


@verb("simulate", "write an HCP-layout simulated dataset with ground truth")
@arguments(
    lambda p: (
        p.add_argument("--out", type=Path, required=True, help="dataset root to create"),
        p.add_argument("--subjects", type=int, help="number of subjects (default 10)"),
        p.add_argument("--tasks", choices=["hcp7", "all"], help="conditions whose EVs are written"),
        p.add_argument("--grid", help="2mm, 6mm or <mm>mm:<D>x<H>x<W> (default 6mm)"),
        p.add_argument("--runs", help="phase encodings, e.g. LR,RL"),
    )
)
def _simulate(args):
    return not_yet(3)(args)


@verb("prepare", "resample, mask and normalise runs, cut labelled clips into a store")
@arguments(
    lambda p: (
        p.add_argument("--source", choices=["hcp", "bids"], required=True),
        p.add_argument("root", type=Path, help="dataset root"),
        p.add_argument("--out", type=Path, required=True, help="clip store to create"),
        p.add_argument("--grid", help="2mm, 6mm or <mm>mm:<D>x<H>x<W>"),
        p.add_argument("--clip-len", type=int, help="frames per clip (default 20)"),
        p.add_argument("--conditions", help="hcp7, hcp24 or all"),
    )
)
def _prepare(args):
    return not_yet(2)(args)


@verb("train-vae", "train the stage-1 3D VQ-GAN on a clip store")
@arguments(
    lambda p: (
        p.add_argument("--store", type=Path, required=True),
        p.add_argument("--out", type=Path, required=True),
        p.add_argument("--preset", help="tiny or base"),
        p.add_argument("--steps", type=int),
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint"),
    )
)
def _train_vae(args):
    return not_yet(4)(args)


@verb("train", "train the stage-2 latent diffusion model on a latent store")
@arguments(
    lambda p: (
        p.add_argument("--latents", type=Path, required=True),
        p.add_argument("--out", type=Path, required=True),
        p.add_argument("--preset"),
        p.add_argument("--backbone", choices=["ours", "monai-unet"]),
        p.add_argument("--steps", type=int),
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint"),
    )
)
def _train(args):
    return not_yet(5)(args)


@verb("sample", "generate clips of a condition and write them as NIfTI")
@arguments(
    lambda p: (
        p.add_argument("--checkpoint", type=Path, required=True),
        p.add_argument("--condition", required=True),
        p.add_argument("--n", type=int, default=8),
        p.add_argument("--guidance", type=float),
        p.add_argument("--steps", type=int),
        p.add_argument("--sampler", choices=["ddpm", "ddim"]),
        p.add_argument("--out", type=Path, required=True),
    )
)
def _sample(args):
    return not_yet(5)(args)


@verb("evaluate", "GLM maps, map correlation, RSA, top-1, HRF, PCA, ceiling, memorisation")
@arguments(
    lambda p: (
        p.add_argument("--real", required=True, help="STORE[:split] of real clips (default split test)"),
        p.add_argument("--generated", type=Path, required=True, help="directory of samples or a store"),
        p.add_argument("--out", type=Path, required=True),
    )
)
def _evaluate(args):
    return not_yet(6)(args)


@verb("report", "one self-contained HTML report from an evaluation")
@arguments(
    lambda p: (
        p.add_argument("--eval", type=Path, required=True, help="output directory of evaluate"),
        p.add_argument("--scaling", type=Path, help="output directory of scale"),
        p.add_argument("--out", type=Path, required=True, help="report.html to write"),
    )
)
def _report(args):
    return not_yet(6)(args)


@verb("demo", "the whole chain on the embedded simulator, on a laptop")
@arguments(
    lambda p: (
        p.add_argument("--out", type=Path, default=Path("runs/demo")),
        p.add_argument("--minutes", type=float, help="wall-clock budget for the whole run"),
        p.add_argument("--fresh", action="store_true", help="redo finished stages"),
    )
)
def _demo(args):
    return not_yet(7)(args)


@verb("scale", "train and evaluate a grid of model sizes, fit metric vs parameters")
@arguments(
    lambda p: (
        p.add_argument("--sizes", help="comma-separated presets"),
        p.add_argument("--budget", help="steps per size, e.g. 2000"),
        p.add_argument("--out", type=Path, required=True),
    )
)
def _scale(args):
    return not_yet(7)(args)


@verb("presets", "list the model presets with parameters and GFLOPs")
@arguments(lambda p: p.add_argument("--json", action="store_true"))
def _presets(args):
    return not_yet(5)(args)


# --- entry point --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmrisynth",
        description="Generate realistic whole-brain task fMRI and evaluate it like a neuroscientist.",
    )
    parser.add_argument("--version", action="version", version="fmrisynth 0.1.0")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (help_text, add_arguments) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, help="YAML config (overrides the defaults)")
        p.add_argument("--seed", type=int, help="one seed for numpy and torch")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. train.steps=500")
        add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return int(HANDLERS[args.verb](args) or 0)
    except FmrisynthError as e:
        print(f"fmrisynth {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fmrisynth {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

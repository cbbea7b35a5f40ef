"""The ``fmrisynth`` command. Thin: parse arguments, build the config, call the library.

Every verb takes ``--config FILE.yaml``, ``--seed S`` and ``--set key.sub=value`` (repeatable);
the precedence is defaults < YAML < ``--set`` < the verb's own flags. Library imports happen inside
the handlers so that ``fmrisynth --help`` answers instantly.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import fmrisynth
from fmrisynth.errors import FmrisynthError

VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], object]]] = {}  # name -> (help, add its flags)
HANDLERS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def verb(name: str, help: str, add: Callable[[argparse.ArgumentParser], object] = lambda p: None):
    """Register ``fn(args)`` as the handler of ``fmrisynth <name>``; ``add(parser)`` adds its flags."""

    def register(fn):
        HANDLERS[name], VERBS[name] = fn, (help, add)
        return fn

    return register


# --- argument types and output checks: every refusal is one line, before anything is created ---


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``fmrisynth sample: error: argument --n: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {low}")
        return value

    parse.__name__ = "positive_int" if low == 1 else "nonnegative_int"
    return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)

# The packaged recipe a verb's config starts from (before YAML, --set and flags); others start from the defaults.
BASE = {"demo": "demo", "scale": "demo"}

# What each verb's --out must be: "dir" (created if absent, reused if present), "new" (must not
# exist yet) or "file". Verbs not listed take a directory.
OUT_KIND = {"prepare": "new", "report": "file"}


def check_out(path: Path, kind: str = "dir") -> None:
    """Refuse an output path that cannot be written, in one line, before anything is created.

    Catches a path under an existing file, a directory where a file is needed and the reverse, an
    existing store where a new one is needed, and a read-only or non-writable location.
    """
    path = Path(path)
    try:
        if path.exists():
            if kind == "file" and path.is_dir():
                raise FmrisynthError("is a directory; --out must name a file (e.g. report.html)", path)
            if kind != "file" and not path.is_dir():
                raise FmrisynthError("exists and is not a directory; --out must name a directory", path)
            if kind == "new":
                raise FmrisynthError("already exists; choose another --out or remove it", path)
        start = path.parent if kind == "file" or not path.exists() else path
        existing = next(p for p in (start.absolute(), *start.absolute().parents) if p.exists())
        if not existing.is_dir():
            raise FmrisynthError(f"cannot be created: {existing} is a file, not a directory", path)
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            raise FmrisynthError(f"cannot be written: {existing} is on a read-only file system", path)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise FmrisynthError(f"cannot be written: no write permission in {existing}", path)
    except OSError as e:
        raise FmrisynthError(f"cannot be used as output ({e.strerror or e})", path) from None


def config_from(args: argparse.Namespace, base: Path | None = None, **flags: object):
    """The one way a verb reads its config: defaults, ``base`` (the verb's packaged recipe, ``BASE``,
    unless given), YAML, --set, then the verb's own flags (``section__key=value``).

    A missing or malformed YAML file, an unknown key and a bad value are each one line."""
    from fmrisynth.config import load_config, packaged_config

    if base is None and args.verb in BASE:
        base = packaged_config(BASE[args.verb])

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    for key, value in flags.items():
        if value is not None:
            value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            overrides.append(f"{key.replace('__', '.')}={value}")
    return load_config(args.config, overrides, base=base)


# --- verbs --------------------------------------------------------------------------------------


@verb("simulate", "write an HCP-layout simulated dataset with ground truth", lambda p: (
    p.add_argument("--out", type=Path, required=True, help="dataset root to create"),
    p.add_argument("--subjects", type=positive_int, help="number of subjects (default 10)"),
    p.add_argument("--tasks", help="hcp7 or all (the seven HCP paradigms), or a list such as MOTOR,WM"),
    p.add_argument("--grid", help="2mm (the real HCP grid), 6mm or <mm>mm:<D>x<H>x<W> (default 6mm)"),
    p.add_argument("--runs", help="phase encodings, e.g. LR,RL"),
    p.add_argument("--events", type=Path, help="any design instead of the HCP paradigms: a BIDS events.tsv (BIDS output)"),
    p.add_argument("--tr", type=positive_float, help="with --events: repetition time in s"),
    p.add_argument("--frames", type=positive_int, help="with --events: frames per run"),
    p.add_argument("--task", help="with --events: BIDS task label (default: the events file's name)"),
))
def _simulate(args):
    from fmrisynth.data.simulator import simulate

    cfg = config_from(args, sim__subjects=args.subjects, sim__tasks=args.tasks, sim__grid=args.grid, sim__runs=args.runs)
    if any(v is not None for v in (args.events, args.tr, args.frames, args.task)):
        from fmrisynth.data.sim_events import simulate_design

        summary = simulate_design(cfg, args.out, args.events, args.tr, args.frames, args.task, args.tasks is None)
    else:
        summary = simulate(cfg, args.out)
    print(f"wrote {summary['runs']} runs of {len(summary['subjects'])} subjects ({summary['grid']}) "
          f"to {summary['out']} in {summary['seconds']:.0f} s")  # fmt: skip


@verb("prepare", "resample, mask and normalise runs, cut labelled clips into a store", lambda p: (
    p.add_argument("--source", choices=["hcp", "bids"], required=True),
    p.add_argument("root", type=Path, help="dataset root"),
    p.add_argument("--out", type=Path, required=True, help="clip store to create"),
    p.add_argument("--grid", help="2mm, 6mm or <mm>mm:<D>x<H>x<W>"),
    p.add_argument("--clip-len", type=positive_int, help="frames per clip (default 20)"),
    p.add_argument("--conditions", help="hcp7, hcp24 or all (default: hcp7 for hcp, all for bids)"),
    p.add_argument("--quiet", action="store_true", help="no progress bar"),
))
def _prepare(args):
    from fmrisynth.data.prepare import format_summary, prepare

    cfg = config_from(args, data__grid=args.grid, data__clip_len=args.clip_len, data__conditions=args.conditions)
    print(format_summary(prepare(args.source, args.root, args.out, cfg, progress=not args.quiet)))


@verb("train-vae", "train the stage-1 3D VQ-GAN on a clip store, then encode it to OUT/latents", lambda p: (
    p.add_argument("--store", type=Path, required=True, help="clip store from `fmrisynth prepare`"),
    p.add_argument("--out", type=Path, required=True, help="run directory; the latent store goes to OUT/latents"),
    p.add_argument("--preset", help="tiny (CPU) or base"),
    p.add_argument("--steps", type=positive_int, help="training steps (vae_train.steps)"),
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint"),
    p.add_argument("--quiet", action="store_true", help="no progress bars"),
))
def _train_vae(args):
    from fmrisynth.distributed import is_main
    from fmrisynth.pipeline import train_codec

    cfg = config_from(args, vae__preset=args.preset, vae_train__steps=args.steps)
    checkpoint, latents = train_codec(cfg, args.store, args.out, resume=args.resume, progress=not args.quiet)
    if is_main():
        print(f"checkpoint: {checkpoint}\nlatent store: {latents}")


@verb("train", "train the stage-2 latent diffusion model on a latent store", lambda p: (
    p.add_argument("--latents", type=Path, required=True, help="latent store from `fmrisynth train-vae`"),
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, train_log.jsonl)"),
    p.add_argument("--preset", help="model size, see `fmrisynth presets` (default tiny)"),
    p.add_argument("--backbone", choices=["ours", "monai-unet"]),
    p.add_argument("--variant", choices=["hybrid", "all-cnn", "all-transformer", "adaln-only", "xattn-only"]),
    p.add_argument("--steps", type=positive_int, help="training steps (train.steps)"),
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint"),
    p.add_argument("--quiet", action="store_true", help="no progress bar"),
))
def _train(args):
    from fmrisynth.distributed import is_main
    from fmrisynth.models.presets import describe
    from fmrisynth.training.diffusion import train_diffusion

    cfg = config_from(args, model__preset=args.preset, model__backbone=args.backbone, model__variant=args.variant,
                      train__steps=args.steps)  # fmt: skip
    describe(cfg.model, args.latents)  # the model builds and runs on these latents (meta device), before any write

    checkpoint = train_diffusion(cfg, args.latents, args.out, resume=args.resume, progress=not args.quiet)
    if is_main():
        print(f"checkpoint: {checkpoint}")


@verb("sample", "generate clips of a condition, or whole runs of any design, as a BIDS dataset", lambda p: (
    p.add_argument("--checkpoint", type=Path, required=True, help="run of `fmrisynth train`, a checkpoint, or a demo folder"),
    p.add_argument("--condition", help="clip mode: the condition, e.g. MOTOR:rh"),
    p.add_argument("--n", type=positive_int, default=8, help="clip mode: clips to generate"),
    p.add_argument("--guidance", type=finite_float, help="clip mode: classifier-free guidance (default: the run's)"),
    p.add_argument("--onset", type=finite_float, help="clip mode: block onset in s (default: drawn from training)"),
    p.add_argument("--duration", type=positive_float, help="clip mode: block duration in s (default: drawn from training)"),
    p.add_argument("--events", type=Path, help="run mode: a BIDS events.tsv (onset, duration, trial_type[, modulation])"),
    p.add_argument("--tr", type=positive_float, help="run mode: repetition time in s"),
    p.add_argument("--frames", type=positive_int, help="run mode: frames per run"),
    p.add_argument("--subjects", type=positive_int, default=1, help="run mode: generated subjects, one run each"),
    p.add_argument("--task", help="run mode: BIDS task label, letters and digits (default: the events file's name)"),
    p.add_argument("--steps", type=positive_int, help="sampling steps (default: the run's)"),
    p.add_argument("--sampler", choices=["ddpm", "ddim", "analytic"]),
    p.add_argument("--generator", choices=["ours", "gaussian"], default="ours",
                   help="the deep generator, or the run's Gaussian background model (no network, seconds)"),
    p.add_argument("--out", type=Path, required=True, help="BIDS dataset folder (created; other tasks in it stay)"),
))
def _sample(args):
    from fmrisynth.checkpoint import latest_checkpoint
    from fmrisynth.config import save_config
    from fmrisynth.generate import sample as gen

    # the run's own config is the base: its sampling settings and seed hold unless YAML, --set or a flag changes them
    base = latest_checkpoint(gen.find_run(args.checkpoint)) / "config.yaml"
    cfg = config_from(args, base=base, diffusion__sample_steps=args.steps, diffusion__sampler=args.sampler,
                      diffusion__guidance=args.guidance)  # fmt: skip
    d = cfg.diffusion
    if args.events is None:
        paths = gen.sample(args.checkpoint, args.condition, args.n, args.out, guidance=d.guidance, steps=d.sample_steps,
                           sampler=d.sampler, seed=cfg.seed, onset_s=args.onset, duration_s=args.duration,
                           kind=args.generator)  # fmt: skip
        made = f"{len(paths)} clips of {args.condition}"
    else:
        clip_flags = [f for f in ("condition", "guidance", "onset", "duration") if getattr(args, f) is not None]
        paths = gen.sample_runs(args.checkpoint, args.events, args.tr, args.frames, args.out, subjects=args.subjects,
                                task=args.task, seed=cfg.seed, steps=d.sample_steps, sampler=d.sampler, progress=True,
                                clip_flags=clip_flags, kind=args.generator)  # fmt: skip
        made = f"{len(paths)} runs ({args.frames} frames, TR {args.tr:g} s)"
    save_config(cfg, args.out / "config.yaml")
    print(f"{made} -> {args.out}")


@verb("evaluate", "generated clips beside real clips of other people: task maps, realism, references", lambda p: (
    p.add_argument("--real", required=True, help="STORE[:split] of real clips (default split test)"),
    p.add_argument("--generated", required=True, help="directory of samples, or STORE[:split] (real vs real)"),
    p.add_argument("--reference", help="STORE:split of real clips of other subjects (default: the real store's train)"),
    p.add_argument("--out", type=Path, required=True),
    p.add_argument("--runs", action="store_true", help="whole runs: --real and --generated are BIDS folders of runs "
                   "of one design (simulate / sample --events); writes OUT/runs.json"),
))
def _evaluate(args):
    from fmrisynth.evaluate.run import evaluate
    from fmrisynth.evaluate.summary import text_table

    if args.runs:
        from fmrisynth.evaluate.runs import compare_folders, runs_table, write_runs

        result = compare_folders(args.real, args.generated, seed=config_from(args).seed)
        print(runs_table(result))
        return print(f"metrics: {write_runs(result, args.out)}")
    m = evaluate(args.real, args.generated, args.out, config_from(args), reference=args.reference)
    print(text_table(m))
    for note in m["notes"]:
        print(f"note: {note}")
    print(f"metrics: {args.out / 'metrics.json'}")


@verb("report", "one self-contained HTML report from an evaluation", lambda p: (
    p.add_argument("--eval", type=Path, required=True, help="output directory of evaluate"),
    p.add_argument("--scaling", type=Path, help="output directory of scale"),
    p.add_argument("--out", type=Path, required=True, help="report.html to write"),
    p.add_argument("--peer", action="append", metavar="NAME=EVAL_DIR",
                   help="another generator's evaluation, shown beside the generated clips (repeatable)"),
))
def _report(args):
    from fmrisynth.evaluate.report import load_peers, write_report

    print(f"report: {write_report(args.eval, args.out, args.scaling, peers=load_peers(args.peer or []))}")


@verb("demo", "the whole chain on the embedded simulator, on a laptop", lambda p: (
    p.add_argument("--out", type=Path, default=Path("runs/demo")),
    p.add_argument("--minutes", type=positive_float, help="wall-clock budget for the whole run"),
    p.add_argument("--fresh", action="store_true", help="redo finished stages"),
))
def _demo(args):
    from fmrisynth.pipeline import demo

    cfg = config_from(args)
    demo(cfg, args.out, minutes=args.minutes or 10.0, fresh=args.fresh)


@verb("scale", "train and evaluate a grid of model sizes, fit metric vs parameters", lambda p: (
    p.add_argument("--sizes", required=True, help="comma-separated presets, e.g. s0.3m,s1m,s3m"),
    p.add_argument("--budget", help="per size: steps (2000) or FLOPs (3e13flops); default train.steps"),
    p.add_argument("--out", type=Path, required=True),
))
def _scale(args):
    from fmrisynth.pipeline import scale

    cfg = config_from(args)  # the demo's recipe (BASE): same data
    sizes = [s for s in (args.sizes or "").split(",") if s]
    result = scale(cfg, sizes, args.budget or str(cfg.train.steps), args.out)
    fit = result["fits"].get("map_corr_mean", {}).get("loglinear")
    if fit:
        print(f"map_corr_mean = {fit['a']:.3f} + {fit['b']:.3f} log10(params)  (95% CI of slope {fit['b_ci'][0]:.3f}..{fit['b_ci'][1]:.3f})")
    print(f"table and fits: {args.out / 'scaling.json'}")


@verb("presets", "list the model presets with parameters and GFLOPs",
      lambda p: p.add_argument("--json", action="store_true", help="print a JSON list instead of a table"))
def _presets(args):
    import json

    from fmrisynth.models.presets import all_presets, presets_table

    rows = all_presets()
    print(json.dumps(rows, indent=1) if args.json else presets_table(rows))


# --- entry point --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fmrisynth",
        description="Generate realistic whole-brain task fMRI and evaluate it like a neuroscientist.",
    )
    parser.add_argument("--version", action="version", version=f"fmrisynth {fmrisynth.__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (help_text, add_arguments) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, help="YAML config (overrides the defaults)")
        p.add_argument("--seed", type=nonnegative_int, help="one seed for numpy and torch")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. train.steps=500")
        add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    prefix = f"fmrisynth {args.verb}"
    shown: set[str] = set()

    def show(message, *_, **__) -> None:  # one line per warning, each said once
        if str(message) not in shown:
            shown.add(str(message))
            print(f"{prefix}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            if getattr(args, "out", None) is not None:
                check_out(args.out, OUT_KIND.get(args.verb, "dir"))
            config_from(args)  # every verb, even one that uses no setting, refuses a bad config before any work
            return int(HANDLERS[args.verb](args) or 0)
    except FmrisynthError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the file system failed us mid-run (disk full, permissions changed): one line too
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prefix}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fmrisynth {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Virtual experiments on the demo's model: whole runs of seen and unseen designs, analysed by nilearn.

    .venv/bin/python benchmarks/virtual_experiments.py --demo runs/demo [--subjects 3] [--quick]

"Before I scan 30 people, what will my design give me?" For four designs on the demo's grid
(TR 0.72 s, 284 frames, as an HCP MOTOR run) this writes ``--subjects`` generated runs with
``fmrisynth sample --events`` (library call ``sample_runs``) and, as the yardstick, the same design
through the simulator (``simulate --events``, people the model never saw: simulator subjects 21..),
and analyses both the same way, with the README's ``first_level_from_bids`` arguments:

* designs: ``motor_run`` (seen: the MOTOR:rh blocks of a real MOTOR schedule), ``blocks_6s`` (unseen:
  6 s blocks of three conditions; training blocks last 12-30 s), ``event_related`` (unseen: 1 s
  events, jittered 2-6 s gaps), ``mixed`` (unseen: 12 s blocks and 1 s events of three conditions),
  ``heldout_mixed`` (unseen, fixed before the response model v2 was measured and never tuned on:
  16 s LANGUAGE:story and SOCIAL:mental blocks with 2 s MOTOR:rh events between them);
* per condition: r of the generated group z map (mean over subjects of nilearn z maps) with the
  simulated one of the same design (``r_sim``), and r of each group z map with the real group map (the same GLM on the demo's real held-out MOTOR/WM/... runs, test-split subjects) and with the
  response model's canonical map; top-1 among the run's conditions and among all seven; ROI (top
  5 % of the real map) time course against the design's HRF regressor;
* lag-1 autocorrelation at the start, middle and end of the runs (one pass: no seams to hide, but a
  model trained on 20-frame clips could drift over 284 frames) beside real and simulated runs;
* speed: seconds per generated run (model loading included) and frames per second.

Targets (issue 13): 284 frames in <= 60 s on 2 cores; top-1 correct for every condition; map r
with the real group map >= 0.9 x the simulated run's. JSON: benchmarks/results/virtual_experiments.json.

``--response FILE`` generates with another response model (``response.npz``) in place of the run's
own, and ``--fit-response`` first fits one on the demo's store (with the events of its runs: the
store's events.tsv, or the demo's sim/ EVs for a store prepared before that file existed) and
writes it there: the task is the response model's (the denoiser makes the task-free background),
so two response models compare on one trained denoiser. ``--background simulated`` needs no
trained denoiser: a generated run is the simulator's background of new people (simulator subjects
41.., ``sim.task_amplitude=0``), z-scored, plus the response model's prediction through a drawn
subject: the response model alone, against a background as real as the yardstick's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from fmrisynth.config import load_config
from fmrisynth.data.hcp import find_runs
from fmrisynth.data.run_events import FILE, RunEvent
from fmrisynth.data.design import Event, design_tsv
from fmrisynth.data.sim_events import simulate_design
from fmrisynth.data.store import ClipStore
from fmrisynth.generate import codec
from fmrisynth.generate.sample import find_run, load_generator, sample_runs
from fmrisynth.models.response import ResponseModel
from fmrisynth.tasks import HCP_TR, PARADIGMS, design_regressors

RESULTS = Path(__file__).resolve().parent / "results"
FRAMES = 284
WINDOWS = {"start": slice(0, 20), "middle": slice(132, 152), "end": slice(264, 284)}
README_ARGS = dict(space_label="", derivatives_folder=".", signal_scaling=False)  # README, "Virtual experiments"


# --- designs ------------------------------------------------------------------------------------


def make_designs(seed: int, run_s: float) -> dict[str, tuple[str, list[Event]]]:
    """name -> (seen|unseen, events) on the hcp7 conditions of the demo."""
    rng = np.random.default_rng(seed)
    motor = PARADIGMS["MOTOR"].schedule(rng)["rh"]
    designs = {"motor_run": ("seen", [Event("MOTOR:rh", o, d) for o, d in motor])}

    def sequence(items: list[tuple[str, float]], gap: tuple[float, float], start: float) -> list[Event]:
        order, out, t = rng.permutation(len(items)), [], start
        for k in order:
            condition, duration = items[k]
            if t + duration > run_s - 16:  # leave the HRF room to return before the run ends
                break
            out.append(Event(condition, round(t, 2), duration))
            t += duration + rng.uniform(*gap)
        return sorted(out)

    three = ["MOTOR:rh", "WM:2bk_faces", "LANGUAGE:story"]
    designs["blocks_6s"] = ("unseen", sequence([(c, 6.0) for c in three for _ in range(4)], (8.0, 12.0), 6.0))
    designs["event_related"] = ("unseen", sequence([(c, 1.0) for c in three[:2] for _ in range(20)], (2.0, 6.0), 4.0))
    mixed = ["EMOTION:fear", "GAMBLING:win", "SOCIAL:mental"]
    items = [(c, 12.0) for c in mixed for _ in range(2)] + [(c, 1.0) for c in mixed for _ in range(4)]
    designs["mixed"] = ("unseen", sequence(items, (3.0, 7.0), 4.0))
    held = [(c, 16.0) for c in ("LANGUAGE:story", "SOCIAL:mental") for _ in range(3)] + [("MOTOR:rh", 2.0)] * 6
    designs["heldout_mixed"] = ("unseen", sequence(held, (4.0, 8.0), 4.0))
    return designs


def use_response(demo: Path, path: Path | None, fit: bool) -> ResponseModel | None:
    """Make every generator loaded from now on use the response model at ``path`` (fitted first if ``fit``)."""
    if path is None:
        return None
    if fit:
        store = ClipStore(demo / "store")
        events = None
        if not (store.path / FILE).is_file():  # a store prepared before events.tsv: the runs' EVs
            events = {(r.subject, r.task, r.run): sorted(RunEvent(c, o, d) for c, items in r.events.items() for o, d in items)
                      for r in find_runs(demo / "sim")}  # fmt: skip
        t0 = time.perf_counter()
        rank = load_config(demo / "config.yaml", []).stage2.response_rank
        ResponseModel.fit(store, store.indices(split="train"), rank, events).save(path)
        print(f"fitted the response model in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
    model, extras = ResponseModel.load(path), codec.latent_extras
    codec.latent_extras = lambda latents: replace(extras(latents), response=model)
    return model


def response_runs(model: ResponseModel, design: list[Event], events_file: Path, cfg, out: Path, task: str,
                  mask: np.ndarray, seed: int) -> None:  # fmt: skip
    """``--background simulated``: the design's runs as simulated background of new people, z-scored per
    voxel as prepare does, plus the response model's prediction through a freshly drawn subject."""
    import nibabel as nib

    quiet = replace(cfg, sim=replace(cfg.sim, task_amplitude=0.0))
    simulate_design(quiet, out, events_file, HCP_TR, FRAMES, task, first_subject=40, progress=False)
    rng = np.random.default_rng(seed)
    events = list(design)
    for bold in sorted(out.glob("sub-*/func/*_bold.nii.gz")):
        img = nib.load(bold)
        data = np.asarray(img.dataobj, dtype=np.float32)  # (X, Y, Z, T)
        x = data[mask].T  # (T, V)
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
        x += model.predict(events, HCP_TR, FRAMES, model.maps(model.draw_subjects(1, rng)[0]))
        data[:] = 0
        data[mask] = x.T
        header = img.header.copy()
        header.set_data_dtype(np.float32)
        nib.save(nib.Nifti1Image(data, img.affine, header), bold)


# --- analysis -----------------------------------------------------------------------------------


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def lag1(run: np.ndarray) -> dict[str, float]:
    """Lag-1 autocorrelation and sd of voxel time courses (run (T, V)) in each window and overall.

    The run's mean and linear trend are removed once, over the whole run; a window's value is then
    its share of the run's lag-1 products over its share of the energy, so start, middle, end and
    whole are estimates of one quantity (20-frame windows demeaned on their own are biased by -1/20
    and lose the slow part of the autocorrelation). A drift of the background over a long run would
    show as start != end.
    """
    x = run.astype(np.float64) - run.mean(0)
    t = np.arange(len(x)) - (len(x) - 1) / 2
    x -= np.outer(t, (t @ x) / (t @ t))
    out = {}
    for name, part in {**WINDOWS, "whole": slice(None)}.items():
        w = x[part]
        out[name] = float(np.sum(w[1:] * w[:-1]) / np.sum(w[:-1] ** 2))
        out[f"sd_{name}"] = float(np.sqrt((w**2).mean()))
    return out


def first_level(imgs, events, mask_img, tr: float, conditions: list[str]) -> tuple[dict, list]:
    """nilearn z maps (V,) per condition, one dict per run (imgs/events lists), and the runs (T, V)."""
    import nibabel as nib
    from nilearn.glm.first_level import FirstLevelModel

    mask = nib.load(mask_img).get_fdata() > 0
    zs, runs = [], []
    for img, ev in zip(imgs, events):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            glm = FirstLevelModel(t_r=tr, mask_img=mask_img, signal_scaling=False, slice_time_ref=0.0).fit(img, ev)
            zs.append({c: np.nan_to_num(glm.compute_contrast(c).get_fdata()[mask]) for c in conditions if c in set(ev["trial_type"])})
        runs.append(np.asarray(nib.load(img).dataobj, dtype=np.float32)[mask].T)  # (T, V)
    return zs, runs


def bids_first_level(root: Path, task: str, mask_img: str, conditions: list[str]) -> tuple[dict, list]:
    """The README's route: first_level_from_bids on the dataset as written, then one z map per condition."""
    from nilearn.glm.first_level import first_level_from_bids

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models, imgs, events, _ = first_level_from_bids(root, task, mask_img=mask_img, **README_ARGS)
    return first_level([i[0] for i in imgs], [e[0] for e in events], mask_img, models[0].t_r, conditions)


def real_group_maps(demo: Path, mask_img: str, conditions: list[str]) -> tuple[dict, list]:
    """The real group map per condition: mean z over the test subjects' runs of its paradigm."""
    import pandas as pd

    store = ClipStore(demo / "store")
    subjects = sorted(set(store.manifest.loc[store.manifest["split"] == "test", "subject"].astype(str)))
    maps, lags = {}, []
    for paradigm in dict.fromkeys(c.split(":")[0] for c in conditions):
        imgs, events = [], []
        for s in subjects:
            for pe in ("LR", "RL"):
                folder = demo / "sim" / s / "MNINonLinear" / "Results" / f"tfMRI_{paradigm}_{pe}"
                rows = [pd.read_csv(f, sep="\t", header=None, usecols=[0, 1], names=["onset", "duration"]).assign(
                        trial_type=f"{paradigm}:{f.stem}") for f in sorted((folder / "EVs").glob("*.txt"))]  # fmt: skip
                imgs.append(str(folder / f"tfMRI_{paradigm}_{pe}.nii.gz"))
                events.append(pd.concat(rows, ignore_index=True))
        mine = [c for c in conditions if c.startswith(paradigm + ":")]
        zs, runs = first_level(imgs, events, mask_img, HCP_TR, mine)
        for c in mine:
            maps[c] = np.mean([z[c] for z in zs], 0)
        if paradigm == "MOTOR":
            lags = [lag1(r) for r in runs if len(r) >= FRAMES]
    return maps, lags


def analyse(zs: list[dict], runs: list, design: list[Event], real: dict, response: dict, tr: float) -> dict:
    """Per condition: map r with the real and response maps, top-1, ROI course vs HRF; run autocorrelation."""
    present = list(dict.fromkeys(e.condition for e in design))
    out = {}
    for c in present:
        group = np.mean([z[c] for z in zs], 0)
        r_all = {k: corr(group, m) for k, m in real.items()}
        roi = real[c] >= np.quantile(real[c], 0.95)
        mine = [e for e in design if e.condition == c]
        hrf = design_regressors([e.onset_s for e in mine], [e.duration_s for e in mine], len(runs[0]), tr)[:, 0]
        course = np.mean([((r - r.mean(0)) / (r.std(0) + 1e-6))[:, roi].mean(1) for r in runs], 0)
        out[c] = {"r_real": r_all[c], "group": group, "r_response": corr(group, response[c]), "response_vs_real": corr(response[c], real[c]),
                  "top1_run": max(present, key=r_all.get) == c, "top1_all": max(r_all, key=r_all.get) == c,
                  "roi_hrf_r": corr(course, hrf)}  # fmt: skip
    lags = [lag1(r) for r in runs]
    out["lag1"] = {k: float(np.mean([x[k] for x in lags])) for k in lags[0]}
    return out


# --- the experiment -----------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, required=True, help="a demo output folder (diffusion/, sim/, store/)")
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: one design, one subject")
    p.add_argument("--out", type=Path, default=RESULTS / "virtual_experiments.json")
    p.add_argument("--real-cache", type=Path, help="an .npz to keep the real group maps in between runs")
    p.add_argument("--response", type=Path, help="generate with this response.npz instead of the run's own")
    p.add_argument("--fit-response", action="store_true", help="fit --response on the demo's store first")
    p.add_argument("--designs", help="comma-separated subset of the designs")
    p.add_argument("--background", choices=["denoiser", "simulated"], default="denoiser",
                   help="what a generated run's background is: the trained denoiser's, or the simulator's (no training)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("FMRISYNTH_THREADS", "2")))
    swapped = use_response(args.demo, args.response, args.fit_response)
    store = ClipStore(args.demo / "store")
    mask_img = str(store.path / "mask.nii.gz")
    if args.background == "simulated":
        if swapped is None:
            raise SystemExit("--background simulated takes --response (and --fit-response to fit it)")
        model, checkpoint = swapped, None
    else:
        gen = load_generator(args.demo)
        model, checkpoint = gen.extras.response, str(gen.source)
        del gen
    conditions = store.conditions
    response = {c: model.mean[k, 0] for k, c in enumerate(model.conditions)}
    t0 = time.perf_counter()
    if args.real_cache and args.real_cache.is_file():  # the real maps do not change between runs on one demo
        with np.load(args.real_cache) as f:
            real, real_lag = {c: f[c] for c in conditions}, json.loads(str(f["lag"]))
    else:
        real, real_lag = real_group_maps(args.demo, mask_img, conditions)
        if args.real_cache:
            np.savez(args.real_cache, lag=json.dumps(real_lag), **real)
    print(f"real group maps of {len(real)} conditions in {time.perf_counter() - t0:.0f} s", flush=True)
    designs = make_designs(args.seed, FRAMES * HCP_TR)
    if args.quick:
        designs = {"motor_run": designs["motor_run"]}
    elif args.designs:
        designs = {k: designs[k] for k in args.designs.split(",")}
    result = {"demo": str(args.demo.resolve()), "background": args.background, "checkpoint": checkpoint, "frames": FRAMES,
              "tr": HCP_TR, "subjects": args.subjects, "response": str(args.response or "the run's own"),
              "trial_sd": dict(zip(model.conditions, np.asarray(model.trial_sd).tolist())),
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "real_lag1": {k: float(np.mean([x[k] for x in real_lag])) for k in real_lag[0]} if real_lag else None,
              "designs": {}}  # fmt: skip
    cfg = load_config(None, [f"seed={args.seed}", f"sim.subjects={args.subjects}", "sim.runs=LR", "sim.grid=6mm"])
    with tempfile.TemporaryDirectory(prefix="virtual-") as tmp:
        tmp = Path(tmp)
        for name, (kind, design) in designs.items():
            task = name.replace("_", "")
            (tmp / f"{name}.tsv").write_text(design_tsv(design))
            load = time.perf_counter()
            if args.background == "simulated":
                response_runs(model, design, tmp / f"{name}.tsv", cfg, tmp / f"gen-{name}", task, store.mask, args.seed)
            else:
                sample_runs(args.demo, tmp / f"{name}.tsv", HCP_TR, FRAMES, tmp / f"gen-{name}", args.subjects, task,
                            args.seed, args.steps, progress=True)  # fmt: skip
            seconds = (time.perf_counter() - load) / args.subjects
            load_avg = os.getloadavg()[0]  # 2 cores shared with other work: > 2 means the timing is inflated
            simulate_design(cfg, tmp / f"sim-{name}", tmp / f"{name}.tsv", HCP_TR, FRAMES, task, first_subject=20,
                            progress=False)  # fmt: skip
            present = list(dict.fromkeys(e.condition for e in design))
            gz, gruns = bids_first_level(tmp / f"gen-{name}", task, mask_img, present)
            sz, sruns = bids_first_level(tmp / f"sim-{name}", task, mask_img, present)
            entry = {"kind": kind, "events": len(design), "conditions": present, "seconds_per_run": seconds, "load_avg_1min": load_avg,
                     "frames_per_s": FRAMES / seconds, "generated": analyse(gz, gruns, design, real, response, HCP_TR),
                     "simulated": analyse(sz, sruns, design, real, response, HCP_TR)}  # fmt: skip
            for c in present:
                g, sim = entry["generated"][c], entry["simulated"][c]
                g["ratio_to_simulated"] = g["r_real"] / sim["r_real"]
                g["r_sim"] = corr(g.pop("group"), sim.pop("group"))
            result["designs"][name] = entry
            print(table({name: entry}, header=name == next(iter(designs))), flush=True)
    result["targets"] = targets(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print("\n" + table(result["designs"]) + f"\nreal MOTOR runs: lag-1 {result['real_lag1']}\n"
          + json.dumps(result["targets"], indent=1) + f"\n-> {args.out}")  # fmt: skip


def targets(result: dict) -> dict:
    per = [(d, c, e["generated"][c]) for d, e in result["designs"].items() for c in e["conditions"]]
    return {"max_seconds_per_run": max(e["seconds_per_run"] for e in result["designs"].values()),
            "speed_ok": all(e["seconds_per_run"] <= 60 for e in result["designs"].values()),
            "top1_run_all_correct": all(g["top1_run"] for _, _, g in per),
            "top1_all_correct": all(g["top1_all"] for _, _, g in per),
            "min_ratio_to_simulated": min(g["ratio_to_simulated"] for _, _, g in per),
            "min_r_generated_vs_simulated": min(g["r_sim"] for _, _, g in per),
            "ratio_ok": all(g["ratio_to_simulated"] >= 0.9 for _, _, g in per)}  # fmt: skip


def table(designs: dict, header: bool = True) -> str:
    """One row per design and condition: generated | simulated, side by side."""
    head = (f"{'design':<14}{'condition':<21}{'r real':>14}{'ratio':>7}{'r sim':>7}{'r resp':>14}{'top1 run/all':>16}"
            f"{'ROI~HRF':>14}{'s/run':>7}\n{'':<35}{'gen / sim':>14}{'':>14}{'gen / sim':>14}{'gen | sim':>16}"
            f"{'gen / sim':>14}\n")  # fmt: skip
    rows = []
    for name, e in designs.items():
        for c in e["conditions"]:
            g, s = e["generated"][c], e["simulated"][c]
            top = f"{'YN'[not g['top1_run']]}{'YN'[not g['top1_all']]} | {'YN'[not s['top1_run']]}{'YN'[not s['top1_all']]}"
            rows.append(f"{name:<14}{c:<21}{g['r_real']:>7.2f}/{s['r_real']:<6.2f}{g['ratio_to_simulated']:>7.2f}{g['r_sim']:>7.2f}"
                        f"{g['r_response']:>7.2f}/{s['r_response']:<6.2f}{top:>16}{g['roi_hrf_r']:>7.2f}/{s['roi_hrf_r']:<6.2f}"
                        f"{e['seconds_per_run']:>7.1f}")  # fmt: skip
        gl, sl = e["generated"]["lag1"], e["simulated"]["lag1"]
        rows.append(f"{'':<14}lag-1 run (start/mid/end)  gen {gl['whole']:.2f} ({gl['start']:.2f}/{gl['middle']:.2f}/"
                    f"{gl['end']:.2f})  sim {sl['whole']:.2f} ({sl['start']:.2f}/{sl['middle']:.2f}/{sl['end']:.2f})")  # fmt: skip
    return (head if header else "") + "\n".join(rows)


if __name__ == "__main__":
    main()

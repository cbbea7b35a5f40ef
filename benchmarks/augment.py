"""Does adding synthetic clips help a small lab's task classifier? Measured with its confidence interval.

    .venv/bin/python benchmarks/augment.py --demo runs/demo [--per-condition 20] [--repeats 5]

A lab has scanned 2-4 people and wants a classifier of the task condition of a clip. Its features
are the clip GLM betas of docs/design.md's evaluation protocol (OLS of each voxel on the HRF-convolved
block and an intercept); the classifier is a standardised L2 logistic regression (scikit-learn),
fixed in advance and not tuned on the test set. For k = 2, 3, 4 training subjects (``--repeats``
random sets drawn from the store's train split) it is trained on
  * real: the k subjects' real clips;
  * real + synthetic: the same plus ``--per-condition`` clips per condition from
    ``fmrisynth.generate.SyntheticClips`` (made on the fly by the demo's model);
  * synthetic only: the synthetic clips alone (does the generator carry the task at all?);
and scored on every clip of the held-out test-split subjects. The gain (real + synthetic minus
real) gets a 95 % bootstrap interval over test subjects (clusters: clips of one person are not
independent) and over the repeats (which k people were scanned). Note: the generator saw the whole train split (10 people),
so "synthetic" brings in what it learned from more people than the lab's k, as a pretrained
generator would. JSON: benchmarks/results/augment.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from fmrisynth.data.store import ClipStore
from fmrisynth.tasks import block_regressor

RESULTS = Path(__file__).resolve().parent / "results"


def betas(clips: np.ndarray, timing: np.ndarray) -> np.ndarray:
    """Clip GLM task betas (N, V) of clips (N, T, V) with (onset_s, duration_s, tr) per clip (N, 3)."""
    out = np.empty((len(clips), clips.shape[2]), np.float32)
    for i, (y, (onset, duration, tr)) in enumerate(zip(clips, timing)):
        x = np.stack([block_regressor([onset], [duration], len(y), tr), np.ones(len(y))], 1)  # (T, 2)
        out[i] = (np.linalg.pinv(x) @ y.astype(np.float64))[0]
    return out


def classifier():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=5000))


def cluster_bootstrap(correct: dict[str, np.ndarray], subjects: np.ndarray, rng: np.random.Generator, n: int = 2000):
    """Mean accuracy per arm and the gain's 95 % CI, resampling test subjects and training sets.

    ``correct``: arm -> (repeats, clips) 0/1; ``subjects``: (clips,) the test subject of each clip.
    Both levels vary in a real study: who is tested, and which k people the lab happened to scan.
    """
    people = np.unique(subjects)
    rows = [np.flatnonzero(subjects == s) for s in people]
    diff = correct["real+synthetic"] - correct["real"]  # (repeats, clips)
    gains = []
    for _ in range(n):
        pick = np.concatenate([rows[k] for k in rng.integers(len(people), size=len(people))])
        sets = rng.integers(len(diff), size=len(diff))
        gains.append(diff[sets][:, pick].mean())
    lo, hi = np.percentile(gains, [2.5, 97.5])
    out = {arm: float(c.mean()) for arm, c in correct.items()}
    out.update(gain=out["real+synthetic"] - out["real"], gain_ci95=[float(lo), float(hi)])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, required=True, help="a demo output folder (diffusion/, store/)")
    p.add_argument("--per-condition", type=int, default=20, help="synthetic clips per condition")
    p.add_argument("--repeats", type=int, default=5, help="random sets of training subjects per k")
    p.add_argument("--ks", default="2,3,4", help="numbers of real training subjects")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "augment.json")
    args = p.parse_args()
    import torch

    from fmrisynth.generate import SyntheticClips

    torch.set_num_threads(int(os.environ.get("FMRISYNTH_THREADS", "2")))
    store = ClipStore(args.demo / "store")
    m = store.manifest
    rows = {split: np.flatnonzero(m["split"].to_numpy() == split) for split in ("train", "test")}
    timing = m[["onset_s", "duration_s", "tr"]].to_numpy(float)
    t0 = time.perf_counter()
    features = {split: betas(np.stack([store.item(int(i)) for i in r]), timing[r]) for split, r in rows.items()}
    labels = {split: m["label"].to_numpy()[r] for split, r in rows.items()}
    subjects = {split: m["subject"].astype(str).to_numpy()[r] for split, r in rows.items()}
    print(f"real betas: {len(rows['train'])} train, {len(rows['test'])} test clips in {time.perf_counter() - t0:.0f} s")

    synthetic = SyntheticClips(args.demo, None, args.per_condition * len(store.conditions), seed=args.seed)
    assert synthetic.generator.conditions == store.conditions
    t0 = time.perf_counter()
    clips = np.stack([synthetic[i][0].numpy()[:, synthetic.generator.mask] for i in range(len(synthetic))])  # (N, T, V)
    seconds_per_clip, load_avg = (time.perf_counter() - t0) / len(synthetic), os.getloadavg()[0]
    table = np.array([row[2:] for row in synthetic.table])  # (N, 3) onset, duration, tr
    syn_x, syn_y = betas(clips, table), np.array([row[1] for row in synthetic.table])
    print(f"{len(synthetic)} synthetic clips, {seconds_per_clip:.2f} s each")

    rng = np.random.default_rng(args.seed)
    people = np.unique(subjects["train"])
    result = {"demo": str(args.demo.resolve()), "checkpoint": str(synthetic.generator.denoiser.checkpoint),
              "conditions": store.conditions, "synthetic_per_condition": args.per_condition,
              "seconds_per_synthetic_clip": seconds_per_clip, "load_avg_1min": load_avg, "test_clips": len(rows["test"]),
              "test_subjects": len(np.unique(subjects["test"])), "classifier": "StandardScaler + LogisticRegression(C=0.01) on clip GLM betas",
              "k": {}}  # fmt: skip
    synthetic_only = classifier().fit(syn_x, syn_y).predict(features["test"]) == labels["test"]
    for k in [int(v) for v in args.ks.split(",")]:
        correct, n_train = {"real": [], "real+synthetic": [], "synthetic only": []}, []
        for _ in range(args.repeats):
            chosen = np.isin(subjects["train"], rng.choice(people, k, replace=False))
            n_train.append(int(chosen.sum()))
            x, y = features["train"][chosen], labels["train"][chosen]
            correct["real"].append(classifier().fit(x, y).predict(features["test"]) == labels["test"])
            both = classifier().fit(np.vstack([x, syn_x]), np.concatenate([y, syn_y]))
            correct["real+synthetic"].append(both.predict(features["test"]) == labels["test"])
            correct["synthetic only"].append(synthetic_only)
        stats = cluster_bootstrap({a: np.array(c, float) for a, c in correct.items()}, subjects["test"], rng)
        result["k"][str(k)] = {**stats, "real_train_clips_mean": float(np.mean(n_train))}
        print(f"k={k}: real {stats['real']:.3f}  real+synthetic {stats['real+synthetic']:.3f}  "
              f"synthetic only {stats['synthetic only']:.3f}  gain {stats['gain']:+.3f} "
              f"[{stats['gain_ci95'][0]:+.3f}, {stats['gain_ci95'][1]:+.3f}]", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

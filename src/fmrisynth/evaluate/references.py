"""The yardsticks a generated set is judged beside (docs/design.md protocol, step 3).

* ``reference_set``: real clips of people outside the test set, as many per condition as were
  generated, so that "as good as real data from other people" is measured by the same code;
* ``codec_set``: the stage-1 VQ-GAN's reconstructions of those reference clips, when the generated
  clips name the run that made them: what decoding alone loses;
* ``truth_maps``: on simulated data, the simulator's true condition maps, found through the store's
  provenance (``prepare`` records the dataset root; ``simulate`` writes ``<subject>/truth/``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fmrisynth.data.store import ClipStore
from fmrisynth.errors import FmrisynthError
from fmrisynth.evaluate.clips import ClipSet, open_generated, split_spec
from fmrisynth.publish import resolve_recorded
from fmrisynth.run_info import read_run_info

CHUNK = 32  # frames through the VQ-GAN at once


def subset(clips: ClipSet, rows: np.ndarray) -> ClipSet:
    """The clips at table positions ``rows``, in that order."""
    rows = np.asarray(rows, int)
    return ClipSet(clips.name, clips.table.iloc[rows].reset_index(drop=True), lambda i: clips.reader(int(rows[i])),
                   clips.n_frames, [clips.sources[i] for i in rows], clips.checkpoints)


def reference_set(spec: str, store: ClipStore, real: ClipSet, counts: dict[str, int], seed: int) -> tuple[ClipSet, dict]:
    """Real clips of subjects not in ``real`` (the test set), ``counts[condition]`` of each, seeded.

    With a single subject in play (a store split by run) no other person exists, so other runs of
    that subject are the reference instead, and ``split_by`` says so. Returns the clips and what
    was chosen (source, split_by, n per condition).
    """
    path, split = split_spec(spec, None)
    if split is None:
        raise FmrisynthError(f"--reference {spec}: name the split, e.g. {spec}:train")
    if not (path / "store.json").is_file():
        raise FmrisynthError("no clip store for the reference here (--reference STORE:split)", path)
    pool = open_generated(spec, store, real.n_frames)
    test = real.table
    subjects = set(test["subject"]) - {""}
    candidates = pool.table
    keep, split_by = ~candidates["subject"].isin(subjects | {""}).to_numpy(), "subject"  # unknown: could be one
    if not keep.any() and len(subjects) == 1 and set(candidates["subject"]) == subjects:
        runs = set(zip(test["subject"], test["run"]))
        keep, split_by = ~np.array([u in runs for u in zip(candidates["subject"], candidates["run"])]), "run"
    if not keep.any():
        raise FmrisynthError("the reference holds no clips of subjects outside the test set", path)
    rng = np.random.default_rng(seed)
    rows, n = [], {}
    for condition, count in counts.items():
        own = np.flatnonzero(keep & (candidates["condition"] == condition).to_numpy())
        chosen = np.sort(rng.choice(own, size=min(count, len(own)), replace=False))
        rows.append(chosen)
        n[condition] = len(chosen)
    return subset(pool, np.concatenate(rows)), {"source": spec, "split_by": split_by, "n_per_condition": n}


def codec_set(generated: ClipSet, reference: ClipSet, store: ClipStore) -> tuple[ClipSet | None, str]:
    """The reference clips as the generator's VQ-GAN reconstructs them (read lazily, clip by clip).

    The generated clips' sidecars name their stage-2 checkpoint ``<run>/checkpoints/step_N``; the
    run's ``stage2.json`` names the VQ-GAN. Returns (None, why) when the run cannot be found.
    """
    if not generated.checkpoints:
        return None, "the generated clips name no run (no checkpoint in their sidecars)"
    checkpoint = Path(generated.checkpoints[0])
    try:
        vqgan_checkpoint = Path(read_run_info(checkpoint, checkpoint)["vqgan_checkpoint"])
    except FmrisynthError as e:
        return None, f"cannot read the VQ-GAN of the generating run ({e})"
    import torch  # only when there is a codec to run

    from fmrisynth.generate.codec import load_vqgan

    model = load_vqgan(vqgan_checkpoint, store.mask).to("cuda" if torch.cuda.is_available() else "cpu")
    name = f"VQ-GAN {vqgan_checkpoint} reconstructions of {reference.name}"
    clips = ClipSet(name, reference.table, lambda i: _reconstruct(model, store, reference.reader(i)),
                    reference.n_frames, [f"{s} (reconstructed)" for s in reference.sources])
    return clips, str(vqgan_checkpoint)


def _reconstruct(model, store: ClipStore, y: np.ndarray) -> np.ndarray:
    """Encode, quantise and decode one clip (T, V) -> (T, V) float32, as ``reconstruct_store`` does."""
    import torch

    from fmrisynth.generate.codec import decode

    with torch.no_grad():
        device = next(model.parameters()).device
        x = torch.from_numpy(store.unmask(np.asarray(y, np.float32)))[:, None].to(device)  # (T, 1, D, H, W)
        z = torch.cat([model.latent(chunk) for chunk in x.split(CHUNK)])  # (T, c, d, h, w)
        volumes = decode(model, z[None], CHUNK)[0].cpu().numpy()  # (T, D, H, W)
    return volumes[:, store.mask]


def truth_maps(store: ClipStore, conditions: list[str]) -> tuple[np.ndarray | None, str]:
    """The simulator's true condition maps (C, V), averaged over the store's subjects, on its grid.

    ``prepare`` records the dataset root in the store header, relative to store.json (stores of
    older versions: as given, absolute or from the working directory); a dataset written by ``simulate``
    holds ``simulation.json`` and ``<subject>/truth/<TASK>_<ev>.nii.gz`` on its own grid, which is
    resampled (linearly) onto the store's when they differ. Returns (None, why) for other data.
    """
    import nibabel as nib

    from fmrisynth.data.simulator import PROVENANCE, is_simulation, truth_map_files  # the simulator owns its layout

    recorded = store.header.get("summary", {}).get("root", "")
    for root in dict.fromkeys([resolve_recorded(recorded, store.path / "store.json"), Path(recorded)]):
        if is_simulation(root):
            break
    else:
        return None, f"not simulated data (the store's dataset has no {PROVENANCE})"
    subjects = sorted(set(store.manifest["subject"].astype(str)))
    maps = []
    for condition in conditions:
        files = truth_map_files(root, subjects, condition)
        try:
            first = nib.load(files[0])
            mean = sum(np.asarray(nib.load(f).dataobj, np.float32) for f in files) / len(files)  # (D, H, W)
        except (OSError, ValueError, EOFError) as e:
            return None, f"cannot read the simulator's truth maps ({e})"
        img = nib.Nifti1Image(mean, first.affine)
        if mean.shape != tuple(store.grid_shape) or not np.allclose(first.affine, store.affine, atol=1e-3):
            from nilearn.image import resample_img

            img = resample_img(img, target_affine=store.affine, target_shape=store.grid_shape,
                               interpolation="linear", force_resample=True, copy_header=True)
        maps.append(np.asarray(img.dataobj, np.float32)[store.mask])
    return np.stack(maps), str(root)

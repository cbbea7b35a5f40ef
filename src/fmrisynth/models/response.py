"""The task response model: what the task adds to a clip, per condition, voxel by voxel.

The task explains 1-3 % of a z-scored clip's variance, so a diffusion loss over whole clips hardly
sees it (docs/design.md, "Why stage 2 looks like this"). This model takes the task out explicitly, as
CorrDiff takes out the mean by regression before diffusing the rest:

* Basis: the canonical HRF with its temporal and dispersion derivatives (nilearn,
  ``tasks.HRF_BASIS``), so latency and width may differ from voxel to voxel and subject to subject.
* Fit: a GLM of each run with its whole design in view, on the frames its training clips cover.
  A clip's regressors come from every event of its run (the store's ``events.tsv``,
  data/run_events.py), including blocks that ended before the clip began, whose response still
  decays in it (``LEAD_S``). The baseline is rest, the run's implicit baseline: clips are cut from
  runs z-scored as a whole, so a run has one constant, plus the slow cosine drifts a user's nilearn
  GLM removes (``response_fit.HIGH_PASS_HZ``); a clip's own mean is not removed, which would fold
  the previous block's tail and the missing rest into the map. Conditions of the runs that are not
  labels (LANGUAGE:math, HCP's other EVs) are nuisance regressors (canonical HRF, Gaussian prior),
  so no label absorbs them. Per subject s: ``B[s]`` (C, K, V); the population map ``mean[c]`` pools
  all subjects' normal equations. The fit knows only what the clips show: where blocks alternate
  with little rest between them (EMOTION fear/neut), the rest level is poorly determined.
* Subjects differ: the subject maps minus the mean are reduced to a few principal components,
  without the estimation noise each subject map carries (a subject with few clips has noisy maps;
  noise that is not removed would count twice, once here and once in the residual diffusion). A
  generated subject draws unit-normal scores on those components, so clip-level maps vary across
  generated subjects as they do across real ones.
* Trials differ: each block's amplitude varies around its subject's map (habituation, attention).
  Each event's gain is estimated twice, on the first and on the second half of its response; the
  two share the gain but not the noise, so their covariance within runs estimates the variance of
  the gains without the estimation noise (``trial_sd`` per condition; an upper bound, as any
  event-to-event misfit counts too). ``draw_gains`` gives a design's events their own gains.
* Predict: the response of any design, a sum over events of basis regressors times the (drawn or
  mean) maps: ``predict(events, tr, frames, maps) -> (T, V)``, for a 14 s clip or a whole run.

It assumes the task adds linearly (event responses sum, scaled by their gains), and cannot make
what a linear model of the design cannot: nonlinear interactions (refractory saturation of close
events), learning across a run, responses of conditions it never saw.

``response.npz`` is written and read here only (``save`` / ``load``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from fmrisynth.data.design import Event  # the one record of an event (a design's, a clip's context)
from fmrisynth.data.run_events import read_run_events, run_key
from fmrisynth.errors import FmrisynthError
from fmrisynth.models.response_fit import K, embed, normal_equations, pooled_fit, subject_fits, training_runs
from fmrisynth.models.response_fit import trial_gain_sd
from fmrisynth.tasks import HRF_BASIS, design_regressors

LEAD_S = 32.0  # the HRF basis lasts about 30 s: an event that ended this long before a clip still shows in it


@dataclass
class ResponseModel:
    """Voxelwise HRF-basis responses per condition, a low-rank model of subjects around them, trial gains."""

    conditions: list[str]
    mean: np.ndarray  # (C, K, V) population maps
    components: np.ndarray  # (R, C, K, V) subject deviations, scaled to unit-variance scores
    subject_scores: dict[str, np.ndarray]  # training subject -> (R,) its scores
    noise_sd: np.ndarray  # (V,) residual sd of the fit, for reference
    nuisance: list[str] = field(default_factory=list)  # conditions of the runs that are not labels
    nuisance_mean: np.ndarray | None = None  # (Q, K, V) their population maps
    trial_sd: np.ndarray | None = None  # (C,) sd of an event's gain around 1, beyond estimation noise

    def __post_init__(self):
        if self.nuisance_mean is None:
            self.nuisance_mean = np.zeros((len(self.nuisance), *self.mean.shape[1:]), np.float32)
        if self.trial_sd is None:
            self.trial_sd = np.zeros(len(self.conditions), np.float32)

    def maps(self, scores: np.ndarray | None = None) -> np.ndarray:
        """Response maps (C, K, V) of a subject with ``scores`` (R,); the population's when None."""
        if scores is None or len(self.components) == 0:
            return self.mean
        return self.mean + np.tensordot(scores, self.components, axes=1)

    def draw_subjects(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Scores (n, R) of ``n`` new subjects: each generated clip or run draws its own."""
        return rng.standard_normal((n, len(self.components)))

    def draw_gains(self, events: list[Event], rng: np.random.Generator) -> list[Event]:
        """``events`` with their modulations times a gain ``1 + trial_sd[c] * N(0, 1)`` each (at least 0).

        A model without trial variability (all ``trial_sd`` 0, as every model fitted before it was
        estimated) returns the events unchanged and draws nothing from ``rng``.
        """
        sd = dict(zip(self.conditions, np.asarray(self.trial_sd, float)))
        if not any(sd.get(e.condition, 0.0) > 0 for e in events):
            return list(events)
        z = rng.standard_normal(len(events))
        return [e._replace(modulation=e.modulation * max(0.0, 1.0 + sd.get(e.condition, 0.0) * z[k]))
                for k, e in enumerate(events)]  # fmt: skip

    def predict(self, events: list[Event], tr: float, frames: int, maps: np.ndarray | None = None) -> np.ndarray:
        """The expected response (T, V) of a design; ``maps`` (C, K, V) default to the population's.

        Onsets may be negative (events before the first frame, whose response is still decaying);
        nuisance conditions respond with their population maps.
        """
        maps = self.mean if maps is None else maps
        known = {**dict(zip(self.nuisance, self.nuisance_mean)), **dict(zip(self.conditions, maps))}
        unknown = sorted({e.condition for e in events} - set(known))
        if unknown:
            raise FmrisynthError(f"unknown condition {unknown[0]!r}; this model knows {', '.join(self.conditions)}")
        lead = int(np.ceil(max([0.0] + [-e.onset_s for e in events]) / tr))  # frames before the first one
        out = np.zeros((lead + frames, maps.shape[-1]), np.float32)
        for name in dict.fromkeys(e.condition for e in events):
            mine = [e for e in events if e.condition == name]
            x = design_regressors([e.onset_s + lead * tr for e in mine], [e.duration_s for e in mine], lead + frames,
                                  tr, HRF_BASIS, [e.modulation for e in mine])  # fmt: skip  # (T, K)
            out += (x @ known[name]).astype(np.float32)  # (T, K) @ (K, V) -> (T, V)
        return out[lead:]

    def clip_response(self, clips, i: int) -> np.ndarray:
        """The task response (T, V) of clip ``i`` of a clip store: every event of its run that shows in it,
        through its subject's maps if the subject was fitted (the population's otherwise)."""
        row = clips.manifest.iloc[i]
        maps = self.maps(self.subject_scores.get(str(row["subject"])))
        return self.predict(clip_events(clips, i, self.conditions + self.nuisance), float(row["tr"]),
                            clips.item_shape[0], maps)  # fmt: skip

    # --- fitting -----------------------------------------------------------------------------------

    @classmethod
    def fit(cls, clips, rows, rank: int = 4, events: dict | None = None) -> "ResponseModel":
        """Fit on the clips ``rows`` of a clip store (``data.store.ClipStore``, masked items (T, V)).

        The manifest gives each clip's run, condition, start frame and TR; ``events`` (default: the
        store's ``events.tsv``) every event of every run, ``{(subject, task, run): [RunEvent]}``. A
        store without that file (prepared by an older fmrisynth) still fits, with a warning: the
        labelled blocks of each run come back from the manifest, the other conditions cannot.
        """
        m = clips.manifest.iloc[np.asarray(rows)]
        conditions = [c for c in clips.conditions if c in set(m["condition"])]
        if not conditions:
            raise FmrisynthError("no clips to fit the response model on", clips.path)
        if events is None:
            events, complete = read_run_events(clips)
            if not complete:
                warnings.warn(f"{clips.path}: no events.tsv (prepared by an older fmrisynth): the response model sees "
                              "the labelled blocks of each run but not the other conditions, which fold into its maps; "
                              "run `fmrisynth prepare` again to model them", stacklevel=2)  # fmt: skip
        runs = training_runs(m, events, clips)
        seen = {e.condition for run in runs for e in run.events}
        modelled = [c for c in conditions if c in seen]  # a label without events (rest clips) is the baseline: 0
        nuisance = sorted(seen - set(conditions))
        subjects = sorted({run.subject for run in runs})
        n_mod, n_vox = len(modelled) * K, clips.item_shape[-1]
        xtx, xty, yty, n_obs = normal_equations(runs, clips, modelled + nuisance, subjects)
        pooled, xtx = pooled_fit(xtx, xty, yty, n_obs, n_mod)
        full, inv_diag, noise_var = subject_fits(xtx, xty, yty, n_obs, pooled, n_mod)
        subject = full[:, :n_mod].reshape(len(subjects), len(modelled), K, n_vox)  # (S, Cm, K, V)
        mean_m = pooled[:n_mod].reshape(len(modelled), K, n_vox)
        components, scores = cls._subject_components(subject - mean_m[None], inv_diag, noise_var, rank)
        denoised = mean_m[None] + np.tensordot(scores, components, axes=1)  # (S, Cm, K, V): low-rank subject maps
        templates = {s: np.concatenate([denoised[i].reshape(n_mod, n_vox), full[i][n_mod:]])
                     for i, s in enumerate(subjects)}  # fmt: skip  # subject -> (P, V)
        gains = trial_gain_sd(runs, clips, modelled + nuisance, modelled, templates)
        index = [conditions.index(c) for c in modelled]
        return cls(conditions, embed(mean_m, index, len(conditions)), embed(components, index, len(conditions), 1),
                   {s: scores[i].astype(np.float32) for i, s in enumerate(subjects)},
                   np.sqrt(noise_var).astype(np.float32), nuisance,
                   pooled[n_mod:].reshape(len(nuisance), K, n_vox).astype(np.float32),
                   embed(gains, index, len(conditions)))  # fmt: skip

    @staticmethod
    def _subject_components(dev: np.ndarray, inv_diag: np.ndarray, noise_var: np.ndarray,
                            rank: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Principal components of subject deviations dev (S, C, K, V), without their estimation noise.

        The estimation noise of subject s on map element (c, k, v) has variance ``inv_diag[s, ck] *
        noise_var[v]``: derivative maps and noisy voxels carry far more of it than canonical maps in
        quiet ones. The deviations are whitened by its mean over subjects, so that the noise is even
        across the D = C*K*V dimensions and adds about ``E_s`` (its whitened energy) to the diagonal
        of the S x S Gram matrix and little elsewhere. Subjects with few blocks are noisier than
        others, so each one's own E_s is taken off the diagonal, and a component is kept only where
        what remains exceeds what pure noise leaves there: the Marchenko-Pastur edge, ((1 + sqrt(S /
        D))^2 - 1) times the mean E_s, or the spread the noise shows below zero (the most negative
        eigenvalue: subject differences only add). A kept component is shrunk to its signal share.
        """
        n_sub = dev.shape[0]
        if n_sub < 2 or rank < 1:
            return np.zeros((0, *dev.shape[1:])), np.zeros((n_sub, 0))
        flat = dev.reshape(n_sub, -1)  # (S, C*K*V)
        unit = np.outer(np.maximum(inv_diag.mean(0), 1e-12), np.maximum(noise_var, 1e-12)).ravel()  # (C*K*V,)
        white = flat / np.sqrt(unit)
        noise_energy = (inv_diag / np.maximum(inv_diag.mean(0), 1e-12)).sum(1) * len(noise_var)  # (S,)
        signal, u = np.linalg.eigh(white @ white.T - np.diag(noise_energy))  # ascending
        signal, u = signal[::-1], u[:, ::-1]
        edge = max(noise_energy.mean() * ((1 + np.sqrt(n_sub / flat.shape[1])) ** 2 - 1), -signal[-1])
        keep = int(min((signal > edge).sum(), rank))
        share = signal[:keep] / (signal[:keep] + noise_energy.mean())  # of each component's energy
        components = (u[:, :keep].T @ flat) * np.sqrt(share / (n_sub - 1))[:, None]  # (R, C*K*V)
        scores = u[:, :keep] * np.sqrt(n_sub - 1)  # (S, R) unit-variance scores
        return components.reshape(keep, *dev.shape[1:]), scores

    # --- file format -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``response.npz`` atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        subjects = sorted(self.subject_scores)
        np.savez(tmp, conditions=np.array(self.conditions), mean=self.mean, components=self.components,
                 subjects=np.array(subjects, dtype=str), noise_sd=self.noise_sd, trial_sd=self.trial_sd,
                 nuisance=np.array(self.nuisance, dtype=str), nuisance_mean=self.nuisance_mean,
                 scores=np.stack([self.subject_scores[s] for s in subjects]) if subjects else np.zeros((0, 0)))  # fmt: skip
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ResponseModel":
        """Read ``response.npz``; one written before nuisance maps and trial gains has none of either."""
        try:
            with np.load(path, allow_pickle=False) as f:
                subjects, scores = f["subjects"].tolist(), f["scores"]
                model = cls([str(c) for c in f["conditions"]], f["mean"], f["components"],
                            {s: scores[i] for i, s in enumerate(subjects)}, f["noise_sd"],
                            [str(c) for c in f["nuisance"]] if "nuisance" in f else [],
                            f["nuisance_mean"] if "nuisance" in f else None,
                            f["trial_sd"] if "trial_sd" in f else None)  # fmt: skip
        except (OSError, KeyError, ValueError) as e:
            raise FmrisynthError(f"not a readable response model ({e})", path) from None
        if not all(np.isfinite(a).all() for a in (model.mean, model.components, model.nuisance_mean, model.trial_sd)):
            raise FmrisynthError("response model holds non-finite maps", path)
        return model


def clip_events(clips, i: int, known: list[str]) -> list[Event]:
    """The events of clip ``i``'s run that show in it (``context_events``), of the conditions ``known``."""
    return context_events(clips.manifest.iloc[i], _store_events(clips), known, clips.item_shape[0])


def context_events(row, run_events: dict, known: list[str], frames: int) -> list[Event]:
    """The events of the run of manifest ``row`` (a clip of ``frames`` frames) that show in the clip, onsets
    in seconds from its first frame (events up to ``LEAD_S`` before it are negative), of the conditions ``known``.

    A clip's response is that of all of them: its own block, and the tails of the blocks before it.
    """
    tr = float(row["tr"])
    start = int(row["start_frame"]) * tr
    end = start + frames * tr
    return [Event(e.condition, e.onset_s - start, e.duration_s) for e in run_events.get(run_key(row), [])
            if e.condition in known and e.onset_s < end and e.onset_s + e.duration_s > start - LEAD_S]  # fmt: skip


@lru_cache(maxsize=4)
def _store_events(clips) -> dict:
    return read_run_events(clips)[0]

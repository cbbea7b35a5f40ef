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
  GLM removes (``HIGH_PASS_HZ``); a clip's own mean is not removed, which would fold the previous
  block's tail and the missing rest into the map. Conditions of the runs that are not labels
  (LANGUAGE:math, HCP's other EVs) are nuisance regressors (canonical HRF, Gaussian prior), so no
  label absorbs them. Per subject s: ``B[s]`` (C, K, V); the population map ``mean[c]`` pools all
  subjects' normal equations. The fit knows only what the clips show: where blocks alternate with
  little rest between them (EMOTION fear/neut), the rest level is poorly determined.
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
from fmrisynth.data.run_events import RunEvent, read_run_events, run_key
from fmrisynth.errors import FmrisynthError
from fmrisynth.tasks import HRF_BASIS, design_regressors

K = 3  # basis functions per condition
LEAD_S = 32.0  # the HRF basis lasts about 30 s: an event that ended this long before a clip still shows in it
HIGH_PASS_HZ = 0.01  # nilearn's default cosine drift: the slow drift a user's first-level GLM removes


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
        runs = _training_runs(m, events, clips)
        seen = {e.condition for run in runs for e in run.events}
        modelled = [c for c in conditions if c in seen]  # a label without events (rest clips) is the baseline: 0
        nuisance = sorted(seen - set(conditions))
        subjects = sorted({run.subject for run in runs})
        n_mod, n_vox = len(modelled) * K, clips.item_shape[-1]
        xtx, xty, yty, n_obs = _normal_equations(runs, clips, modelled + nuisance, subjects)
        pooled, xtx = _pooled_fit(xtx, xty, yty, n_obs, n_mod)
        full, inv_diag, noise_var = _subject_fits(xtx, xty, yty, n_obs, pooled, n_mod)
        subject = full[:, :n_mod].reshape(len(subjects), len(modelled), K, n_vox)  # (S, Cm, K, V)
        mean_m = pooled[:n_mod].reshape(len(modelled), K, n_vox)
        components, scores = cls._subject_components(subject - mean_m[None], inv_diag, noise_var, rank)
        denoised = mean_m[None] + np.tensordot(scores, components, axes=1)  # (S, Cm, K, V): low-rank subject maps
        templates = {s: np.concatenate([denoised[i].reshape(n_mod, n_vox), full[i][n_mod:]])
                     for i, s in enumerate(subjects)}  # fmt: skip  # subject -> (P, V)
        gains = _trial_sd(runs, clips, modelled + nuisance, modelled, templates)
        index = [conditions.index(c) for c in modelled]
        return cls(conditions, _embed(mean_m, index, len(conditions)), _embed(components, index, len(conditions), 1),
                   {s: scores[i].astype(np.float32) for i, s in enumerate(subjects)},
                   np.sqrt(noise_var).astype(np.float32), nuisance,
                   pooled[n_mod:].reshape(len(nuisance), K, n_vox).astype(np.float32),
                   _embed(gains, index, len(conditions)))  # fmt: skip

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


# --- the design of the training runs ----------------------------------------------------------------


@dataclass
class _Run:
    """One run of the training split: its subject, TR, events and the clips cut from it."""

    subject: str
    tr: float
    items: np.ndarray  # store indices of its training clips
    starts: np.ndarray  # their first frames in the run
    events: list[RunEvent]

    def design(self, clips, names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Regressors x (F, P) of the conditions ``names`` and data y (F, V) on the F frames the clips cover,
        both with the run's baseline (constant) and cosine drift projected out; the frames (F,) and
        the orthonormal baseline basis (F, d), which the gain estimates project out of theirs."""
        from nilearn.glm.first_level.design_matrix import create_cosine_drift

        n_frames, n = clips.item_shape[0], int(self.starts.max()) + clips.item_shape[0]
        y, covered = np.zeros((n, clips.item_shape[-1])), np.zeros(n, bool)
        for i, start in zip(self.items, self.starts):
            y[start : start + n_frames] = clips.item(int(i))  # overlapping clips hold the same frames
            covered[start : start + n_frames] = True
        frames = np.flatnonzero(covered)
        x = np.hstack([self.regressors([e for e in self.events if e.condition == c], n) for c in names])[frames]
        q = np.linalg.qr(create_cosine_drift(HIGH_PASS_HZ, np.arange(n) * self.tr)[frames])[0]  # (F, d)
        return x - q @ (q.T @ x), y[frames] - q @ (q.T @ y[frames]), frames, q

    def regressors(self, events: list[RunEvent], n: int) -> np.ndarray:
        """HRF-basis regressors (n, K) of ``events`` over the run's first n frames."""
        return design_regressors([e.onset_s for e in events], [e.duration_s for e in events], n, self.tr, HRF_BASIS)


def _training_runs(m, events: dict, clips) -> list[_Run]:
    """The runs of the manifest rows ``m`` (their clips, start frames, TR) with their events."""
    m = m.assign(_key=[run_key(row) for row in m.itertuples()])
    runs = []
    for key in sorted(set(m["_key"])):
        group = m[m["_key"] == key]
        if key not in events:
            raise FmrisynthError(f"run {'/'.join(key)} has clips but no events in {Path(clips.path) / 'events.tsv'}",
                                 clips.path)  # fmt: skip
        runs.append(_Run(key[0], float(group["tr"].iloc[0]), group["index"].to_numpy(int),
                         group["start_frame"].to_numpy(int), events[key]))  # fmt: skip
    return runs


def _normal_equations(runs: list[_Run], clips, names: list[str],
                      subjects: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:  # fmt: skip
    """Per subject, the normal equations of the GLM of its runs over the conditions ``names`` (K
    regressors each, P in all): x'x (S, P, P) and x'y (S, P, V); and over all runs y'y (V,) and the
    frames' degrees of freedom left by each run's baseline and drift."""
    s_of, n_vox, P = {s: i for i, s in enumerate(subjects)}, clips.item_shape[-1], len(names) * K
    xtx, xty = np.zeros((len(subjects), P, P)), np.zeros((len(subjects), P, n_vox))
    yty, n_obs = np.zeros(n_vox), 0
    for run in runs:
        x, y, _, q = run.design(clips, names)  # (F, P), (F, V) with the run's baseline and drift taken out
        xtx[s_of[run.subject]] += x.T @ x
        xty[s_of[run.subject]] += x.T @ y
        yty += (y**2).sum(0)
        n_obs += len(y) - q.shape[1]
    return xtx, xty, yty, n_obs


def _pooled_fit(xtx: np.ndarray, xty: np.ndarray, yty: np.ndarray, n_obs: int,
                n_mod: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The population maps (P, V) from all subjects' normal equations pooled, and the subjects' x'x
    (S, P, P) with the nuisance conditions' prior added. The first ``n_mod`` regressors are the
    modelled conditions', the rest the nuisance conditions' (K each)."""
    P = xtx.shape[1]
    # Nuisance conditions get the canonical HRF only: they are there to be absorbed, and their
    # derivatives would be nearly collinear with the labelled blocks they border in the clips.
    drop = np.arange(P) >= n_mod
    drop[n_mod::K] = False
    xtx[:, drop], xtx[:, :, drop], xty[:, drop] = 0, 0, 0  # _solve leaves them out
    pooled = _solve(xtx.sum(0), xty.sum(0))[0]  # (P, V)
    # A nuisance map is a priori like a labelled one (mean square tau2 per element): where the clips
    # show a nuisance condition only as the tail of the block it borders, the prior keeps it from
    # taking that block's response (ridge = noise variance / tau2, the Gaussian prior's).
    sigma2 = float(np.clip(yty.sum() - np.sum(pooled * xty.sum(0)), 0, None)) / max(n_obs - P, 1) / len(yty)
    tau2 = float(np.mean(pooled[:n_mod:K] ** 2)) if n_mod else 1.0
    penalty = np.zeros(P)
    penalty[n_mod::K] = sigma2 / max(tau2, 1e-12)
    xtx = xtx + np.diag(penalty)[None]  # each subject's fit carries the whole prior; the pooled fit once
    return _solve(xtx.sum(0) - (len(xtx) - 1) * np.diag(penalty), xty.sum(0))[0], xtx


def _subject_fits(xtx: np.ndarray, xty: np.ndarray, yty: np.ndarray, n_obs: int, pooled: np.ndarray,
                  n_mod: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Each subject's own fit: its maps (S, P, V), the population's (``pooled``) for a modelled
    condition it has no events of; the estimation variance of its modelled maps per unit noise
    (S, n_mod); and the residual noise variance (V,) of all subjects' fits."""
    full, inv_diag, explained, n_par = [], np.zeros((len(xtx), n_mod)), np.zeros(len(yty)), 0
    for s in range(len(xtx)):
        beta, active, inv = _solve(xtx[s], xty[s])
        have = np.repeat(active[:n_mod].reshape(-1, K).any(1), K)  # subject s has events of the condition
        inv_diag[s] = np.diag(inv)[:n_mod]
        explained += np.einsum("pv,pv->v", beta, xty[s])
        n_par += int(active.sum())
        full.append(np.concatenate([np.where(have[:, None], beta[:n_mod], pooled[:n_mod]), beta[n_mod:]]))
    return np.stack(full), inv_diag, np.clip(yty - explained, 0, None) / max(n_obs - n_par, 1)


def _embed(values: np.ndarray, index: list[int], n: int, axis: int = 0) -> np.ndarray:
    """``values`` of the modelled conditions at ``index`` of ``n`` conditions along ``axis`` (float32);
    0 for the others (a label without events, e.g. rest clips, is the baseline)."""
    shape = list(np.shape(values))
    shape[axis] = n
    out = np.zeros(shape, np.float32)
    out[(slice(None),) * axis + (index,)] = values
    return out


def _ridge(a: np.ndarray) -> np.ndarray:
    return 1e-6 * max(float(np.trace(a)) / len(a), 1e-12) * np.eye(len(a))


def _solve(xtx: np.ndarray, xty: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares from normal equations over the regressors that occur (the others are 0):
    beta (P, V), which occur (P,), and the inverse (P, P): the betas' covariance per unit noise."""
    diag = np.diag(xtx)
    active = diag > 1e-9 * max(float(diag.max()), 1e-300)
    beta, inv = np.zeros(xty.shape), np.zeros(xtx.shape)
    if active.any():
        block = np.linalg.inv(xtx[np.ix_(active, active)] + _ridge(xtx[np.ix_(active, active)]))
        beta[active], inv[np.ix_(active, active)] = block @ xty[active], block
    return beta, active, inv


def _trial_sd(runs: list[_Run], clips, names: list[str], modelled: list[str], maps: dict) -> np.ndarray:
    """The sd of events' gains around 1 per modelled condition (Cm,), beyond estimation noise.

    With its subject's maps held fixed, every event of a run gets two gains, one on the first and
    one on the second half of the frames its response covers, all fitted jointly (neighbouring
    events overlap) on what the nuisance conditions leave. Both gains of an event carry its trial
    gain; their noises (different stretches of background) are nearly independent, so the
    covariance of the two across a run's events of one condition estimates the variance of the
    gains and not the noise (a split-half covariance, as a noise ceiling is estimated). It is taken
    within runs: what differs between runs (phase encoding, session) is not a trial's gain. The
    responses are predicted with the subject's low-rank maps (``maps``: subject -> its condition
    maps, then its nuisance maps, (P, V)), not its raw fit, whose noise would add to each predicted
    response's energy and shrink the gains. A condition with one event per run has no estimate of
    its own and takes the pooled one.

    Limits, measured on the simulator (4 subjects, MOTOR, every EV a label): a true sd of 0.4 comes
    back as 0.26 (0.32 with 3x the task amplitude), 0 as 0.05-0.09; and any misfit that differs from
    event to event (a nuisance condition's HRF, which the canonical regressor cannot follow)
    counts as trial variability.
    """
    n_mod = len(modelled) * K
    found: dict[tuple, list[np.ndarray]] = {}  # (run, condition) -> both halves' gains of each event
    for k, run in enumerate(runs):
        x, y, frames, q = run.design(clips, names)
        beta = maps[run.subject]
        y = y - x[:, n_mod:] @ beta[n_mod:]  # (F, V): the modelled conditions' responses and the noise
        n, parts, mine = int(frames[-1]) + 1, [], []  # parts: (regressors (F, K), condition's maps (K, V))
        for e in (e for e in run.events if e.condition in modelled):
            xe = run.regressors([e], n)[frames]  # (F, K)
            peak = np.abs(xe[:, 0])
            if peak.max() == 0:
                continue
            support = np.flatnonzero(peak > 0.1 * peak.max())
            middle = support[len(support) // 2] if len(support) else 0
            c = modelled.index(e.condition)
            xe -= q @ (q.T @ xe)
            parts += [(xe * (np.arange(len(frames)) < middle)[:, None], beta[c * K : (c + 1) * K]),
                      (xe * (np.arange(len(frames)) >= middle)[:, None], beta[c * K : (c + 1) * K])]  # fmt: skip
            mine.append((e.condition, len(support) >= 4))
        if not parts:
            continue
        # Least squares of y on the parts' responses x_i @ b_i (F, V), without making them: their inner
        # products are sums of (x_i' x_j) * (b_i b_j') over K x K.
        gram = np.array([[np.sum((xi.T @ xj) * (bi @ bj.T)) for xj, bj in parts] for xi, bi in parts])
        rhs = np.array([np.sum((xi.T @ y) * bi) for xi, bi in parts])
        gains = np.linalg.lstsq(gram, rhs, rcond=None)[0].reshape(-1, 2)  # (E, 2)
        for (condition, seen), g in zip(mine, gains):
            if seen:  # the clips show enough of its response to split it
                found.setdefault((k, condition), []).append(g)
    products, dof = np.zeros(len(modelled)), np.zeros(len(modelled))
    for (_, condition), pairs in found.items():
        if len(pairs) >= 2:
            d = np.array(pairs) - np.mean(pairs, 0)  # (n, 2): deviations from the run's mean gain
            products[modelled.index(condition)] += d[:, 0] @ d[:, 1]
            dof[modelled.index(condition)] += len(pairs) - 1
    variance = np.where(dof > 0, products / np.maximum(dof, 1), products.sum() / max(dof.sum(), 1))
    return np.sqrt(np.clip(variance, 0, None))


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

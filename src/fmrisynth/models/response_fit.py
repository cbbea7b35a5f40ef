"""How ``ResponseModel.fit`` (models/response.py) gets its numbers: the GLM of the training runs.

response.py holds the model (its maps, subjects and trial gains, prediction, ``response.npz``) and
says what is fitted and why; this module holds how: each training run's design on the frames its
clips cover, with its baseline and drift projected out (``Run``), the normal equations pooled over
subjects and solved per subject, and the split-half estimate of the trial gains' sd
(``trial_gain_sd``). ``ResponseModel.fit`` calls these in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmrisynth.data.run_events import RunEvent, run_key
from fmrisynth.errors import FmrisynthError
from fmrisynth.tasks import HRF_BASIS, design_regressors

K = 3  # basis functions per condition
HIGH_PASS_HZ = 0.01  # nilearn's default cosine drift: the slow drift a user's first-level GLM removes


# --- the design of the training runs ----------------------------------------------------------------


@dataclass
class Run:
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


def training_runs(m, events: dict, clips) -> list[Run]:
    """The runs of the manifest rows ``m`` (their clips, start frames, TR) with their events."""
    m = m.assign(_key=[run_key(row) for row in m.itertuples()])
    runs = []
    for key in sorted(set(m["_key"])):
        group = m[m["_key"] == key]
        if key not in events:
            raise FmrisynthError(f"run {'/'.join(key)} has clips but no events in {Path(clips.path) / 'events.tsv'}",
                                 clips.path)  # fmt: skip
        runs.append(Run(key[0], float(group["tr"].iloc[0]), group["index"].to_numpy(int),
                         group["start_frame"].to_numpy(int), events[key]))  # fmt: skip
    return runs


def normal_equations(runs: list[Run], clips, names: list[str],
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


def pooled_fit(xtx: np.ndarray, xty: np.ndarray, yty: np.ndarray, n_obs: int,
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


def subject_fits(xtx: np.ndarray, xty: np.ndarray, yty: np.ndarray, n_obs: int, pooled: np.ndarray,
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


def embed(values: np.ndarray, index: list[int], n: int, axis: int = 0) -> np.ndarray:
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


def trial_gain_sd(runs: list[Run], clips, names: list[str], modelled: list[str], maps: dict) -> np.ndarray:
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

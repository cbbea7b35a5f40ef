"""The task response model: what the task adds to a clip, per condition, voxel by voxel.

The task explains 1-3 % of a z-scored clip's variance, so a diffusion loss over whole clips hardly
sees it (DESIGN.md, "Why stage 2 looks like this"). This model takes the task out explicitly, as
CorrDiff takes out the mean by regression before diffusing the rest:

* Basis: the canonical HRF with its temporal and dispersion derivatives (nilearn,
  ``tasks.HRF_BASIS``), so latency and width may differ from voxel to voxel.
* Fit: per subject s and condition c, least squares of every voxel's clip time courses on the
  basis-convolved block (each clip's mean removed: clips are cut from runs z-scored as a whole):
  ``B[s, c]`` (K, V). The population map ``mean[c]`` pools all subjects' normal equations.
* Subjects differ: the subject maps minus the mean are reduced to a few principal components.
  Their singular values are shrunk by the estimation noise each subject map carries (a subject
  with few clips has noisy maps; noise that is not shrunk would count twice, once here and once in
  the residual diffusion). A generated subject draws unit-normal scores on those components, so
  clip-level maps vary across generated subjects as they do across real ones.
* Predict: the response of any design, a sum over events of basis regressors times the (drawn or
  mean) maps: ``predict(events, tr, frames, maps) -> (T, V)``, for a 14 s clip or a whole run.

``response.npz`` is written and read here only (``save`` / ``load``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmrisynth.errors import FmrisynthError
from fmrisynth.tasks import HRF_BASIS, design_regressors

K = 3  # basis functions per condition


@dataclass
class Event:
    """One block or event of a design: onsets and durations in seconds, an amplitude (modulation)."""

    condition: str
    onset_s: float
    duration_s: float
    amplitude: float = 1.0


@dataclass
class ResponseModel:
    """Voxelwise HRF-basis responses per condition, and a low-rank model of subjects around them."""

    conditions: list[str]
    mean: np.ndarray  # (C, K, V) population maps
    components: np.ndarray  # (R, C, K, V) subject deviations, scaled to unit-variance scores
    subject_scores: dict[str, np.ndarray]  # training subject -> (R,) its scores
    noise_sd: np.ndarray  # (V,) residual sd of the fit, for reference

    def maps(self, scores: np.ndarray | None = None) -> np.ndarray:
        """Response maps (C, K, V) of a subject with ``scores`` (R,); the population's when None."""
        if scores is None or len(self.components) == 0:
            return self.mean
        return self.mean + np.tensordot(scores, self.components, axes=1)

    def draw_subjects(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Scores (n, R) of ``n`` new subjects: each generated clip or run draws its own."""
        return rng.standard_normal((n, len(self.components)))

    def predict(self, events: list[Event], tr: float, frames: int, maps: np.ndarray | None = None) -> np.ndarray:
        """The expected response (T, V) of a design; ``maps`` (C, K, V) default to the population's."""
        maps = self.mean if maps is None else maps
        unknown = sorted({e.condition for e in events} - set(self.conditions))
        if unknown:
            raise FmrisynthError(f"unknown condition {unknown[0]!r}; this model knows {', '.join(self.conditions)}")
        out = np.zeros((frames, maps.shape[-1]), np.float32)
        for c, name in enumerate(self.conditions):
            mine = [e for e in events if e.condition == name]
            if mine:
                x = design_regressors([e.onset_s for e in mine], [e.duration_s for e in mine], frames, tr, HRF_BASIS,
                                      [e.amplitude for e in mine])  # fmt: skip  # (T, K)
                out += (x @ maps[c]).astype(np.float32)  # (T, K) @ (K, V) -> (T, V)
        return out

    # --- fitting -----------------------------------------------------------------------------------

    @classmethod
    def fit(cls, clips, rows, rank: int = 4) -> "ResponseModel":
        """Fit on the clips ``rows`` of a clip store (``data.store.ClipStore``, masked items (T, V)).

        The manifest gives each clip's condition, subject, onset, duration and TR.
        """
        m = clips.manifest.iloc[np.asarray(rows)]
        conditions = [c for c in clips.conditions if c in set(m["condition"])]
        if not conditions:
            raise FmrisynthError("no clips to fit the response model on", clips.path)
        subjects = sorted(m["subject"].astype(str).unique())
        c_of, s_of = {c: i for i, c in enumerate(conditions)}, {s: i for i, s in enumerate(subjects)}
        n_vox, frames = clips.item_shape[-1], clips.item_shape[0]
        xtx = np.zeros((len(subjects), len(conditions), K, K))
        xty = np.zeros((len(subjects), len(conditions), K, n_vox))
        yty = np.zeros(n_vox)
        n_obs = 0
        designs = {}
        for i, row in zip(rows, m.itertuples()):
            if row.condition not in c_of:
                continue
            key = (row.onset_s, row.duration_s, row.tr)
            if key not in designs:
                designs[key] = design_regressors([row.onset_s], [row.duration_s], frames, row.tr, HRF_BASIS)  # (T, K)
            x = designs[key] - designs[key].mean(0)  # (T, K): each clip's mean is its own intercept
            y = clips.item(int(i)).astype(np.float64)  # (T, V)
            y -= y.mean(0)
            s, c = s_of[str(row.subject)], c_of[row.condition]
            xtx[s, c] += x.T @ x
            xty[s, c] += x.T @ y
            yty += (y**2).sum(0)
            n_obs += frames - 1
        ridge = 1e-6 * np.eye(K)
        mean = np.linalg.solve(xtx.sum(0) + ridge, xty.sum(0))  # (C, K, V)
        have = np.trace(xtx, axis1=2, axis2=3) > 0  # (S, C): subject s has clips of c
        subject = np.where(have[..., None, None], np.linalg.solve(xtx + ridge, xty), mean[None])  # (S, C, K, V)
        # residual variance per voxel: what the subject fits leave of the clips' variance
        explained = np.einsum("sckv,sckv->v", subject, xty)
        dof = max(n_obs - have.sum() * K, 1)
        noise_var = np.clip(yty - explained, 0, None) / dof  # (V,)
        components, scores = cls._subject_components(subject - mean[None], xtx, have, noise_var, rank)
        return cls(conditions, mean.astype(np.float32), components.astype(np.float32),
                   {s: scores[i].astype(np.float32) for i, s in enumerate(subjects)}, np.sqrt(noise_var).astype(np.float32))  # fmt: skip

    @staticmethod
    def _subject_components(dev: np.ndarray, xtx: np.ndarray, have: np.ndarray, noise_var: np.ndarray,
                            rank: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Principal components of subject deviations dev (S, C, K, V), shrunk by estimation noise.

        In the S-dimensional Gram matrix of the deviations, the estimation noise of subject s adds
        about ``E|noise_s|^2 = sum_c tr((X'X)_sc^-1) * sum_v noise_var_v`` to each squared singular
        value (noise vectors in D = C*K*V dimensions are nearly orthogonal). Pure noise spreads
        those values up to the Marchenko-Pastur edge, (1 + sqrt(S / D))^2 times that energy: a
        component is kept only above the edge, and its energy is shrunk by the noise's.
        """
        n_sub = dev.shape[0]
        if n_sub < 2 or rank < 1:
            return np.zeros((0, *dev.shape[1:])), np.zeros((n_sub, 0))
        inv_trace = np.where(have, np.trace(np.linalg.pinv(xtx), axis1=2, axis2=3), 0.0)  # (S, C)
        noise_energy = float(inv_trace.sum(1).mean() * noise_var.sum())
        flat = dev.reshape(n_sub, -1)  # (S, C*K*V)
        u, sv, vt = np.linalg.svd(flat, full_matrices=False)  # (S, S), (S,), (S, C*K*V)
        edge = noise_energy * (1 + np.sqrt(n_sub / flat.shape[1])) ** 2
        keep = int(min((sv**2 > edge).sum(), rank))
        signal = np.sqrt(np.clip(sv**2 - noise_energy, 0, None))  # shrunk singular values
        scale = signal[:keep] / np.sqrt(n_sub - 1)  # sd of the scores along each component
        components = (vt[:keep] * scale[:, None]).reshape(keep, *dev.shape[1:])  # (R, C, K, V)
        scores = u[:, :keep] * np.sqrt(n_sub - 1)  # (S, R) unit-variance scores
        return components, scores

    # --- file format -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``response.npz`` atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        subjects = sorted(self.subject_scores)
        np.savez(tmp, conditions=np.array(self.conditions), mean=self.mean, components=self.components,
                 subjects=np.array(subjects, dtype=str), noise_sd=self.noise_sd,
                 scores=np.stack([self.subject_scores[s] for s in subjects]) if subjects else np.zeros((0, 0)))  # fmt: skip
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ResponseModel":
        try:
            with np.load(path, allow_pickle=False) as f:
                subjects, scores = f["subjects"].tolist(), f["scores"]
                model = cls([str(c) for c in f["conditions"]], f["mean"], f["components"],
                            {s: scores[i] for i, s in enumerate(subjects)}, f["noise_sd"])  # fmt: skip
        except (OSError, KeyError, ValueError) as e:
            raise FmrisynthError(f"not a readable response model ({e})", path) from None
        if not (np.isfinite(model.mean).all() and np.isfinite(model.components).all()):
            raise FmrisynthError("response model holds non-finite maps", path)
        return model

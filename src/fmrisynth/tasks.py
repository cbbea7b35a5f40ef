"""Task and condition registry: the seven HCP paradigms, their block designs, and the HRF regressor.

Block structures follow the HCP young-adult protocol (Barch et al., 2013, NeuroImage 80:169-189,
and the HCP S1200 reference manual): block durations, blocks per run, fixation blocks and frames per
run at TR 0.72 s. Condition names are ``PARADIGM:EV`` where EV is the name of HCP's EV file
(``EVs/<EV>.txt``), e.g. ``MOTOR:rh`` or ``WM:2bk_faces``.

Two condition sets:
  * ``hcp24``: all 24 conditions in the order of the real HCP betas in shared/data/hcp_parcel_task.
  * ``hcp7``: one representative condition per paradigm (the reference's seven classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmrisynth.errors import FmrisynthError

HCP_TR = 0.72


@dataclass(frozen=True)
class Paradigm:
    """One HCP task: its EVs and how a run is laid out.

    Attributes:
        name: HCP task name (``tfMRI_<name>_<PE>``).
        blocks: EV name -> (block duration in s, blocks per run).
        n_frames: frames per run at ``HCP_TR``.
        fixation_s: duration of one fixation block; ``n_fixation`` of them are spread between blocks.
        cue: EV name of an instruction cue that precedes every task block (MOTOR), with its length.
    """

    name: str
    blocks: dict[str, tuple[float, int]]
    n_frames: int
    fixation_s: float = 15.0
    n_fixation: int = 0
    cue: tuple[str, float] | None = None
    lead_in_s: float = 8.0

    @property
    def conditions(self) -> list[str]:
        evs = list(self.blocks) + ([self.cue[0]] if self.cue else [])
        return [f"{self.name}:{ev}" for ev in evs]

    @property
    def run_seconds(self) -> float:
        return self.n_frames * HCP_TR

    def schedule(self, rng: np.random.Generator) -> dict[str, list[tuple[float, float]]]:
        """A run's events: EV -> [(onset_s, duration_s), ...], blocks in a seeded random order.

        Blocks alternate between EVs as in HCP (no EV twice in a row when avoidable); fixation
        blocks are spread evenly between task blocks; everything fits inside the run.
        """
        pool = [ev for ev, (_, n) in self.blocks.items() for _ in range(n)]
        order: list[str] = []
        while pool:
            choices = [ev for ev in pool if not order or ev != order[-1]] or pool
            ev = choices[rng.integers(len(choices))]
            order.append(ev)
            pool.remove(ev)
        fix_after = set()
        if self.n_fixation:
            step = len(order) / (self.n_fixation + 1) if self.n_fixation < len(order) else 1
            fix_after = {int(round(step * (k + 1))) - 1 for k in range(self.n_fixation)}
        events: dict[str, list[tuple[float, float]]] = {ev: [] for ev in self.blocks}
        if self.cue:
            events[self.cue[0]] = []
        t = self.lead_in_s
        for i, ev in enumerate(order):
            if self.cue:
                events[self.cue[0]].append((t, self.cue[1]))
                t += self.cue[1]
            duration = self.blocks[ev][0]
            events[ev].append((t, duration))
            t += duration
            if i in fix_after:
                t += self.fixation_s
        if t > self.run_seconds:
            raise AssertionError(f"{self.name}: schedule of {t:.1f} s exceeds the run")
        return events


PARADIGMS: dict[str, Paradigm] = {
    p.name: p
    for p in [
        # 2 runs x 3 face + 3 shape blocks of 18 s; 8 s of fixation at the end.
        Paradigm("EMOTION", {"fear": (18.0, 3), "neut": (18.0, 3)}, n_frames=176),
        # 2 mostly-reward and 2 mostly-loss blocks of 8 trials x 3.5 s; 4 fixations of 15 s.
        Paradigm("GAMBLING", {"win": (28.0, 2), "loss": (28.0, 2)}, n_frames=253, n_fixation=4),
        # 4 story blocks (~30 s) interleaved with 4 math blocks (~20 s), no fixation.
        Paradigm("LANGUAGE", {"story": (30.0, 4), "math": (20.0, 4)}, n_frames=316),
        # 10 movement blocks of 12 s (2 each of lf, rf, lh, rh, t), each after a 3 s cue; 3 fixations.
        Paradigm(
            "MOTOR",
            {ev: (12.0, 2) for ev in ("lf", "rf", "lh", "rh", "t")},
            n_frames=284,
            n_fixation=3,
            cue=("cue", 3.0),
        ),
        # 3 relational and 3 matching blocks of 16 s; 3 fixations of 16 s.
        Paradigm(
            "RELATIONAL",
            {"relation": (16.0, 3), "match": (16.0, 3)},
            n_frames=232,
            fixation_s=16.0,
            n_fixation=3,
        ),
        # 5 video clips of 20 s (mental interaction or random motion); 5 fixations of 15 s.
        Paradigm("SOCIAL", {"mental": (20.0, 3), "rnd": (20.0, 2)}, n_frames=274, n_fixation=5),
        # 8 blocks of 27.5 s (0-back and 2-back x body, faces, places, tools); 4 fixations of 15 s.
        Paradigm(
            "WM",
            {f"{load}_{cat}": (27.5, 1) for load in ("0bk", "2bk") for cat in ("body", "faces", "places", "tools")},
            n_frames=405,
            n_fixation=4,
        ),
    ]
}

# Order of axis 1 of shared/data/hcp_parcel_task/HCP_example_taskactivations_data.h5.
HCP24: tuple[str, ...] = (
    "EMOTION:fear", "EMOTION:neut", "GAMBLING:win", "GAMBLING:loss", "LANGUAGE:story",
    "LANGUAGE:math", "MOTOR:cue", "MOTOR:lf", "MOTOR:rf", "MOTOR:lh", "MOTOR:rh", "MOTOR:t",
    "RELATIONAL:relation", "RELATIONAL:match", "SOCIAL:mental", "SOCIAL:rnd",
    "WM:0bk_body", "WM:0bk_faces", "WM:0bk_places", "WM:0bk_tools",
    "WM:2bk_body", "WM:2bk_faces", "WM:2bk_places", "WM:2bk_tools",
)  # fmt: skip

# One representative condition per paradigm: the task-vs-control contrast each paradigm was built for.
HCP7: tuple[str, ...] = (
    "EMOTION:fear", "GAMBLING:win", "LANGUAGE:story", "MOTOR:rh",
    "RELATIONAL:relation", "SOCIAL:mental", "WM:2bk_faces",
)  # fmt: skip

CONDITION_SETS = {"hcp7": HCP7, "hcp24": HCP24}


def condition_set(name: str) -> tuple[str, ...] | None:
    """The named condition set; ``None`` for ``"all"`` (every condition found in the events)."""
    if name == "all":
        return None
    if name not in CONDITION_SETS:
        raise FmrisynthError(f"unknown condition set {name!r}; choose hcp7, hcp24 or all")
    return CONDITION_SETS[name]


def paradigm_of(condition: str) -> Paradigm:
    name = condition.split(":", 1)[0]
    if name not in PARADIGMS:
        raise FmrisynthError(f"unknown condition {condition!r}; HCP conditions look like MOTOR:rh")
    return PARADIGMS[name]


HRF_BASIS = "glover + derivative + dispersion"  # canonical HRF, temporal and dispersion derivatives


def design_regressors(
    onsets_s: np.ndarray | list[float],
    durations_s: np.ndarray | list[float],
    n_frames: int,
    tr: float,
    hrf: str = "glover",
    amplitudes: np.ndarray | list[float] | None = None,
) -> np.ndarray:
    """HRF-convolved events sampled at the frame times ``tr * arange(n_frames)``: (n_frames, k).

    nilearn's ``compute_regressor`` (oversampling 16) so that every part of fmrisynth and a user's
    own nilearn GLM agree exactly. ``hrf`` is any nilearn HRF model: ``"glover"`` or ``"spm"`` give
    k = 1, ``HRF_BASIS`` gives k = 3 (canonical, temporal derivative, dispersion derivative).
    ``amplitudes`` (default 1) scale each event, as a ``modulation`` column of events.tsv does.
    """
    from nilearn.glm.first_level import compute_regressor

    onsets = np.atleast_1d(np.asarray(onsets_s, dtype=float))
    durations = np.atleast_1d(np.asarray(durations_s, dtype=float))
    amps = np.ones_like(onsets) if amplitudes is None else np.atleast_1d(np.asarray(amplitudes, dtype=float))
    k = 3 if "dispersion" in hrf else 2 if "derivative" in hrf else 1
    if onsets.size == 0:
        return np.zeros((n_frames, k))
    reg, _ = compute_regressor(np.vstack([onsets, durations, amps]), hrf, np.arange(n_frames) * tr, oversampling=16)
    return reg  # (n_frames, k)


def block_regressor(
    onsets_s: np.ndarray | list[float],
    durations_s: np.ndarray | list[float],
    n_frames: int,
    tr: float,
    hrf: str = "glover",
) -> np.ndarray:
    """The canonical-HRF block regressor (n_frames,) of docs/design.md's evaluation protocol and the simulator."""
    return design_regressors(onsets_s, durations_s, n_frames, tr, hrf)[:, 0]

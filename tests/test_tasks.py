import numpy as np
import pytest

from fmrisynth.errors import FmrisynthError
from fmrisynth.tasks import HCP7, HCP24, HCP_TR, PARADIGMS, block_regressor, condition_set, paradigm_of


def test_condition_sets():
    assert len(HCP24) == 24 and len(set(HCP24)) == 24
    assert len(HCP7) == 7 and {c.split(":")[0] for c in HCP7} == set(PARADIGMS)
    all_evs = {c for p in PARADIGMS.values() for c in p.conditions}
    assert set(HCP24) == all_evs  # every EV of every paradigm, nothing else
    assert condition_set("all") is None
    with pytest.raises(FmrisynthError):
        condition_set("hcp9")
    with pytest.raises(FmrisynthError, match="unknown condition"):
        paradigm_of("NOPE:x")


@pytest.mark.parametrize("name", list(PARADIGMS))
def test_schedule_is_real_structure_and_fits_the_run(name):
    p = PARADIGMS[name]
    for seed in range(5):
        events = p.schedule(np.random.default_rng(seed))
        for ev, (duration, count) in p.blocks.items():
            assert len(events[ev]) == count and all(d == duration for _, d in events[ev])
        spans = sorted((o, o + d) for v in events.values() for o, d in v)
        assert spans[0][0] >= p.lead_in_s and spans[-1][1] <= p.n_frames * HCP_TR
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:]))  # no overlaps


def test_schedule_is_seeded():
    p = PARADIGMS["WM"]
    assert p.schedule(np.random.default_rng(1)) == p.schedule(np.random.default_rng(1))
    assert p.schedule(np.random.default_rng(1)) != p.schedule(np.random.default_rng(2))


def test_block_regressor_matches_hrf_shape():
    reg = block_regressor([0.0], [12.0], 40, HCP_TR)
    assert reg.shape == (40,) and reg[0] == pytest.approx(0.0, abs=1e-6)
    peak = np.argmax(reg) * HCP_TR
    assert 6.0 < peak < 14.0  # the response plateaus ~5 s after onset, inside the 12 s block
    assert reg[int(24 / HCP_TR)] < 0  # the post-stimulus undershoot of the canonical HRF
    assert np.all(block_regressor([], [], 10, 1.0) == 0)

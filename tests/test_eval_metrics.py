"""Map correlation, RSA (against rsatoolbox), top-1, ROI/HRF, PCA variance, nearest neighbours."""

import numpy as np

from fmrisynth.evaluate import metrics as M


def test_rdm_and_rsa_match_rsatoolbox(rng):
    import rsatoolbox

    real, gen = rng.normal(size=(6, 200)), rng.normal(size=(6, 200))
    gen[:3] += real[:3]
    ref = [rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(m), method="correlation") for m in (real, gen)]
    iu = np.triu_indices(6, k=1)
    assert np.allclose(M.rdm(real)[iu], ref[0].get_vectors()[0])
    assert np.isclose(M.rsa(M.rdm(real), M.rdm(gen)), rsatoolbox.rdm.compare(ref[0], ref[1], method="corr")[0, 0])
    assert np.isnan(M.rsa(M.rdm(real[:2]), M.rdm(gen[:2])))  # one pair: no correlation


def test_map_corr_and_top1(rng):
    real = rng.normal(size=(4, 500))
    gen = real + 0.5 * rng.normal(size=real.shape)
    r = M.map_corr(real, gen)
    assert np.allclose(r, [np.corrcoef(a, b)[0, 1] for a, b in zip(real, gen)])
    accuracy, assigned = M.top1(real, gen[[1, 0, 2, 3]], np.arange(4))
    assert accuracy == 0.5 and list(assigned) == [1, 0, 2, 3]


def test_roi_and_peak_latency():
    real_map = np.arange(100.0)
    assert set(np.flatnonzero(M.roi(real_map, 0.05))) == {95, 96, 97, 98, 99}
    tc = np.zeros(20)
    tc[8] = 1.0
    assert M.peak_latency(tc, tr=0.5, onset_s=1.0) == 3.0


def test_variance_explained_is_between_group_fraction(rng):
    groups = np.repeat([0, 1, 2], 50)
    centres = np.array([[5.0, 0], [-5, 0], [0, 5]])
    points = centres[groups] + rng.normal(size=(150, 2))
    assert 0.9 < M.variance_explained(points, groups) < 1.0
    assert M.variance_explained(points, rng.permutation(groups)) < 0.1


def test_nearest_corr_finds_copies(rng):
    refs = rng.normal(size=(30, 100))
    queries = np.vstack([refs[3], rng.normal(size=100)])
    nn = M.nearest_corr(queries, refs)
    assert np.isclose(nn[0], 1.0) and nn[1] < 0.5

"""The batched GLM against nilearn's first-level GLM and scipy's one-sample t test."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fmrisynth.evaluate.glm import GroupMap, clip_glm, design_matrices


@pytest.mark.parametrize("hrf", ["glover", "spm"])
def test_clip_glm_matches_nilearn_run_glm(rng, hrf):
    from nilearn.glm import compute_contrast
    from nilearn.glm.first_level import make_first_level_design_matrix, run_glm

    n_frames, tr, n_vox = 20, 0.72, 300
    onsets, durations = np.array([0.0, 1.44, 0.72, 2.16]), np.array([12.0, 12.0, 8.0, 10.0])
    designs = design_matrices(onsets, durations, np.full(4, tr), n_frames, hrf)  # (4, T, 3)
    signal = rng.normal(size=n_vox)
    y = (designs[:, :, :1] * signal + rng.normal(size=(4, n_frames, n_vox))).astype(np.float32)
    beta, t = clip_glm(y, designs)
    for n in range(4):
        # nilearn builds its own design from the events: task, polynomial drift, constant.
        events = pd.DataFrame({"onset": [onsets[n]], "duration": [durations[n]], "trial_type": ["task"]})
        x = make_first_level_design_matrix(np.arange(n_frames) * tr, events, hrf_model=hrf,
                                           drift_model="polynomial", drift_order=1)
        labels, results = run_glm(y[n].astype(float), x.to_numpy(), noise_model="ols")
        contrast = compute_contrast(labels, results, (x.columns == "task").astype(float), stat_type="t")
        assert np.corrcoef(contrast.stat(), t[n])[0, 1] > 0.999
        assert np.corrcoef(contrast.effect_size().ravel(), beta[n])[0, 1] > 0.999


def test_clip_glm_is_exact_ols_on_the_same_design(rng):
    from nilearn.glm.first_level import run_glm

    designs = design_matrices(np.array([2.0]), np.array([10.0]), np.array([2.0]), 16, drift_order=2)
    y = rng.normal(size=(1, 16, 50)).astype(np.float32)
    beta, t = clip_glm(y, designs)
    labels, results = run_glm(y[0].astype(float), designs[0], noise_model="ols")
    ref = results[labels[0]]
    assert np.allclose(beta[0], ref.theta[0], atol=1e-4)
    assert np.allclose(t[0], ref.t(0), atol=1e-3)


def test_group_map_is_a_one_sample_t_over_batches(rng):
    betas = rng.normal(0.3, 1.0, size=(9, 40))
    group = GroupMap(40)
    group.add(betas[:4])
    group.add(betas[4:])
    assert np.allclose(group.t, stats.ttest_1samp(betas, 0.0).statistic)
    halves = GroupMap.combine([GroupMap(40), group])
    assert halves.n == 9 and np.allclose(halves.t, group.t)
    single = GroupMap(40)
    single.add(betas[:1])
    assert np.allclose(single.t, betas[0])  # one clip: no t statistic, its beta map

"""The rows of the scaling study and the comparison: task and realism figures, the loss against the
Gaussian reference, and the report's scaling figure with the Gaussian model as its peer line."""

import json

import numpy as np
import pytest

from fmrisynth.evaluate.report import _scaling
from fmrisynth.evaluate.summary import REALISM_ROW, ROW_FIGURES, result_row
from fmrisynth.pipeline import final_loss


def test_result_row_flattens_task_and_realism_and_marks_the_absent():
    metrics = {"map_corr_mean": 0.7, "rsa": 0.9, "top1_map": 1.0, "realism": {"c2st_accuracy": 0.62, "fc_corr": 0.8,
                                                                           "autocorr_real": [0.1, 0.05]}}  # fmt: skip
    row = result_row(metrics)
    assert list(row) == ROW_FIGURES  # one column per figure, in the table's order
    assert row["map_corr_mean"] == 0.7 and row["c2st_accuracy"] == 0.62 and row["fc_corr"] == 0.8
    assert row["top1_clip"] is None and row["global_signal_ratio"] is None  # absent, not zero
    assert "autocorr_real" not in row  # lists stay in metrics.json


def test_final_loss_is_the_mean_of_the_last_tenth_against_the_gaussian_reference(tmp_path):
    losses = [2.0] * 18 + [0.8, 0.6]
    rows = [{"step": 10 * (i + 1), "loss": v, "ref_loss_gaussian": 0.9} for i, v in enumerate(losses)]
    (tmp_path / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = final_loss(tmp_path)
    assert out["steps"] == 200 and out["loss"] == pytest.approx(0.7) and out["ref_loss_gaussian"] == 0.9
    assert out["loss_vs_gaussian"] == pytest.approx(0.7 / 0.9)  # below 1: ahead of an independent Gaussian
    early = final_loss(tmp_path, upto=100)  # a point of a training curve: the log as it stood at step 100
    assert early["steps"] == 100 and early["loss"] == pytest.approx(2.0)


def test_the_scaling_figure_draws_realism_and_the_gaussian_line(tmp_path, monkeypatch):
    rows = [{"preset": p, "params": n, "map_corr_mean": r, "c2st_accuracy": 1.2 - r} for p, n, r in
            [("s", 1e5, 0.5), ("m", 1e6, 0.6), ("l", 1e7, 0.7)]]  # fmt: skip
    (tmp_path / "scaling.json").write_text(json.dumps({"rows": rows, "fits": {}, "gaussian": {"c2st_accuracy": 0.58}}))
    drawn = {}

    def capture(fig):
        drawn.update({ax.get_title(): ax for ax in fig.axes})
        return "png"

    monkeypatch.setattr("fmrisynth.evaluate.report._png", capture)
    assert _scaling(tmp_path) == "png"
    labels = dict(REALISM_ROW)
    assert set(drawn) == {"map r", labels["c2st_accuracy"]}  # only the figures the rows have
    c2st = drawn[labels["c2st_accuracy"]]
    peer = [line for line in c2st.get_lines() if line.get_label() == "Gaussian model"]
    assert len(peer) == 1 and np.allclose(peer[0].get_ydata(), 0.58)
    assert not [line for line in drawn["map r"].get_lines() if line.get_label() == "Gaussian model"]

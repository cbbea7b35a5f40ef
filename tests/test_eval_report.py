"""The v2 report: references and realism on the page; every damaged evaluation is one line."""

import json
import shutil

import numpy as np
import pytest
from test_eval_run import CONDITIONS, _good_samples, make_store

from fmrisynth.cli import main
from fmrisynth.config import Config
from fmrisynth.evaluate.run import evaluate


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    store = make_store(root / "store", rng)
    evaluate(f"{store.path}:test", _good_samples(root / "samples", rng), root / "eval", Config())
    return root / "eval"


def test_report_shows_references_realism_and_the_furthest_shortfall(evaluation, tmp_path):
    assert main(["report", "--eval", str(evaluation), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    for text in ("reference", "ceiling", "map r vs truth", "Realism", "autocorrelation lag 5", "FWHM (mm)",
                 "C2ST linear", "C2ST statistics", "FC r with real", "Furthest short of its reference", "kmeans-100", *CONDITIONS):
        assert text in page, text
    assert page.count("data:image/png;base64,") == 3 + 4  # glass brains, realism, matrices, time courses, PCA


def _damage(evaluation, tmp_path, case):
    bad = tmp_path / "bad"
    shutil.copytree(evaluation, bad)
    if case == "empty metrics":
        (bad / "metrics.json").write_text("{}")
    elif case == "truncated arrays":
        data = (bad / "arrays.npz").read_bytes()
        (bad / "arrays.npz").write_bytes(data[: len(data) // 2])
    elif case == "missing map":
        m = json.loads((bad / "metrics.json").read_text())
        (bad / m["maps"][CONDITIONS[1]]["generated"]).unlink()
    return bad


@pytest.mark.parametrize("case, message", [
    ("empty metrics", "incomplete evaluation (no 'conditions')"),
    ("truncated arrays", "not an evaluation output"),
    ("missing map", "group map missing or damaged"),
    ("out is a directory", "is a directory"),
])
def test_damaged_evaluations_and_bad_outputs_are_one_line(evaluation, tmp_path, capsys, case, message):
    bad = _damage(evaluation, tmp_path, case)
    out = tmp_path / "out"
    if case == "out is a directory":
        out.mkdir()
    assert main(["report", "--eval", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    assert case == "out is a directory" or not out.exists()

"""The v2 report: references and realism on the page; every damaged evaluation is one line."""

import json
import shutil

import numpy as np
import pytest
from test_eval_run import CONDITIONS, _good_samples, make_store

from fmrisynth.cli import main
from fmrisynth.config import Config
from fmrisynth.evaluate.run import evaluate

pytestmark = pytest.mark.slow  # seconds or more per test: `make test` runs it, `make test-fast` does not


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


def test_glass_brains_of_a_condition_share_threshold_and_colour_range(evaluation, monkeypatch):
    from nilearn import plotting

    calls = []
    original = plotting.plot_glass_brain

    def record(img, **kw):
        calls.append((kw["title"].split()[0], kw["threshold"], kw["vmax"], kw["vmin"]))
        return original(img, **kw)

    monkeypatch.setattr(plotting, "plot_glass_brain", record)
    from fmrisynth.evaluate.report import _brains, _load

    page = _brains(evaluation, _load(evaluation)[0])
    assert [kind for kind, *_ in calls[:3]] == ["real", "generated", "reference"]
    for c in range(len(CONDITIONS)):
        scales = {tuple(call[1:]) for call in calls[3 * c : 3 * c + 3]}
        assert len(scales) == 1, scales  # one threshold, one vmax for real, generated and reference
        (low, high, vmin), = scales
        assert 0 < low < high and vmin == -high
    assert "One scale for the real, generated, reference maps" in page


def test_a_stronger_generated_map_gets_the_real_maps_scale_not_its_own():
    from fmrisynth.evaluate.report import brain_scale

    real = np.random.default_rng(0).normal(size=1000)
    assert brain_scale([real, 2 * real])[1] > brain_scale([real, real])[1] * 1.3  # the strong map raises the shared vmax


def test_figures_name_their_units_rates_and_levels(evaluation):
    from fmrisynth.evaluate.report import _load, _matrices_figure, _pca_figure, _realism_figure, _timecourses_figure, confusion_rates

    m, a = _load(evaluation)
    assert np.allclose(confusion_rates(np.array([[16, 0], [32, 32]])), [[1, 0], [0.5, 0.5]])  # rows sum to 1
    matrices = _matrices_figure(a, m)
    panels = [ax for ax in matrices.axes if ax.get_label() != "<colorbar>"]
    confusion = panels[2]
    assert "row-normalised" in confusion.get_title() and "generated clips" in confusion.get_title()
    assert np.allclose(confusion.images[0].get_array().sum(1), 1.0)
    assert all(t.get_text().endswith(")") and "(n=" in t.get_text() for t in confusion.get_yticklabels())
    colourbars = [ax.get_ylabel() for ax in matrices.axes if ax.get_label() == "<colorbar>"]
    assert colourbars == ["1 - r", "1 - r", "share of the row's clips"]
    assert [ax.get_ylabel() for ax in _realism_figure(a, m).axes if ax.get_label() == "<colorbar>"] == ["correlation r"] * 3
    assert all(ax.get_legend() is not None for ax in _pca_figure(a, m).axes)
    assert m["units"] and all(ax.get_ylabel() == f"ROI mean, {m['units']}" for ax in _timecourses_figure(a, m).axes)


def test_report_shows_peers_the_excess_flag_not_computed_figures_and_wide_tables(evaluation, tmp_path, monkeypatch):
    import fmrisynth.evaluate.report as report
    from fmrisynth.evaluate.report import write_report

    monkeypatch.setattr(report, "_brains", lambda *args: "")  # glass brains: tested above, and slow

    m = json.loads((evaluation / "metrics.json").read_text())
    m["top1_clip"], m["reference"]["top1_clip"] = 0.91, 0.64
    m["realism"]["c2st_stats_reference"] = None
    m["not_computed"] = {"realism.c2st_stats_reference": "C2ST (reference) not computed: 6 clips, fewer than the 10"}
    bad = tmp_path / "e"
    shutil.copytree(evaluation, bad)
    (bad / "metrics.json").write_text(json.dumps(m))
    gaussian = {**m, "top1_clip": 0.69, "realism": {**m["realism"], "c2st_accuracy": 0.5731}}
    page = write_report(bad, tmp_path / "r.html", peers={"gaussian": gaussian}).read_text()
    assert "<td>gaussian</td>" in page and "<th>gaussian</th>" in page and "0.573" in page
    from fmrisynth.evaluate.report import _realism_figure

    curves = _realism_figure(np.load(evaluation / "arrays.npz"), m, {"gaussian": gaussian}).axes[0]
    assert [line.get_label() for line in curves.get_lines()][:4] == ["real", "generated", "reference", "gaussian"]
    assert "Misleading excess: top-1 clip" in page
    assert "<td>n/c</td>" in page and "n/c: C2ST (reference) not computed: 6 clips" in page  # never a number, and why
    assert page.count("<div class='wide'><table>") == page.count("<table>")  # every table scrolls, none is cut off


def test_cli_report_with_a_peer_and_a_bad_peer_in_one_line(evaluation, tmp_path, capsys, monkeypatch):
    import fmrisynth.evaluate.report as report

    monkeypatch.setattr(report, "_brains", lambda *args: "")
    out = tmp_path / "r.html"
    assert main(["report", "--eval", str(evaluation), "--peer", f"gaussian={evaluation}", "--out", str(out)]) == 0
    assert "<td>gaussian</td>" in out.read_text()
    for bad in ("gaussian", f"gaussian={tmp_path}"):
        assert main(["report", "--eval", str(evaluation), "--peer", bad, "--out", str(tmp_path / "x.html")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("NAME=EVAL_DIR" in err or "not an evaluation output" in err), err

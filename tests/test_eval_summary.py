"""The tables: peers as rows and columns, n/c with its reason, and the misleading excess flagged."""

import pytest

from fmrisynth.evaluate.summary import furthest_ahead, furthest_short, headline_rows, realism_rows, text_table


def _metrics(c2st=0.95, top1_clip=0.91, reference_top1_clip=0.64, **realism):
    return {
        "map_corr_mean": 0.8, "rsa": 0.97, "top1_map": 1.0, "top1_clip": top1_clip, "hrf_corr_mean": 0.9,
        "reference": {"map_corr_mean": 0.81, "rsa": 0.96, "top1_map": 1.0, "top1_clip": reference_top1_clip,
                      "hrf_corr_mean": 0.88},
        "ceiling": {"map_corr_mean": 0.85, "rsa": 0.98, "top1_map": 1.0},
        "realism": {"variance_ratio": 1.0, "variance_ratio_reference": 1.0, "global_signal_ratio": 0.31,
                    "global_signal_ratio_reference": 0.98, "autocorr_real": [0.15, 0.05], "autocorr_generated": [0.04, 0.0],
                    "autocorr_reference": [0.15, 0.05], "autocorr_max_diff": 0.11, "autocorr_max_diff_reference": 0.0,
                    "fc_corr": 0.75, "fc_corr_reference": 0.95, "c2st_accuracy": c2st, "c2st_accuracy_ci": [0.93, 0.97],
                    "c2st_reference": 0.52, "c2st_reference_ci": [0.47, 0.57], "c2st_stats": 0.96,
                    "c2st_stats_ci": [0.94, 0.98], "c2st_stats_reference": 0.53, **realism},
    }


def test_peer_is_a_row_and_a_realism_column_and_leaves_the_shortfall_alone():
    m, gaussian = _metrics(), _metrics(c2st=0.573, top1_clip=0.69)
    assert [name for name, _ in headline_rows(m, {"gaussian": gaussian})][:3] == ["generated", "gaussian", "reference"]
    rows = dict(realism_rows(m, {"gaussian": gaussian}))
    assert rows["C2ST linear (0.5 ideal)"] == [None, 0.95, 0.573, 0.52]  # real test | generated | gaussian | reference
    assert rows["autocorrelation lag 1"] == [0.15, 0.04, 0.04, 0.15]
    table = text_table(m, peers={"gaussian": gaussian})
    header = next(line for line in table.splitlines() if line.startswith("realism vs real test")).split()
    assert header[-4:] == ["test", "generated", "gaussian", "reference"]
    assert "0.93-0.97" in table and "0.573" in table
    assert furthest_short(m) == ("global signal variance ratio", 0.31, 0.98)  # |ln 0.31| > 2 x 0.45
    assert text_table(m).count("gaussian") == 0 and "furthest short of its reference: global signal" in table


def test_generated_top1_clip_above_the_reference_is_flagged_as_misleading():
    assert furthest_ahead(_metrics(top1_clip=0.91, reference_top1_clip=0.64)) == ("top-1 clip", 0.91, 0.64)
    assert furthest_ahead(_metrics(top1_clip=0.70, reference_top1_clip=0.64)) is None  # within chance of it
    assert "misleading excess: top-1 clip (generated 0.910, reference 0.640)" in text_table(_metrics())


def test_not_computed_figures_show_nc_and_the_reason_never_a_number():
    m = _metrics(c2st=None)
    m["realism"].update(c2st_accuracy_ci=None, c2st_stats=None, c2st_stats_ci=None)
    m["rsa"] = None
    m["not_computed"] = {"realism.c2st_accuracy": "C2ST (generated) not computed: 6 clips",
                         "realism.c2st_stats": "C2ST (generated) not computed: 6 clips",
                         "rsa": "RSA not computed: 2 condition(s)"}
    rows = dict(realism_rows(m))
    assert rows["C2ST linear (0.5 ideal)"][1] == "n/c" and rows["C2ST statistics (0.5 ideal)"][1] == "n/c"
    assert rows["  95% interval"][1] == "n/c"  # the interval goes with its figure
    assert dict(headline_rows(m))["generated"][1] == "n/c"
    table = text_table(m)
    assert "n/c: C2ST (generated) not computed: 6 clips" in table and "n/c: RSA not computed" in table
    assert table.count("n/c: C2ST") == 1  # one line per reason
    assert furthest_short(m)[0] != "C2ST linear"


@pytest.mark.parametrize("peers", [None, {}])
def test_without_peers_the_table_is_todays(peers):
    assert text_table(_metrics(), peers=peers) == text_table(_metrics())

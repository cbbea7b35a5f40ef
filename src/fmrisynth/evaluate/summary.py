"""The v2 tables of an evaluation, one definition for the CLI, the demo's closing table and the report.

Task metrics are one row per clip set (generated, reference, ceiling, codec, and the real test set
against the simulator's truth); realism is one row per figure with the real test set, the generated
clips and the reference beside each other. ``furthest_short`` names the figure where the generated
clips fall furthest behind the reference, each figure measured as a distance from its ideal.
"""

from __future__ import annotations

import math

HEADLINE = [  # (key, column label)
    ("map_corr_mean", "map r"), ("rsa", "RSA"), ("top1_map", "top-1 map"), ("top1_clip", "top-1 clip"),
    ("hrf_corr_mean", "HRF r"),
]
TRUTH = "map r vs truth"


def _get(d, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def headline_rows(m: dict) -> list[tuple[str, list]]:
    """(set, [HEADLINE values..., map r vs truth]) for each set present; None where undefined."""
    def row(name: str, d: dict | None, truth_key: str | None) -> tuple[str, list]:
        return name, [_get(d, k) for k, _ in HEADLINE] + [_get(m, "truth", truth_key, "map_corr_mean") if truth_key else None]

    rows = [row("generated", m, "generated"), row("reference", m.get("reference"), "reference"),
            row("ceiling", m.get("ceiling"), None)]
    if m.get("codec"):
        rows.append(row("codec", m["codec"], None))
    real = [None] * (len(HEADLINE) - 1) + [m.get("hrf_corr_real_mean"), _get(m, "truth", "real", "map_corr_mean")]
    rows.append(("real test", real))
    return rows


def realism_rows(m: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """(figure, real test, generated, reference) for every realism figure."""
    r = m.get("realism") or {}
    lag = lambda which, k: _get(r, f"autocorr_{which}")[k] if len(r.get(f"autocorr_{which}") or []) > k else None  # noqa: E731
    rows = [("voxel variance ratio", 1.0, r.get("variance_ratio"), r.get("variance_ratio_reference")),
            ("global signal variance ratio", 1.0, r.get("global_signal_ratio"), r.get("global_signal_ratio_reference"))]
    rows += [(f"autocorrelation lag {k + 1}", lag("real", k), lag("generated", k), lag("reference", k))
             for k in range(len(r.get("autocorr_real") or []))]
    rows += [("autocorrelation max |diff|", 0.0, r.get("autocorr_max_diff"), r.get("autocorr_max_diff_reference")),
             ("FWHM (mm)", r.get("fwhm_real_mm"), r.get("fwhm_generated_mm"), r.get("fwhm_reference_mm")),
             ("FC r with real", 1.0, r.get("fc_corr"), r.get("fc_corr_reference")),
             ("C2ST accuracy (0.5 ideal)", None, r.get("c2st_accuracy"), r.get("c2st_reference"))]
    return rows


def _log_distance(x, ideal):
    return abs(math.log(x / ideal)) if x and ideal and x > 0 and ideal > 0 else None


def furthest_short(m: dict) -> tuple[str, float, float] | None:
    """(figure, generated, reference) where generated falls furthest behind the reference, or None.

    Each figure becomes a distance from its ideal: 1 - r for correlations and accuracies, |ln x| for
    variance ratios, |ln(x / real)| for the FWHM, 2 |x - 0.5| for the classifier test, the value
    itself for the autocorrelation difference; the shortfall is generated minus reference distance.
    """
    r = m.get("realism") or {}
    ref = m.get("reference") or {}
    closeness = lambda x: None if x is None else 1 - x  # noqa: E731
    figures = [(label, m.get(k), ref.get(k), closeness) for k, label in HEADLINE]
    figures += [
        (TRUTH, _get(m, "truth", "generated", "map_corr_mean"), _get(m, "truth", "reference", "map_corr_mean"), closeness),
        ("voxel variance ratio", r.get("variance_ratio"), r.get("variance_ratio_reference"), lambda x: _log_distance(x, 1.0)),
        ("global signal variance ratio", r.get("global_signal_ratio"), r.get("global_signal_ratio_reference"),
         lambda x: _log_distance(x, 1.0)),
        ("autocorrelation max |diff|", r.get("autocorr_max_diff"), r.get("autocorr_max_diff_reference"), lambda x: x),
        ("FWHM (mm)", r.get("fwhm_generated_mm"), r.get("fwhm_reference_mm"), lambda x: _log_distance(x, r.get("fwhm_real_mm"))),
        ("FC r with real", r.get("fc_corr"), r.get("fc_corr_reference"), closeness),
        ("C2ST accuracy", r.get("c2st_accuracy"), r.get("c2st_reference"), lambda x: None if x is None else 2 * abs(x - 0.5)),
    ]
    worst = None
    for label, gen, reference, distance in figures:
        if gen is None or reference is None or distance(gen) is None or distance(reference) is None:
            continue
        gap = distance(gen) - distance(reference)
        if worst is None or gap > worst[0]:
            worst = (gap, label, gen, reference)
    return None if worst is None else worst[1:]


def _cell(v, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.3f}"


def text_table(m: dict) -> str:
    """The plain-text v2 table: sets x task metrics, realism figures, the furthest shortfall."""
    head = [label for _, label in HEADLINE] + [TRUTH]
    lines = [f"{'':<12}" + "".join(f"{h:>12}" for h in head[:-1]) + f"{head[-1]:>16}"]
    for name, values in headline_rows(m):
        lines.append(f"{name:<12}" + "".join(_cell(v, 12) for v in values[:-1]) + _cell(values[-1], 16))
    if m.get("realism"):
        lines += ["", f"{'realism vs real test':<32}{'real':>10}{'generated':>11}{'reference':>11}"]
        lines += [f"{name:<32}{_cell(a, 10)}{_cell(b, 11)}{_cell(c, 11)}" for name, a, b, c in realism_rows(m)]
    short = furthest_short(m)
    lines += ["", "furthest short of its reference: " + (
        f"{short[0]} (generated {short[1]:.3f}, reference {short[2]:.3f})" if short else "no reference to compare with")]
    return "\n".join(lines)

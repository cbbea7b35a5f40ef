"""The tables of an evaluation, one definition for the CLI, the demo's closing table and the report.

Task metrics are one row per clip set (generated, any peer generators, reference, ceiling, codec,
and the real test set against the simulator's truth); realism is one row per figure with the real
test set, the generated clips, the peers and the reference beside each other. A peer is another
generator evaluated by the same code into its own ``metrics.json`` (the demo's Gaussian model):
its "generated" figures fill its row and column. ``furthest_short`` names the figure where the
generated clips fall furthest behind the reference, each figure measured as a distance from its
ideal; ``furthest_ahead`` names a clip-level figure where they beat real data of other people by
more than chance allows, which says the generated clips are too clean, not that they are better.
A figure that was not computed (too few clips or conditions; ``metrics["not_computed"]``) is shown
as "n/c" with its reason, never as a number.
"""

from __future__ import annotations

import math

HEADLINE = [  # (key, column label)
    ("map_corr_mean", "map r"), ("rsa", "RSA"), ("top1_map", "top-1 map"), ("top1_clip", "top-1 clip"),
    ("hrf_corr_mean", "HRF r"),
]
# the realism figures a scaling or comparison row carries, with their labels (lower C2ST is better)
REALISM_ROW = [("c2st_accuracy", "C2ST linear"), ("c2st_quadratic", "C2ST quadratic"), ("c2st_stats", "C2ST statistics"),
               ("global_signal_ratio", "global signal ratio"), ("autocorr_max_diff", "autocorr max |diff|"),
               ("fc_corr", "FC r"), ("variance_ratio", "variance ratio")]  # fmt: skip
ROW_FIGURES = [k for k, _ in HEADLINE + REALISM_ROW]
TRUTH = "map r vs truth"
NOT_COMPUTED = "n/c"
# Clip-level figures on which real clips of other people are the bar: generated clips above it by
# more than EXCESS_MARGIN are too alike (too little clip-to-clip noise), not better.
EXCESS = [("top1_clip", "top-1 clip")]
EXCESS_MARGIN = 0.1


def _get(d, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _value(m: dict, path: str):
    """The figure at dotted ``path`` of metrics ``m``, or NOT_COMPUTED where ``m`` says why it is absent."""
    absent = m.get("not_computed") or {}
    if path in absent or path.removesuffix("_ci") in absent:  # an interval is absent with its figure
        return NOT_COMPUTED
    return _get(m, *path.split("."))


def result_row(m: dict) -> dict:
    """The task and realism figures of one evaluation, flat (None where absent): a scaling or comparison row."""
    return {**{k: m.get(k) for k, _ in HEADLINE}, **{k: _get(m, "realism", k) for k, _ in REALISM_ROW}}


def headline_rows(m: dict, peers: dict[str, dict] | None = None) -> list[tuple[str, list]]:
    """(set, [HEADLINE values..., map r vs truth]) for each set present; None where undefined."""
    def row(name: str, metrics: dict, prefix: str, truth_key: str | None) -> tuple[str, list]:
        values = [_value(metrics, prefix + k) for k, _ in HEADLINE]
        return name, values + [_get(metrics, "truth", truth_key, "map_corr_mean") if truth_key else None]

    rows = [row("generated", m, "", "generated")]
    rows += [row(name, peer, "", "generated") for name, peer in (peers or {}).items()]
    rows += [row("reference", m, "reference.", "reference"), row("ceiling", m, "ceiling.", None)]
    if m.get("codec"):
        rows.append(row("codec", m, "codec.", None))
    real = [None] * (len(HEADLINE) - 1) + [m.get("hrf_corr_real_mean"), _get(m, "truth", "real", "map_corr_mean")]
    rows.append(("real test", real))
    return rows


def realism_columns(peers: dict[str, dict] | None = None) -> list[str]:
    """The realism table's columns: real test | generated | each peer | reference."""
    return ["real test", "generated", *(peers or {}), "reference"]


def _interval(ci) -> str | None:
    return None if not ci else f"{ci[0]:.2f}-{ci[1]:.2f}"


def realism_rows(m: dict, peers: dict[str, dict] | None = None) -> list[tuple[str, list]]:
    """(figure, [real test, generated, *peers, reference]) for every realism figure.

    Values are floats, None (not measured), NOT_COMPUTED, or an interval "lo-hi" (the row under a
    classifier test: its 95 % interval from half-sample refits, ``two_sample_tests``).
    """
    r = m.get("realism") or {}
    others = [m, *(peers or {}).values()]  # generated figures: ours, then each peer's own

    def lag(metrics: dict, which: str, k: int):
        values = _get(metrics, "realism", f"autocorr_{which}") or []
        return values[k] if len(values) > k else None

    def figure(label, real, key, reference_key, fmt=lambda v: v):
        return label, [real, *(fmt(_value(x, f"realism.{key}")) for x in others), fmt(_value(m, f"realism.{reference_key}"))]

    rows = [figure("voxel variance ratio", 1.0, "variance_ratio", "variance_ratio_reference"),
            figure("global signal variance ratio", 1.0, "global_signal_ratio", "global_signal_ratio_reference"),
            figure("between-clip variance ratio", 1.0, "between_clip_variance_ratio", "between_clip_variance_ratio_reference"),
            figure("mean-clip difference (sd)", None, "mean_clip_diff", "mean_clip_diff_reference")]
    rows += [(f"autocorrelation lag {k + 1}", [lag(m, "real", k), *(lag(x, "generated", k) for x in others),
                                               lag(m, "reference", k)])
             for k in range(len(r.get("autocorr_real") or []))]
    rows += [figure("autocorrelation max |diff|", 0.0, "autocorr_max_diff", "autocorr_max_diff_reference"),
             ("FWHM (mm)", [r.get("fwhm_real_mm"), *(_get(x, "realism", "fwhm_generated_mm") for x in others),
                            r.get("fwhm_reference_mm")]),
             figure("FC r with real", 1.0, "fc_corr", "fc_corr_reference")]
    for label, key, reference_key in (("C2ST linear (0.5 ideal)", "c2st_accuracy", "c2st_reference"),
                                      ("C2ST quadratic (0.5 ideal)", "c2st_quadratic", "c2st_quadratic_reference"),
                                      ("C2ST statistics (0.5 ideal)", "c2st_stats", "c2st_stats_reference")):
        rows.append(figure(label, None, key, reference_key))
        rows.append(figure("  95% interval", None, f"{key}_ci", f"{reference_key}_ci",
                           lambda v: v if v == NOT_COMPUTED else _interval(v)))
    return rows


def _log_distance(x, ideal):
    return abs(math.log(x / ideal)) if x and ideal and x > 0 and ideal > 0 else None


def _numbers(m: dict, key: str, ref_key: str) -> tuple:
    gen, ref = _get(m, *key.split(".")), _get(m, *ref_key.split("."))
    return (gen if isinstance(gen, (int, float)) else None), (ref if isinstance(ref, (int, float)) else None)


def furthest_short(m: dict) -> tuple[str, float, float] | None:
    """(figure, generated, reference) where generated falls furthest behind the reference, or None.

    Each figure becomes a distance from its ideal: 1 - r for correlations and accuracies, |ln x| for
    variance ratios, |ln(x / real)| for the FWHM, 2 |x - 0.5| for the classifier tests, the value
    itself for the autocorrelation and mean-clip differences; the shortfall is generated minus
    reference distance.
    """
    r = m.get("realism") or {}
    closeness = lambda x: 1 - x  # noqa: E731
    log1 = lambda x: _log_distance(x, 1.0)  # noqa: E731
    chance = lambda x: 2 * abs(x - 0.5)  # noqa: E731
    figures = [(label, k, f"reference.{k}", closeness) for k, label in HEADLINE]
    figures += [
        (TRUTH, "truth.generated.map_corr_mean", "truth.reference.map_corr_mean", closeness),
        ("voxel variance ratio", "realism.variance_ratio", "realism.variance_ratio_reference", log1),
        ("global signal variance ratio", "realism.global_signal_ratio", "realism.global_signal_ratio_reference", log1),
        ("between-clip variance ratio", "realism.between_clip_variance_ratio",
         "realism.between_clip_variance_ratio_reference", log1),
        ("mean-clip difference (sd)", "realism.mean_clip_diff", "realism.mean_clip_diff_reference", lambda x: x),
        ("autocorrelation max |diff|", "realism.autocorr_max_diff", "realism.autocorr_max_diff_reference", lambda x: x),
        ("FWHM (mm)", "realism.fwhm_generated_mm", "realism.fwhm_reference_mm", lambda x: _log_distance(x, r.get("fwhm_real_mm"))),
        ("FC r with real", "realism.fc_corr", "realism.fc_corr_reference", closeness),
        ("C2ST linear", "realism.c2st_accuracy", "realism.c2st_reference", chance),
        ("C2ST quadratic", "realism.c2st_quadratic", "realism.c2st_quadratic_reference", chance),
        ("C2ST statistics", "realism.c2st_stats", "realism.c2st_stats_reference", chance),
    ]
    worst = None
    for label, key, ref_key, distance in figures:
        gen, reference = _numbers(m, key, ref_key)
        if gen is None or reference is None or distance(gen) is None or distance(reference) is None:
            continue
        gap = distance(gen) - distance(reference)
        if worst is None or gap > worst[0]:
            worst = (gap, label, gen, reference)
    return None if worst is None else worst[1:]


def furthest_ahead(m: dict) -> tuple[str, float, float] | None:
    """(figure, generated, reference) of the clip-level figure where generated clips beat real
    clips of other people by the most, when by more than EXCESS_MARGIN; else None.

    Real clips of other people are as good as real data gets: a generated per-clip top-1 of 0.91
    against their 0.64 says the generated clips vary less from clip to clip than real ones do.
    """
    best = None
    for key, label in EXCESS:
        gen, reference = _numbers(m, key, f"reference.{key}")
        if gen is not None and reference is not None and gen - reference > EXCESS_MARGIN:
            if best is None or gen - reference > best[1] - best[2]:
                best = (label, gen, reference)
    return best


def not_computed_reasons(m: dict, peers: dict[str, dict] | None = None) -> list[str]:
    """Why each n/c figure of ``m`` (and of the peers, named) was not computed, once per reason."""
    reasons = list(dict.fromkeys((m.get("not_computed") or {}).values()))
    for name, peer in (peers or {}).items():
        reasons += [f"{name}: {why}" for why in dict.fromkeys((peer.get("not_computed") or {}).values())]
    return reasons


def _cell(v, width: int) -> str:
    if v is None:
        return f"{'-':>{width}}"
    return f"{v:>{width}}" if isinstance(v, str) else f"{v:>{width}.3f}"


def text_table(m: dict, peers: dict[str, dict] | None = None) -> str:
    """The plain-text table: sets x task metrics, realism figures, the furthest shortfall and excess.

    ``peers``: {name: metrics of another generator evaluated by the same code}, shown as extra rows
    and realism columns.
    """
    head = [label for _, label in HEADLINE] + [TRUTH]
    lines = [f"{'':<12}" + "".join(f"{h:>12}" for h in head[:-1]) + f"{head[-1]:>16}"]
    for name, values in headline_rows(m, peers):
        lines.append(f"{name:<12}" + "".join(_cell(v, 12) for v in values[:-1]) + _cell(values[-1], 16))
    if m.get("realism"):
        columns = realism_columns(peers)
        widths = [max(11, len(c) + 1) for c in columns]
        lines += ["", f"{'realism vs real test':<32}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
        lines += [f"{name:<32}" + "".join(_cell(v, w) for v, w in zip(values, widths)) for name, values in realism_rows(m, peers)]
    short, ahead = furthest_short(m), furthest_ahead(m)
    lines += ["", "furthest short of its reference: " + (
        f"{short[0]} (generated {short[1]:.3f}, reference {short[2]:.3f})" if short else "no reference to compare with")]
    if ahead:
        lines.append(f"misleading excess: {ahead[0]} (generated {ahead[1]:.3f}, reference {ahead[2]:.3f}) is above real "
                     f"clips of other people: the generated clips vary less than real ones")
    lines += [f"{NOT_COMPUTED}: {reason}" for reason in not_computed_reasons(m, peers)]
    return "\n".join(lines)

"""``fmrisynth report``: one self-contained HTML page from an evaluation directory.

Everything a lab meeting needs on one page, with every figure embedded as a base64 PNG (the file
can be mailed or archived alone): the metric table of the generated clips beside any peer
generators (evaluated by the same code), the reference (real clips of other people), the noise
ceiling, the codec and the simulator's truth; the realism section (variance, autocorrelation
curves, smoothness, FC matrices, the classifier tests); real, generated and reference group maps
per condition (glass brains on one shared scale per condition), the two RDMs and the clip-level
confusion matrix (row-normalised), ROI time courses against the canonical HRF, the PCA of frames
by subject, phase encoding and task, and the scaling curve when a ``fmrisynth scale`` directory
is given. A figure is never drawn so that it flatters: maps compared by eye share their colour
scale, rates are normalised, and a generated figure above real data's is flagged like a
shortfall. Figures are drawn on matplotlib ``Figure`` objects (Agg canvas, no pyplot state), so
reports can be made from any process.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np

from fmrisynth.errors import FmrisynthError
from fmrisynth.evaluate.summary import (HEADLINE, REALISM_ROW, TRUTH, furthest_ahead, furthest_short, headline_rows,
                                        not_computed_reasons, realism_columns, realism_rows)
from fmrisynth.publish import staged_file

CSS = """body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:.3em}table{border-collapse:collapse;margin:1em 0}
td,th{border-bottom:1px solid #ddd;padding:4px 12px;text-align:right}td:first-child,th:first-child{text-align:left}
img{max-width:100%}.flag{color:#b00;font-weight:bold}h2{border-bottom:2px solid #444;padding-top:1em}
.wide{overflow-x:auto;max-width:100%}.wide table{font-size:90%}th{white-space:normal;vertical-align:bottom}"""
REQUIRED = ("conditions", "real", "generated", "n_real", "n_generated", "map_corr", "n_per_condition", "hrf", "maps",
            "roi_fraction", "pca", "rsa")
PCA_LEGEND = 12  # levels named in a PCA panel's legend; more (subjects) end in "... k more"
ARRAYS = ("confusion", "tr", "onset_real", "onset_generated", "rdm_real", "rdm_generated", "tc_real", "tc_generated",
          "hrf_real", "pca_real", "pca_generated")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else html.escape(str(x))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>"  # scrolls, never cut off, on a narrow page


def _flags(m: dict) -> str:
    """The figure furthest short of its reference and a misleading excess (a figure above real data's)."""
    short, ahead = furthest_short(m), furthest_ahead(m)
    out = (f"<p><b>Furthest short of its reference:</b> {html.escape(short[0])} (generated {short[1]:.3f}, "
           f"reference {short[2]:.3f})</p>" if short else "")
    if ahead:
        out += (f"<p class='flag'>Misleading excess: {html.escape(ahead[0])} of the generated clips ({ahead[1]:.3f}) is above "
                f"that of real clips of other people ({ahead[2]:.3f}); the generated clips vary less than real ones, "
                f"which no real data would show.</p>")
    return out


def _metric_tables(m: dict, peers: dict[str, dict] | None = None) -> str:
    """Sets x task metrics (generated | peers | reference | ceiling | codec | real test vs truth), then per condition."""
    ceiling, reference = m.get("ceiling") or {}, m.get("reference") or {}
    header = ["set"] + [label for _, label in HEADLINE] + [TRUTH]
    mem = m.get("memorisation") or {}
    flag = '<p class="flag">Memorisation flagged: generated clips are closer to training clips than to held-out ones.</p>'
    reasons = set(not_computed_reasons(m, peers))
    notes = "".join(f"<p class='sub'>{'n/c: ' if n in reasons else ''}{html.escape(n)}</p>"
                    for n in dict.fromkeys([*m.get("notes", []), *reasons]))
    about = (f"<p class='sub'>reference: {html.escape(str(reference.get('source', '-')))} ({reference.get('n', 0)} clips, "
             f"other {html.escape(str(reference.get('split_by', 'subject')))}s than the test set); ceiling: real halves by "
             f"{html.escape(str(ceiling.get('split_by', '?')))}; nearest training clip r / nearest held-out clip r: "
             f"{_fmt(mem.get('train_nn_corr'))} / {_fmt(mem.get('heldout_nn_corr'))}</p>")
    per_cond = [[c, m["map_corr"].get(c), reference.get("map_corr", {}).get(c), ceiling.get("map_corr", {}).get(c),
                 h["corr_generated_real"], h["corr_generated_hrf"], h["corr_real_hrf"], h["peak_s_generated"],
                 h["peak_s_real"], m["n_per_condition"][c]["generated"], m["n_per_condition"][c]["real"]]
                for c, h in ((c, m["hrf"][c]) for c in m["conditions"])]
    return (_table(header, [[name, *values] for name, values in headline_rows(m, peers)]) + _flags(m) + about + notes
            + (flag if mem.get("flagged") else "")
            + _table(["condition", "map r", "reference map r", "ceiling map r", "ROI r gen-real", "ROI r gen-HRF",
                      "ROI r real-HRF", "peak s gen", "peak s real", "n gen", "n real"], per_cond))


def _realism(a: dict, m: dict, peers: dict[str, dict] | None = None) -> str:
    """The realism table (real test | generated | peers | reference), autocorrelation curves, FC matrices."""
    r = m["realism"]
    table = _table(["figure (vs real test)", *realism_columns(peers)], [[name, *values] for name, values in realism_rows(m, peers)])
    how = ("<p class='sub'>C2ST: cross-validated accuracy of a logistic regression telling the set's clips from real test "
           "clips (0.5 = indistinguishable); linear on PCA scores, quadratic on the scores and their squares, statistics on "
           "per-clip summary statistics; the row under each is its 95 % interval (the spread of refits on random halves "
           "of both sets, laid around the estimate). Between-clip "
           "variance ratio: total over within-clip variance, relative to real test clips. Mean-clip difference: RMS of the "
           "mean clip's difference from the real one, in real within-clip sd (read against the reference's, which has the "
           f"same clip count). Parcels: {html.escape(str(r.get('parcellation')))}.</p>")
    return table + how + _png(_realism_figure(a, m, peers))


def _realism_figure(a: dict, m: dict, peers: dict[str, dict] | None = None):
    """Autocorrelation curves of every set and peer, then the FC matrix of each (real | generated | reference)."""
    from matplotlib.figure import Figure

    r = m["realism"]
    fc = [(k, a[f"fc_{k}"]) for k in ("real", "generated", "reference") if f"fc_{k}" in a]
    fig = Figure(figsize=(4.2 * (len(fc) + 1), 3.8), layout="constrained")
    ax = fig.add_subplot(1, len(fc) + 1, 1)
    for k, style in (("real", "k-o"), ("generated", "C1-o"), ("reference", "C0--o")):
        if r.get(f"autocorr_{k}") is not None:
            values = np.array(r[f"autocorr_{k}"], dtype=float)
            ax.plot(np.arange(1, len(values) + 1), values, style, label=k)
    for k, (name, peer) in enumerate((peers or {}).items()):
        values = ((peer.get("realism") or {}).get("autocorr_generated")) or []
        ax.plot(np.arange(1, len(values) + 1), np.array(values, dtype=float), f"C{k + 2}:s", label=name)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_xlabel("lag (frames)")
    ax.set_ylabel("autocorrelation of residuals")
    ax.set_title("temporal autocorrelation", fontsize=10)
    ax.legend(fontsize=8)
    for k, (name, mat) in enumerate(fc):
        ax = fig.add_subplot(1, len(fc) + 1, k + 2)
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
        fc_r = {"generated": r.get("fc_corr"), "reference": r.get("fc_corr_reference")}.get(name)
        ax.set_title(f"FC {name}" + (f"  (r with real {_fmt(fc_r)})" if fc_r is not None else ""), fontsize=10)
        ax.set_xlabel("parcel")
        ax.set_ylabel("parcel")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8, label="correlation r")
    return fig


def brain_scale(maps: list[np.ndarray]) -> tuple[float, float]:
    """One (threshold, vmax) for all the group t maps of a condition, from their pooled |t|.

    The top 20 % of voxels are shown and colours saturate at the 99.5th percentile (no lone voxel
    sets the scale); pooled, so a generated map twice as strong as the real one looks twice as strong.
    """
    values = np.concatenate([np.abs(np.ravel(v)) for v in maps])
    values = values[np.isfinite(values) & (values > 0)]
    if not len(values):
        return 0.0, 1.0
    low, high = np.percentile(values, [80, 99.5])
    return float(low), float(max(high, low + 1e-6))


def _brains(eval_dir: Path, m: dict) -> str:
    """Per condition: the real, generated and reference group t maps, glass brains on one scale."""
    import nibabel as nib
    from matplotlib.figure import Figure
    from nilearn import plotting

    kinds = [k for k in ("real", "generated", "reference") if all(k in m["maps"][c] for c in m["conditions"])]
    parts = []
    for c in m["conditions"]:
        images, data = {}, {}
        for kind in kinds:
            path = eval_dir / m["maps"][c][kind]
            try:
                images[kind] = nib.load(path)
                data[kind] = images[kind].get_fdata()  # read now: a damaged file fails here, in one line
            except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as e:
                raise FmrisynthError(f"group map missing or damaged ({e}); run `fmrisynth evaluate` again", path) from None
        low, high = brain_scale(list(data.values()))
        fig = Figure(figsize=(6.5 * len(kinds), 2.8))
        for k, kind in enumerate(kinds):
            corr = {"generated": m["map_corr"].get(c), "reference": ((m.get("reference") or {}).get("map_corr") or {}).get(c)}
            title = f"{kind} t" + (f"  r={corr[kind]:.2f}" if corr.get(kind) is not None else "")
            ax = fig.add_axes((k / len(kinds), 0, 1 / len(kinds), 1))
            display = plotting.plot_glass_brain(images[kind], figure=fig, axes=ax, threshold=low, vmax=high, vmin=-high,
                                                plot_abs=False, colorbar=True, title=title)
            if getattr(display, "_cbar", None) is not None:
                display._cbar.set_label("group t", fontsize=8)
                display._cbar.ax.yaxis.set_label_position("right")  # the ticks sit on the left
        caption = (f"<p class='sub'>One scale for the {', '.join(kinds)} maps of {html.escape(c)}: |t| below {low:.2f} "
                   f"hidden, colours saturate at ±{high:.2f} (the 80th and 99.5th percentiles of their pooled |t|).</p>")
        parts.append(f"<h3>{html.escape(c)}</h3>{_png(fig)}{caption}")
    return "".join(parts)


def confusion_rates(confusion: np.ndarray) -> np.ndarray:
    """Row-normalised confusion (C, C): the share of each true condition's clips assigned to each."""
    rows = confusion.sum(1, keepdims=True)
    return np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)


def _matrices_figure(a: dict, m: dict):
    """The real and generated RDMs, and the generated clips' row-normalised confusion matrix."""
    from matplotlib.figure import Figure

    names = [c.replace(":", "\n") for c in m["conditions"]]
    counts = np.asarray(a["confusion"]).sum(1)
    n = len(names)
    fig = Figure(figsize=(5 * 3, 4.6), layout="constrained")
    panels = [("RDM real", a["rdm_real"], (0, 2), "viridis", "1 - r", names),
              (f"RDM generated  (RSA {_fmt(m['rsa'])})", a["rdm_generated"], (0, 2), "viridis", "1 - r", names),
              ("generated clips: true (rows) vs assigned,\nrow-normalised", confusion_rates(np.asarray(a["confusion"])),
               (0, 1), "Blues", "share of the row's clips", [f"{name} (n={k})" for name, k in zip(names, counts)])]
    for k, (title, mat, (lo, hi), cmap, unit, rows) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        im = ax.imshow(mat, vmin=lo, vmax=hi, cmap=cmap)
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), rows, fontsize=7)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8, label=unit)
    return fig


def _timecourses_figure(a: dict, m: dict):
    """ROI mean time courses per condition, real vs generated vs the (scaled) HRF prediction."""
    from matplotlib.figure import Figure

    n = len(m["conditions"])
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows), layout="constrained")
    for c, name in enumerate(m["conditions"]):
        ax = fig.add_subplot(rows, cols, c + 1)
        t = np.arange(a["tc_real"].shape[1]) * a["tr"][c]
        hrf, real = a["hrf_real"][c], a["tc_real"][c]
        scale = float(hrf @ real / (hrf @ hrf)) if hrf @ hrf > 0 else 0.0  # least-squares amplitude
        ax.plot(t - a["onset_real"][c], real, "k", label="real")
        ax.plot(t - a["onset_generated"][c], a["tc_generated"][c], "C1", label="generated")
        ax.plot(t - a["onset_real"][c], scale * hrf, "C0--", label="HRF (scaled)")
        ax.axvline(0, color="0.7", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("s from block onset", fontsize=8)
        ax.set_ylabel(f"ROI mean, {m.get('units', 'store units')}", fontsize=8)
        if c == 0:
            ax.legend(fontsize=7)
    return fig


def _pca_figure(a: dict, m: dict):
    """Frames in the real data's top two PCs, coloured by subject, phase encoding and task, with legends."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = [("real", f, a.get(f"pca_real_{f}")) for f in ("subject", "pe", "task")] + [
        ("generated", "task", a.get("pca_generated_task"))]
    fig = Figure(figsize=(16, 5), layout="constrained")
    tasks = list(m["conditions"])
    lo, hi = np.vstack([a["pca_real"], a["pca_generated"]]).min(0), np.vstack([a["pca_real"], a["pca_generated"]]).max(0)
    for k, (which, factor, groups) in enumerate(panels):
        ax = fig.add_subplot(1, 4, k + 1)
        levels = tasks if factor == "task" else sorted(set(groups))
        colours = matplotlib.colormaps["tab20" if len(levels) > 10 else "tab10"]
        colour = np.array([levels.index(g) for g in groups])
        ax.scatter(*a[f"pca_{which}"].T, c=colours(colour % colours.N), s=3)
        shown = levels[:PCA_LEGEND]
        handles = [Line2D([], [], ls="", marker="o", ms=4, color=colours(i % colours.N)) for i in range(len(shown))]
        labels = shown + ([f"... {len(levels) - len(shown)} more"] if len(levels) > len(shown) else [])
        handles += [Line2D([], [], ls="")] * (len(labels) - len(handles))
        ax.legend(handles, labels, fontsize=6, title=factor, title_fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
        share = m["pca"][which].get(factor)
        ax.set_title(f"{which} by {factor}: {_fmt(share)} of variance", fontsize=9)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xlabel("PC1 of real frames", fontsize=8)
        ax.set_ylabel("PC2 of real frames", fontsize=8)
    return fig


def _scaling(scaling_dir: Path) -> str:
    """Each task and realism figure against parameters (log axis), with the fitted laws when scaling.json
    has them, and the Gaussian background model of the same data as a dashed line (the peer to beat)."""
    from matplotlib.figure import Figure

    from fmrisynth.evaluate.scaling import predict

    path = scaling_dir / "scaling.json"
    try:
        data = json.loads(path.read_text())
        rows = data["rows"] if isinstance(data, dict) else data
        params = np.array([r["params"] for r in rows], dtype=float)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FmrisynthError(f"cannot read a scaling table ({e}); run `fmrisynth scale` first", path) from None
    fits = data.get("fits", {}) if isinstance(data, dict) else {}
    gaussian = (data.get("gaussian") if isinstance(data, dict) else None) or {}
    figures = [(k, label) for k, label in HEADLINE + REALISM_ROW if any(r.get(k) is not None for r in rows)]
    cols = min(len(figures), 6) or 1
    lines = max(1, math.ceil(len(figures) / cols))  # rows of panels
    fig = Figure(figsize=(3.2 * cols, 3.0 * lines), layout="constrained")
    grid = np.geomspace(params.min(), params.max() * 4, 50)
    for k, (key, label) in enumerate(figures):
        ax = fig.add_subplot(lines, cols, k + 1)
        values = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
        ax.plot(params, values, "ko")
        for law, style in (("loglinear", "C0-"), ("powerlaw", "C1--")):
            if law in fits.get(key, {}):
                ax.plot(grid, predict(fits[key], grid, law), style, label=law)
        if gaussian.get(key) is not None:
            ax.axhline(gaussian[key], color="C2", ls=":", label="Gaussian model")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(label, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _png(fig)


def _load(eval_dir: Path) -> tuple[dict, dict]:
    """metrics.json and arrays.npz of an evaluation, checked for what the report draws."""
    try:
        m = json.loads((eval_dir / "metrics.json").read_text())
        with np.load(eval_dir / "arrays.npz") as npz:
            a = dict(npz)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FmrisynthError(f"not an evaluation output ({e}); run `fmrisynth evaluate` first", eval_dir) from None
    missing = [k for k in REQUIRED if not isinstance(m, dict) or k not in m] + [k for k in ARRAYS if k not in a]
    if missing:
        raise FmrisynthError(f"incomplete evaluation (no {missing[0]!r}); run `fmrisynth evaluate` again", eval_dir)
    return m, a


def load_peers(specs: list[str]) -> dict[str, dict]:
    """{name: metrics} from ``NAME=EVAL_DIR`` strings (``fmrisynth report --peer``), each checked in one line."""
    peers = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise FmrisynthError(f"--peer {spec!r}: expected NAME=EVAL_DIR, e.g. gaussian=runs/demo/results/gaussian/eval")
        try:
            peers[name] = json.loads((Path(path) / "metrics.json").read_text())
        except (OSError, ValueError) as e:
            raise FmrisynthError(f"not an evaluation output ({e}); run `fmrisynth evaluate` first", path) from None
        if not isinstance(peers[name], dict) or "realism" not in peers[name]:
            raise FmrisynthError("incomplete evaluation (no 'realism'); run `fmrisynth evaluate` again", path)
    return peers


def write_report(eval_dir: str | Path, out: str | Path, scaling: str | Path | None = None,
                 peers: dict[str, dict] | None = None) -> Path:
    """Render ``eval_dir`` (written by ``evaluate``) to the single HTML file ``out``; returns it.

    ``peers``: {name: metrics.json of another generator evaluated by the same code} (the demo's
    Gaussian model), shown as rows of the metric table and columns of the realism table.
    """
    eval_dir, out = Path(eval_dir), Path(out)
    if out.is_dir():
        raise FmrisynthError("is a directory; give the report's file name, e.g. report.html", out)
    m, a = _load(eval_dir)
    sections = [
        ("Metrics beside the references", _metric_tables(m, peers)),
        ("Realism: does it look like fMRI?", _realism(a, m, peers) if m.get("realism") else "<p>not measured</p>"),
        ("Group activation maps: real vs generated", _brains(eval_dir, m)),
        ("Representational geometry and condition specificity", _png(_matrices_figure(a, m))),
        (f"ROI time courses (ROI: the top {m['roi_fraction']:.0%} voxels of each real map)", _png(_timecourses_figure(a, m))),
        ("PCA of frames", _png(_pca_figure(a, m))),
    ]
    if scaling is not None:
        sections.append(("Scaling with model size", _scaling(Path(scaling))))
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>fmrisynth evaluation</title>"
            f"<style>{CSS}</style></head><body><h1>fmrisynth evaluation</h1>"
            f"<p class='sub'>real: {html.escape(m['real'])} ({m['n_real']} clips) &nbsp; generated: "
            f"{html.escape(m['generated'])} ({m['n_generated']} clips) &nbsp; {len(m['conditions'])} conditions</p>"
            f"{body}</body></html>")
    try:
        with staged_file(out) as tmp:  # a report killed half-way leaves a temporary the next write removes
            tmp.write_text(page)
    except OSError as e:
        raise FmrisynthError(f"cannot write the report ({e.strerror or e})", out) from None
    return out

"""``fmrisynth report``: one self-contained HTML page from an evaluation directory.

Everything a lab meeting needs on one page, with every figure embedded as a base64 PNG (the file
can be mailed or archived alone): the metric table of the generated clips beside the reference
(real clips of other people), the noise ceiling, the codec and the simulator's truth; the realism
section (variance, autocorrelation curves, smoothness, FC matrices, the classifier test); real vs
generated group maps per condition (glass brains), the two RDMs and the clip-level confusion
matrix, ROI time courses against the canonical HRF, the PCA of frames by subject, phase encoding
and task, and the scaling curve when a ``fmrisynth scale`` directory is given. Figures are drawn on matplotlib
``Figure`` objects (Agg canvas, no pyplot state), so reports can be made from any process.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from fmrisynth.errors import FmrisynthError
from fmrisynth.evaluate.summary import HEADLINE, TRUTH, furthest_short, headline_rows, realism_rows

CSS = """body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:.3em}table{border-collapse:collapse;margin:1em 0}
td,th{border-bottom:1px solid #ddd;padding:4px 12px;text-align:right}td:first-child,th:first-child{text-align:left}
img{max-width:100%}.flag{color:#b00;font-weight:bold}h2{border-bottom:2px solid #444;padding-top:1em}"""
REQUIRED = ("conditions", "real", "generated", "n_real", "n_generated", "map_corr", "n_per_condition", "hrf", "maps",
            "roi_fraction", "pca", "rsa")
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
    return f"<table><tr>{head}</tr>{body}</table>"


def _metric_tables(m: dict) -> str:
    """Sets x task metrics (generated | reference | ceiling | codec | real test vs truth), then per condition."""
    ceiling, reference = m.get("ceiling") or {}, m.get("reference") or {}
    header = ["set"] + [label for _, label in HEADLINE] + [TRUTH]
    mem = m.get("memorisation") or {}
    flag = '<p class="flag">Memorisation flagged: generated clips are closer to training clips than to held-out ones.</p>'
    notes = "".join(f"<p class='sub'>{html.escape(n)}</p>" for n in m.get("notes", []))
    about = (f"<p class='sub'>reference: {html.escape(str(reference.get('source', '-')))} ({reference.get('n', 0)} clips, "
             f"other {html.escape(str(reference.get('split_by', 'subject')))}s than the test set); ceiling: real halves by "
             f"{html.escape(str(ceiling.get('split_by', '?')))}; nearest training clip r / nearest held-out clip r: "
             f"{_fmt(mem.get('train_nn_corr'))} / {_fmt(mem.get('heldout_nn_corr'))}</p>")
    per_cond = [[c, m["map_corr"].get(c), reference.get("map_corr", {}).get(c), ceiling.get("map_corr", {}).get(c),
                 h["corr_generated_real"], h["corr_generated_hrf"], h["corr_real_hrf"], h["peak_s_generated"],
                 h["peak_s_real"], m["n_per_condition"][c]["generated"], m["n_per_condition"][c]["real"]]
                for c, h in ((c, m["hrf"][c]) for c in m["conditions"])]
    return (_table(header, [[name, *values] for name, values in headline_rows(m)]) + about + notes
            + (flag if mem.get("flagged") else "")
            + _table(["condition", "map r", "reference map r", "ceiling map r", "ROI r gen-real", "ROI r gen-HRF",
                      "ROI r real-HRF", "peak s gen", "peak s real", "n gen", "n real"], per_cond))


def _realism(a: dict, m: dict) -> str:
    """The realism table, the autocorrelation curves and the FC matrices (real | generated | reference)."""
    from matplotlib.figure import Figure

    r = m["realism"]
    short = furthest_short(m)
    line = (f"<p><b>Furthest short of its reference:</b> {html.escape(short[0])} (generated {short[1]:.3f}, "
            f"reference {short[2]:.3f})</p>" if short else "")
    table = _table(["figure (vs real test)", "real", "generated", "reference"], [list(row) for row in realism_rows(m)])
    fc = [(k, a[f"fc_{k}"]) for k in ("real", "generated", "reference") if f"fc_{k}" in a]
    fig = Figure(figsize=(4.2 * (len(fc) + 1), 3.8), layout="constrained")
    ax = fig.add_subplot(1, len(fc) + 1, 1)
    for k, style in (("real", "k-o"), ("generated", "C1-o"), ("reference", "C0--o")):
        if r.get(f"autocorr_{k}") is not None:
            values = np.array(r[f"autocorr_{k}"], dtype=float)
            ax.plot(np.arange(1, len(values) + 1), values, style, label=k)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_xlabel("lag (frames)")
    ax.set_title("temporal autocorrelation of residuals", fontsize=10)
    ax.legend(fontsize=8)
    for k, (name, mat) in enumerate(fc):
        ax = fig.add_subplot(1, len(fc) + 1, k + 2)
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
        fc_r = {"generated": r.get("fc_corr"), "reference": r.get("fc_corr_reference")}.get(name)
        ax.set_title(f"FC {name}" + (f"  (r with real {_fmt(fc_r)})" if fc_r is not None else ""), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)
    return line + table + f"<p class='sub'>parcels: {html.escape(str(r.get('parcellation')))}</p>" + _png(fig)


def _brains(eval_dir: Path, m: dict) -> str:
    """Per condition: the real and the generated group t map, glass brains side by side."""
    import nibabel as nib
    from matplotlib.figure import Figure
    from nilearn import plotting

    parts = []
    for c in m["conditions"]:
        fig = Figure(figsize=(13, 2.8))
        for k, kind in enumerate(("real", "generated")):
            path = eval_dir / m["maps"][c][kind]
            try:
                img = nib.load(path)
                values = np.abs(np.asarray(img.dataobj))
            except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as e:
                raise FmrisynthError(f"group map missing or damaged ({e}); run `fmrisynth evaluate` again", path) from None
            # show the top 20% of voxels; saturate at the 99.5th percentile so no lone voxel sets the scale
            low, high = np.percentile(values[values > 0], [80, 99.5]) if (values > 0).any() else (0.0, 1.0)
            ax = fig.add_axes((0.5 * k, 0, 0.5, 1))
            plotting.plot_glass_brain(img, figure=fig, axes=ax, threshold=low, vmax=high, plot_abs=False, colorbar=True,
                                      title=f"{kind} t" + (f"  r={m['map_corr'][c]:.2f}" if kind == "generated"
                                                             and m["map_corr"][c] is not None else ""))
        parts.append(f"<h3>{html.escape(c)}</h3>{_png(fig)}")
    return "".join(parts)


def _matrices(a: dict, m: dict) -> str:
    """The real and generated RDMs, and the clip-level confusion matrix."""
    from matplotlib.figure import Figure

    names = [c.replace(":", "\n") for c in m["conditions"]]
    n = len(names)
    fig = Figure(figsize=(5 * 3, 4.6), layout="constrained")
    panels = [("RDM real (1 - r)", a["rdm_real"], (0, 2), "viridis"),
              (f"RDM generated  (RSA {_fmt(m['rsa'])})", a["rdm_generated"], (0, 2), "viridis"),
              ("clips: true (rows) vs assigned", a["confusion"], (0, None), "Blues")]
    for k, (title, mat, (lo, hi), cmap) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        im = ax.imshow(mat, vmin=lo, vmax=hi, cmap=cmap)
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


def _timecourses(a: dict, m: dict) -> str:
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
        if c == 0:
            ax.legend(fontsize=7)
    return _png(fig)


def _pca(a: dict, m: dict) -> str:
    """Frames in the real data's top two PCs, coloured by subject, phase encoding and task."""
    from matplotlib.figure import Figure

    panels = [("real", f, a.get(f"pca_real_{f}")) for f in ("subject", "pe", "task")] + [
        ("generated", "task", a.get("pca_generated_task"))]
    fig = Figure(figsize=(16, 4), layout="constrained")
    tasks = list(m["conditions"])
    lo, hi = np.vstack([a["pca_real"], a["pca_generated"]]).min(0), np.vstack([a["pca_real"], a["pca_generated"]]).max(0)
    for k, (which, factor, groups) in enumerate(panels):
        ax = fig.add_subplot(1, 4, k + 1)
        levels = tasks if factor == "task" else sorted(set(groups))
        colour = np.array([levels.index(g) for g in groups])
        ax.scatter(*a[f"pca_{which}"].T, c=colour, cmap="tab20" if len(levels) > 10 else "tab10", s=3,
                   vmin=0, vmax=max(len(levels) - 1, 1))
        share = m["pca"][which].get(factor)
        ax.set_title(f"{which} by {factor}: {_fmt(share)} of variance", fontsize=9)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xlabel("PC1", fontsize=8)
        ax.set_ylabel("PC2", fontsize=8)
    return _png(fig)


def _scaling(scaling_dir: Path) -> str:
    """Each metric against parameters (log axis), with the fitted laws when scaling.json has them."""
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
    keys = [k for k, _ in HEADLINE if any(r.get(k) is not None for r in rows)]
    fig = Figure(figsize=(4 * max(len(keys), 1), 3.4), layout="constrained")
    grid = np.geomspace(params.min(), params.max() * 4, 50)
    for k, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), k + 1)
        values = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
        ax.plot(params, values, "ko")
        for law, style in (("loglinear", "C0-"), ("powerlaw", "C1--")):
            if law in fits.get(key, {}):
                ax.plot(grid, predict(fits[key], grid, law), style, label=law)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(key, fontsize=10)
        if fits.get(key):
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


def write_report(eval_dir: str | Path, out: str | Path, scaling: str | Path | None = None) -> Path:
    """Render ``eval_dir`` (written by ``evaluate``) to the single HTML file ``out``; returns it."""
    eval_dir, out = Path(eval_dir), Path(out)
    if out.is_dir():
        raise FmrisynthError("is a directory; give the report's file name, e.g. report.html", out)
    m, a = _load(eval_dir)
    sections = [
        ("Metrics beside the references", _metric_tables(m)),
        ("Realism: does it look like fMRI?", _realism(a, m) if m.get("realism") else "<p>not measured</p>"),
        ("Group activation maps: real vs generated", _brains(eval_dir, m)),
        ("Representational geometry and condition specificity", _matrices(a, m)),
        (f"ROI time courses (ROI: the top {m['roi_fraction']:.0%} voxels of each real map)", _timecourses(a, m)),
        ("PCA of frames", _pca(a, m)),
    ]
    if scaling is not None:
        sections.append(("Scaling with model size", _scaling(Path(scaling))))
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>fmrisynth evaluation</title>"
            f"<style>{CSS}</style></head><body><h1>fmrisynth evaluation</h1>"
            f"<p class='sub'>real: {html.escape(m['real'])} ({m['n_real']} clips) &nbsp; generated: "
            f"{html.escape(m['generated'])} ({m['n_generated']} clips) &nbsp; {len(m['conditions'])} conditions</p>"
            f"{body}</body></html>")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page)
        tmp.replace(out)
    except OSError as e:
        raise FmrisynthError(f"cannot write the report ({e.strerror or e})", out) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return out

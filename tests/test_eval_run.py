"""`evaluate` end to end on a tiny synthetic store and sample directories, and its input checks."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fmrisynth.config import Config
from fmrisynth.data.store import ClipStore, StoreWriter
from fmrisynth.errors import FmrisynthError
from fmrisynth.evaluate.run import evaluate
from fmrisynth.generate.bids import condition_task, run_stem
from fmrisynth.tasks import block_regressor

pytestmark = pytest.mark.slow  # seconds or more per test: `make test` runs it, `make test-fast` does not

CONDITIONS = ["LANGUAGE:story", "MOTOR:rh", "WM:2bk_faces"]
T, TR, GRID = 16, 1.0, (6, 7, 6)
MASK = np.zeros(GRID, bool)
MASK[1:5, 1:6, 1:5] = True
AFFINE = np.diag([6.0, 6.0, 6.0, 1.0])


def _patterns(seed=1):
    return np.random.default_rng(seed).normal(size=(len(CONDITIONS), int(MASK.sum())))


def _clip(rng, pattern, onset):
    """(T, V): the pattern times the block's HRF response, plus noise."""
    reg = block_regressor([onset], [8.0], T, TR)
    return (reg[:, None] * pattern * 3 + rng.normal(size=(T, pattern.size))).astype(np.float32)


def make_store(path, rng, per_subject=3):
    """Subjects s0-s3 test, s4 val, s5 train; every subject sees every condition."""
    splits = ["test"] * 4 + ["val", "train"]
    with StoreWriter(path, (T, int(MASK.sum())), AFFINE, GRID, CONDITIONS, mask=MASK) as w:
        for s, split in enumerate(splits):
            for c, pattern in enumerate(_patterns()):
                for k in range(per_subject):
                    onset = float(k % 3)
                    w.add(_clip(rng, pattern, onset), subject=f"s{s}", run=1, pe="LR" if s % 2 else "RL",
                          condition=CONDITIONS[c], label=c, onset_s=onset, duration_s=8.0, tr=TR, split=split)
    return ClipStore(path)


def write_samples(root, clips, conditions, onsets=None, shape=GRID, affine=AFFINE):
    """A `fmrisynth sample` dataset (generate/bids.py): sub-*/func/*_bold.nii.gz (D, H, W, T) + sidecar + events."""
    for i, (y, condition) in enumerate(zip(clips, conditions)):
        stem = root / run_stem(f"synth{i:03d}", condition_task(condition))
        stem.parent.mkdir(parents=True, exist_ok=True)
        vol = np.zeros(shape + (T,), np.float32)
        vol[: GRID[0], : GRID[1], : GRID[2]][MASK] = y.T
        onset = 0.0 if onsets is None else onsets[i]
        nib.save(nib.Nifti1Image(vol, affine), f"{stem}_bold.nii.gz")
        meta = {"condition": condition, "onset_s": onset, "duration_s": 8.0, "tr": TR, "seed": i}
        Path(f"{stem}_bold.json").write_text(json.dumps(meta))
        Path(f"{stem}_events.tsv").write_text(f"onset\tduration\ttrial_type\n{onset}\t8.0\t{condition}\n")
    return root


@pytest.fixture
def store(tmp_path, rng):
    return make_store(tmp_path / "store", rng)


def _good_samples(root, rng, n=4):
    patterns = _patterns()
    clips = [_clip(rng, patterns[c], 0.0) for c in range(3) for _ in range(n)]
    return write_samples(root, clips, [c for c in CONDITIONS for _ in range(n)])


def test_evaluate_a_faithful_generator(tmp_path, store, rng):
    samples = _good_samples(tmp_path / "samples", rng)
    m = evaluate(f"{store.path}:test", samples, tmp_path / "eval", Config())
    assert m["conditions"] == CONDITIONS and m["n_real"] == 36 and m["n_generated"] == 12
    assert m["map_corr_mean"] > 0.8 and m["top1_map"] == 1.0 and m["top1_clip"] > 0.9 and m["rsa"] > 0.5
    assert m["hrf_corr_mean"] > 0.8 and m["ceiling"]["split_by"] == "subject" and m["ceiling"]["top1_map"] == 1.0
    assert not m["memorisation"]["flagged"]
    assert set(m["pca"]["real"]) == {"subject", "pe", "task"} and m["pca"]["real"]["task"] > 0
    r = m["realism"]  # evaluation v3: every figure with its reference twin, intervals around the estimate
    for key in ("c2st_accuracy", "c2st_quadratic", "c2st_stats"):
        lo, hi = r[f"{key}_ci"]
        assert 0 <= lo <= r[key] <= hi <= 1
    twins = ("c2st_reference", "c2st_reference_ci", "c2st_quadratic_reference", "c2st_quadratic_reference_ci",
             "c2st_stats_reference", "c2st_stats_reference_ci", "between_clip_variance_ratio_reference",
             "mean_clip_diff_reference")
    assert set(twins) <= set(r) and r["between_clip_variance_ratio"] > 0 and r["mean_clip_diff"] >= 0
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk == m
    img = nib.load(tmp_path / "eval" / m["maps"]["MOTOR:rh"]["generated"])
    assert img.shape == GRID and np.allclose(img.affine, AFFINE)
    arrays = np.load(tmp_path / "eval" / "arrays.npz")
    assert arrays["tc_real"].shape == (3, T) and arrays["rdm_generated"].shape == (3, 3)


def test_real_versus_real_on_one_store(tmp_path, store):
    m = evaluate(f"{store.path}:test", f"{store.path}:val", tmp_path / "eval", Config())
    assert m["n_generated"] == 9 and m["map_corr_mean"] > 0.5
    mem = m["memorisation"]
    assert abs(mem["train_nn_corr"] - mem["heldout_nn_corr"]) < 0.1 and not mem["flagged"]
    evaluate(f"{store.path}:test", f"{store.path}:val", tmp_path / "eval", Config())  # an old evaluation is replaced
    with pytest.raises(FmrisynthError, match="not an evaluation"):  # anything else is left alone
        evaluate(f"{store.path}:test", f"{store.path}:val", store.path, Config())


def test_copies_of_training_clips_are_flagged(tmp_path, store):
    train = store.indices(split="train")
    copies = write_samples(tmp_path / "copies", [store.item(i) for i in train],
                           list(store.manifest["condition"][train]), list(store.manifest["onset_s"][train]))
    mem = evaluate(str(store.path), copies, tmp_path / "eval", Config())["memorisation"]
    assert mem["train_nn_corr"] > 0.99 and mem["flagged"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("grid", "does not match the real store"),
        ("affine", "does not match the real store"),
        ("condition", "not among the real store's"),
        ("nan", "NaN"),
        ("empty", "no generated clips"),
        ("split", "no clips in split"),
        ("truncated", "synth000_task-LANGUAGEstory_run-1_bold.nii.gz: cannot read the image: truncated"),
        ("notgzip", "synth000_task-LANGUAGEstory_run-1_bold.nii.gz: not a readable gzipped NIfTI"),
        ("nan_onset", "synth000_task-LANGUAGEstory_run-1_bold.json: onset_s, duration_s, tr must be finite numbers"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, store, rng, case, message):
    y = [_clip(rng, _patterns()[0], 0.0)]
    real = str(store.path)
    if case == "grid":
        write_samples(tmp_path / "g", y, CONDITIONS[:1], shape=(6, 7, 7))
    elif case == "affine":
        write_samples(tmp_path / "g", y, CONDITIONS[:1], affine=np.diag([2.0, 2, 2, 1]))
    elif case == "condition":
        write_samples(tmp_path / "g", y, ["MOTOR:lh"])
    elif case == "nan":
        y[0][3, 5] = np.nan
        write_samples(tmp_path / "g", y, CONDITIONS[:1])
    elif case == "empty":
        (tmp_path / "g").mkdir()
    elif case in ("truncated", "notgzip", "nan_onset"):
        nifti = next(write_samples(tmp_path / "g", y, CONDITIONS[:1]).rglob("*_bold.nii.gz"))
        if case == "truncated":
            nifti.write_bytes(nifti.read_bytes()[: nifti.stat().st_size // 2])
        elif case == "notgzip":
            nifti.write_bytes(b"\x00" * 400)
        else:
            sidecar = nifti.with_name(nifti.name.replace(".nii.gz", ".json"))
            sidecar.write_text(sidecar.read_text().replace('"onset_s": 0.0', '"onset_s": NaN'))
    else:
        write_samples(tmp_path / "g", y, CONDITIONS[:1])
        real += ":nosuchsplit"
    with pytest.raises(FmrisynthError, match=message) as err:
        evaluate(real, tmp_path / "g", tmp_path / "eval", Config())
    assert "\n" not in str(err.value)
    assert not (tmp_path / "eval").exists() and not list(tmp_path.glob(".eval*"))


def test_cli_evaluate_then_report_is_one_self_contained_page(tmp_path, store, rng, capsys):
    from fmrisynth.cli import main

    samples = _good_samples(tmp_path / "samples", rng)
    assert main(["evaluate", "--real", str(store.path), "--generated", str(samples), "--out", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out  # the v2 table: one row per set, realism, the furthest shortfall
    assert "reference" in printed and "C2ST linear" in printed and "C2ST statistics" in printed and "furthest short of its reference" in printed
    rows = [{"preset": p, "params": n, "map_corr_mean": r, "rsa": r, "top1_map": 1.0} for p, n, r in
            [("s", 1e5, 0.5), ("m", 1e6, 0.6), ("l", 1e7, 0.7)]]
    fits = {"map_corr_mean": {"loglinear": {"a": -0.0, "b": 0.1}, "powerlaw": {"A": 2.5, "alpha": 0.14}}}
    (tmp_path / "scale").mkdir()
    (tmp_path / "scale" / "scaling.json").write_text(json.dumps({"rows": rows, "fits": fits}))
    html_file = tmp_path / "report.html"
    assert main(["report", "--eval", str(tmp_path / "e"), "--scaling", str(tmp_path / "scale"), "--out", str(html_file)]) == 0
    page = html_file.read_text()
    # 3 conditions x glass brains, realism, matrices, time courses, PCA, scaling: all inline, nothing fetched
    assert page.count("data:image/png;base64,") == 3 + 5 and "src=\"http" not in page
    assert all(c in page for c in CONDITIONS) and "ceiling" in page


def test_cli_bad_input_is_one_line(tmp_path, store, capsys):
    from fmrisynth.cli import main

    assert main(["evaluate", "--real", str(store.path), "--generated", str(tmp_path / "none"), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "generated clips not found" in err
    assert main(["report", "--eval", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 1
    assert "not an evaluation output" in capsys.readouterr().err


def test_small_evaluations_show_figures_as_not_computed_with_the_reason(tmp_path, store, rng):
    """6 generated clips of 2 conditions: no C2ST (below 10 clips per set), no RSA (below 3 conditions)."""
    patterns = _patterns()
    clips = [_clip(rng, patterns[c], 0.0) for c in range(2) for _ in range(3)]
    samples = write_samples(tmp_path / "samples", clips, [c for c in CONDITIONS[:2] for _ in range(3)])
    m = evaluate(f"{store.path}:test", samples, tmp_path / "eval", Config())
    r = m["realism"]
    assert r["c2st_accuracy"] is None and r["c2st_stats"] is None and r["c2st_quadratic_ci"] is None
    assert r["c2st_reference"] is None and m["rsa"] is None and m["reference"]["rsa"] is None
    assert {"realism.c2st_accuracy", "realism.c2st_stats_reference", "rsa", "ceiling.rsa"} <= set(m["not_computed"])
    assert any("fewer than the 10 per set" in n for n in m["notes"]) and any("RSA not computed" in n for n in m["notes"])
    from fmrisynth.evaluate.summary import text_table

    table = text_table(m)
    assert "n/c: RSA not computed: 2 condition(s)" in table and "n/c: C2ST (generated) not computed: 6 clips" in table
    c2st_row = next(line for line in table.splitlines() if line.startswith("C2ST linear")).split()
    assert c2st_row[-2:] == ["n/c", "n/c"]  # generated, reference: never a number

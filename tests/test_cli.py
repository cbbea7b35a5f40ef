import subprocess
import sys
import time

from fmrisynth import cli
from fmrisynth.cli import VERBS, main

DESIGN_VERBS = {"simulate", "prepare", "train-vae", "train", "sample", "evaluate", "report", "demo", "scale", "presets"}


def test_help_lists_every_verb_quickly():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fmrisynth.cli", "--help"], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - t0
    assert DESIGN_VERBS <= set(VERBS)
    for v in DESIGN_VERBS:
        assert v in out.stdout
    assert elapsed < 3.0  # lazy imports: no torch, nilearn or monai at start-up (usually ~0.1 s)


def test_help_imports_no_heavy_library():
    code = "import sys, fmrisynth.cli; print(any(m in sys.modules for m in ('torch', 'nilearn', 'monai', 'matplotlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_user_error_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(cli.HANDLERS, "prepare", lambda args: cli.config_from(args))
    rc = main(["prepare", "--source", "bids", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "no.yaml")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "config file not found" in err

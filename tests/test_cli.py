import subprocess
import sys
from importlib.metadata import version

import pytest

from fmrisynth import cli
from fmrisynth.cli import VERBS, main

DESIGN_VERBS = {"simulate", "prepare", "train-vae", "train", "sample", "evaluate", "report", "demo", "scale", "presets"}
HEAVY = ("torch", "nilearn", "monai", "matplotlib", "sklearn", "pandas", "scipy")

# In a fresh interpreter: run `fmrisynth --help` and every `fmrisynth <verb> --help`, then print
# which heavy libraries were imported along the way (no timing: what is imported is what costs).
HELP_EVERYTHING = f"""
import contextlib, io, sys
from fmrisynth.cli import VERBS, main
for argv in [["--help"]] + [[verb, "--help"] for verb in VERBS]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    assert "usage:" in out.getvalue(), argv
print(",".join(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fmrisynth {version('fmrisynth')}"


def test_help_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "fmrisynth.cli", "--help"], capture_output=True, text=True, check=True)
    assert DESIGN_VERBS <= set(VERBS)
    for v in DESIGN_VERBS:
        assert v in out.stdout


def test_help_imports_no_heavy_library():
    """Lazy imports: the CLI and every --help answer without torch, nilearn, monai or matplotlib."""
    out = subprocess.run([sys.executable, "-c", HELP_EVERYTHING], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_the_heavy_library_check_can_fail():
    """The check above sees an import when there is one."""
    code = HELP_EVERYTHING.replace("from fmrisynth.cli import", "import scipy; from fmrisynth.cli import")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scipy"


def test_user_error_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(cli.HANDLERS, "prepare", lambda args: cli.config_from(args))
    rc = main(["prepare", "--source", "bids", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "no.yaml")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "config file not found" in err

"""Outputs are published whole, what a killed writer leaves is removed by the next run in the same
folder, and publishing into an existing folder replaces only what the writer wrote (issue 20,
items 5 and 7)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmrisynth.config import Config
from fmrisynth.generate.bids import DatasetWriter
from fmrisynth.publish import HOST, TEMP, staged

pytestmark = pytest.mark.slow  # seconds or more per test: `make test` runs it, `make test-fast` does not

MASK = np.ones((2, 2, 2), bool)


def leftovers(*folders: Path) -> list[str]:
    return [p.name for folder in folders if folder.is_dir() for p in folder.iterdir() if TEMP.fullmatch(p.name)]


def killed_midway(code: str) -> int:
    """Run ``code`` in a fresh interpreter that SIGKILLs itself where ``KILL`` stands; return its pid."""
    kill = "print(os.getpid(), flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    run = subprocess.run([sys.executable, "-c", "import os, signal\n" + code.replace("KILL", kill)],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == -signal.SIGKILL, run.stderr
    return int(run.stdout)


def write_runs(out: Path, subject: str) -> None:
    with DatasetWriter(out, [(subject, "motor")], np.eye(4), MASK, Path("ckpt")) as w:
        w.add(subject, "motor", np.zeros((3, 8), np.float32), 1.0, [], {})


def test_a_killed_sample_leaves_a_temporary_the_next_run_removes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the checkpoint path "ckpt" resolves the same in the child
    out = tmp_path / "samples"
    write_runs(out, "synth01")  # an existing dataset the killed run was adding to
    pid = killed_midway(f"""
import numpy as np
from pathlib import Path
from fmrisynth.generate.bids import DatasetWriter
with DatasetWriter({str(out)!r}, [("synth02", "motor")], np.eye(4), np.ones((2, 2, 2), bool), Path("ckpt")) as w:
    w.add("synth02", "motor", np.zeros((3, 8), np.float32), 1.0, [], {{}})
    KILL
""")
    assert leftovers(tmp_path, out) == [f".samples.tmp-{HOST}-{pid}"]
    (out / ".tmp-bids-999999999").mkdir()  # what older versions left inside the dataset
    with pytest.warns(UserWarning, match="removed the temporary output of process"):
        write_runs(out, "synth03")
    assert leftovers(tmp_path, out) == []
    assert sorted(p.name for p in out.glob("sub-*")) == ["sub-synth01", "sub-synth03"]  # nothing of the killed run
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [".bidsignore", "dataset_description.json"]


def test_a_new_dataset_appears_by_one_rename(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    renames = []
    real = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, target: renames.append((self.name, Path(target).name)) or real(self, target))
    write_runs(tmp_path / "new", "synth01")
    assert renames == [(f".new.tmp-{HOST}-{os.getpid()}", "new")]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (temporaries included) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("after", [False, True])
def test_a_sample_killed_at_its_commit_leaves_nothing_or_the_whole_dataset(tmp_path, monkeypatch, after):
    """The commit of a new dataset is one rename: killed just before it, nothing is there (and the next
    run removes the temporary); just after it, the whole dataset is."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "samples"
    whole = tmp_path / "whole"
    write_runs(whole, "synth01")
    rename = "real(self, target); KILL" if after else "KILL"
    pid = killed_midway(f"""
import numpy as np
from pathlib import Path
from fmrisynth.generate.bids import DatasetWriter
real = Path.rename
def rename(self, target):
    {rename}
Path.rename = rename
with DatasetWriter({str(out)!r}, [("synth01", "motor")], np.eye(4), np.ones((2, 2, 2), bool), Path("ckpt")) as w:
    w.add("synth01", "motor", np.zeros((3, 8), np.float32), 1.0, [], {{}})
""")
    if after:
        assert leftovers(tmp_path) == [] and snapshot(out).keys() == snapshot(whole).keys()
    else:
        assert leftovers(tmp_path) == [f".samples.tmp-{HOST}-{pid}"] and not out.exists()


def test_an_exception_while_adding_to_a_dataset_leaves_it_as_it_was(tmp_path, monkeypatch):
    """Into an existing dataset the staged files move one at a time; an exception after some of them
    (here at the second file of the new run) moves every one back and restores the namesakes they replaced."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "samples"
    write_runs(out, "synth01")
    (out / ".bidsignore").write_text("mine\n")  # a namesake the next writer replaces
    before = snapshot(out)
    moves, real = [], Path.replace

    def replace(self, target):
        moves.append(self.name)
        if len(moves) == 6:  # .bidsignore and dataset_description.json (each: namesake aside, file in), one run file
            raise OSError("disk full")
        return real(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        write_runs(out, "synth02")
    monkeypatch.setattr(Path, "replace", real)
    assert snapshot(out) == before and not (out / "sub-synth02").exists() and leftovers(tmp_path, out) == []
    write_runs(out, "synth02")  # and the same write succeeds afterwards
    assert sorted(p.name for p in out.glob("sub-*")) == ["sub-synth01", "sub-synth02"]
    assert (out / ".bidsignore").read_text() == "config.yaml\n"


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with staged(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def evaluation(tmp_path, rng):
    from test_eval_run import _good_samples, make_store

    store = make_store(tmp_path / "store", rng)
    return f"{store.path}:test", _good_samples(tmp_path / "samples", rng, n=2)


def test_a_killed_evaluation_leaves_a_temporary_the_next_run_removes(tmp_path, evaluation):
    from fmrisynth.evaluate.run import evaluate

    real, samples = evaluation
    out = tmp_path / "eval"
    pid = killed_midway(f"""
import numpy as np
from fmrisynth.config import Config
from fmrisynth.evaluate.run import evaluate

def savez_compressed(*args, **kwargs):  # the evaluation is being written when the process is killed
    KILL
np.savez_compressed = savez_compressed
evaluate({real!r}, {str(samples)!r}, {str(out)!r}, Config())
""")
    assert leftovers(tmp_path) == [f".eval.tmp-{HOST}-{pid}"] and not out.exists()
    with pytest.warns(UserWarning, match="removed the temporary output"):
        evaluate(real, samples, out, Config())
    assert leftovers(tmp_path) == [] and (out / "metrics.json").is_file()


def test_evaluate_replaces_only_what_it_wrote(tmp_path, evaluation):
    from fmrisynth.evaluate.run import evaluate

    real, samples = evaluation
    out = tmp_path / "eval"
    evaluate(real, samples, out, Config())
    (out / "notes.txt").write_text("my notes")
    (out / "report.html").write_text("<html>saved</html>")
    (out / "maps" / "mine.nii.gz").write_bytes(b"x")
    (out / "metrics.json").write_text(json.dumps({"old": True}))
    evaluate(real, samples, out, Config())
    assert (out / "notes.txt").read_text() == "my notes" and (out / "report.html").read_text() == "<html>saved</html>"
    assert (out / "maps" / "mine.nii.gz").read_bytes() == b"x"
    assert "old" not in json.loads((out / "metrics.json").read_text()) and (out / "config.yaml").is_file()

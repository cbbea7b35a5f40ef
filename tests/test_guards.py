"""Every bad argument, output path and config value is refused in one line before anything is created.

Argument errors exit with status 2 (argparse), everything else with 1; in both cases stderr holds
exactly one line and the folder the command was pointed at is as it was.
"""

import os
import types

import pytest

from fmrisynth import cli
from fmrisynth.cli import main
from fmrisynth.data.store import StoreWriter
from fmrisynth.publish import HOST, remove_stale

# The required arguments of each verb that writes, with OUT standing for --out's value.
VERB_ARGS = {
    "simulate": ["simulate", "--out", "OUT"],
    "prepare": ["prepare", "--source", "bids", "ROOT", "--out", "OUT"],
    "train-vae": ["train-vae", "--store", "STORE", "--out", "OUT"],
    "train": ["train", "--latents", "LATENTS", "--out", "OUT"],
    "sample": ["sample", "--checkpoint", "CKPT", "--condition", "MOTOR:rh", "--out", "OUT"],
    "evaluate": ["evaluate", "--real", "STORE", "--generated", "GEN", "--out", "OUT"],
    "report": ["report", "--eval", "EVAL", "--out", "OUT"],
    "demo": ["demo", "--out", "OUT"],
    "scale": ["scale", "--sizes", "tiny", "--out", "OUT"],
}


def argv(verb: str, tmp_path, out, *extra: str) -> list[str]:
    return [str(out) if a == "OUT" else str(tmp_path / a) if a.isupper() else a for a in VERB_ARGS[verb]] + list(extra)


@pytest.fixture
def no_handlers(monkeypatch):
    """Handlers that must never run: a refusal has to come before the verb's own code."""
    for verb in VERB_ARGS:
        monkeypatch.setitem(cli.HANDLERS, verb, lambda args: pytest.fail("the handler ran"))


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "verb, extra, words",
    [
        ("sample", ["--guidance", "nan"], "'nan' is not a finite number"),
        ("sample", ["--guidance", "inf"], "'inf' is not a finite number"),
        ("sample", ["--guidance=-inf"], "'-inf' is not a finite number"),
        ("sample", ["--onset", "nan"], "argument --onset: 'nan' is not a finite"),
        ("sample", ["--duration", "nan"], "argument --duration: 'nan' is not a finite"),
        ("sample", ["--duration", "0"], "argument --duration: '0' must be > 0"),
        ("sample", ["--guidance", "two"], "'two' is not a number"),
        ("sample", ["--steps", "0"], "argument --steps: '0' must be at least 1"),
        ("sample", ["--steps", "-5"], "argument --steps: '-5' must be at least 1"),
        ("sample", ["--n", "0"], "argument --n: '0' must be at least 1"),
        ("sample", ["--n", "2.5"], "'2.5' is not a whole number"),
        ("train", ["--steps", "0"], "argument --steps: '0' must be at least 1"),
        ("train-vae", ["--steps", "-1"], "argument --steps: '-1' must be at least 1"),
        ("prepare", ["--clip-len", "0"], "argument --clip-len"),
        ("simulate", ["--subjects", "0"], "argument --subjects"),
        ("simulate", ["--seed", "-1"], "argument --seed: '-1' must be at least 0"),
        ("demo", ["--minutes", "nan"], "argument --minutes: 'nan' is not a finite"),
        ("demo", ["--minutes", "0"], "argument --minutes: '0' must be > 0"),
    ],
)
def test_bad_arguments_are_one_line_and_create_nothing(tmp_path, capsys, no_handlers, verb, extra, words):
    with pytest.raises(SystemExit) as e:
        main(argv(verb, tmp_path, tmp_path / "out", *extra))
    assert e.value.code == 2
    assert words in one_line(capsys) and listing(tmp_path) == []


def test_every_float_argument_refuses_non_finite_values():
    """No verb has a plain ``type=float`` argument: each one goes through finite_float."""
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction)).choices
    floats = [(v, a.dest) for v, p in verbs.items() for a in p._actions if a.type is float]
    assert floats == []
    for text in ("nan", "inf", "-inf", "1e999"):
        with pytest.raises(cli.argparse.ArgumentTypeError):
            cli.finite_float(text)


def _under_a_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file" / "out"


def _existing_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file"


OUT_CASES = ["under a file", "an existing file", "read-only", "not writable"]


@pytest.mark.parametrize(
    "verb, case",  # report --out names a file: an existing one is replaced, so that case is no error
    [(v, c) for v in sorted(VERB_ARGS) for c in OUT_CASES if (v, c) != ("report", "an existing file")],
)
def test_every_out_problem_is_one_line_before_anything_is_created(tmp_path, capsys, monkeypatch, no_handlers, verb, case):
    out = {"under a file": _under_a_file, "an existing file": _existing_file}.get(case, lambda p: p / "new" / "out")(tmp_path)
    if case == "read-only":  # as root, chmod cannot make a folder read-only: stand in for a read-only mount
        real = os.statvfs
        monkeypatch.setattr(cli.os, "statvfs", lambda p: types.SimpleNamespace(f_flag=os.ST_RDONLY) if str(p) == str(tmp_path) else real(p))
    if case == "not writable":
        monkeypatch.setattr(cli.os, "access", lambda p, mode: str(p) != str(tmp_path))
    before = listing(tmp_path)
    assert main(argv(verb, tmp_path, out)) == 1
    err = one_line(capsys)
    words = {"under a file": "is a file, not a directory", "an existing file": "exists and is not a directory",
             "read-only": "read-only file system", "not writable": "no write permission"}[case]  # fmt: skip
    assert err.startswith(f"fmrisynth {verb}: error: ") and words in err
    assert listing(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only-mode folders")
def test_a_folder_without_write_permission_is_refused(tmp_path, capsys, no_handlers):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert main(argv("train", tmp_path, locked / "run")) == 1
        assert "no write permission" in one_line(capsys)
    finally:
        locked.chmod(0o755)


def test_report_into_a_directory_and_prepare_into_an_existing_store_are_refused(tmp_path, capsys, no_handlers):
    (tmp_path / "store").mkdir()
    assert main(argv("report", tmp_path, tmp_path / "store")) == 1
    assert "is a directory; --out must name a file" in one_line(capsys)
    assert main(argv("prepare", tmp_path, tmp_path / "store")) == 1
    assert "already exists; choose another --out" in one_line(capsys)
    assert listing(tmp_path) == ["store"]


@pytest.mark.parametrize(
    "verb, override, words",
    [
        ("train", "train.batch_size=0", "config train.batch_size: must be an integer >= 1, got 0"),
        ("train-vae", "vae.codebook_size=0", "config vae.codebook_size: must be >= 1"),
        ("prepare", "data.clip_len=0", "config data.clip_len: must be >= 1"),
        ("simulate", "sim.thermal_sd=nan", "config sim.thermal_sd: nan is not a finite"),
    ],
)
def test_bad_config_values_are_refused_before_anything_is_created(tmp_path, capsys, verb, override, words):
    """The real handlers, one verb per stage's section: the config is resolved (and refused) before the
    verb creates anything. Which values are refused is test_config's (each rule once there)."""
    out = tmp_path / "out"
    assert main(argv(verb, tmp_path, out, "--set", override)) == 1
    assert words in one_line(capsys) and listing(tmp_path) == []


def test_a_file_system_failure_mid_run_is_one_line(tmp_path, capsys, monkeypatch):
    def handler(args):
        raise OSError(28, "No space left on device", str(args.out / "data.f16"))

    monkeypatch.setitem(cli.HANDLERS, "train", handler)
    assert main(argv("train", tmp_path, tmp_path / "run")) == 1
    assert one_line(capsys) == f"fmrisynth train: error: {tmp_path / 'run' / 'data.f16'}: No space left on device"


def test_warnings_are_one_line_on_stderr(tmp_path, capsys, monkeypatch):
    import warnings

    monkeypatch.setitem(cli.HANDLERS, "train", lambda args: warnings.warn("something to know"))
    assert main(argv("train", tmp_path, tmp_path / "run")) == 0
    assert one_line(capsys) == "fmrisynth train: warning: something to know"


def test_stale_store_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    import numpy as np

    # A writer SIGKILLed halfway through its store, as a killed `prepare` or `train-vae` is.
    killed = (
        "import os, signal, numpy as np; from fmrisynth.data.store import StoreWriter; "
        f"w = StoreWriter({str(tmp_path / 'latents')!r}, (2, 3), np.eye(4), (1, 1, 3), ['a']); "
        "w.add(np.zeros((2, 3), np.float32)); w._data.flush(); print(os.getpid(), flush=True); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    run = subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True)
    pid = int(run.stdout)
    assert run.returncode == -9 and (tmp_path / f".latents.tmp-{HOST}-{pid}" / "data.f16").is_file()
    stale = [tmp_path / f".latents.tmp-{HOST}-{pid}", tmp_path / f".store.tmp-{pid}"]  # new and old naming
    stale[1].mkdir()
    (stale[1] / "data.f16").write_bytes(b"\0" * 64)
    live = tmp_path / f".other.tmp-{HOST}-{os.getppid()}"  # a writer that is still running
    foreign = tmp_path / f".store.tmp-anotherhost-{pid}"  # a shared file system: not ours to judge
    not_ours = tmp_path / f".report.html.swp-{pid}"  # another program's temporary
    for d, name in ((live, "data.f16"), (foreign, "data.f16"), (not_ours, "page.html")):
        d.mkdir()
        (d / name).write_bytes(b"x")
    with pytest.warns(UserWarning, match="removed the temporary output of process"):
        with StoreWriter(tmp_path / "store", (2, 3), np.eye(4), (1, 1, 3), ["a"]) as w:
            w.add(np.zeros((2, 3), np.float32), condition="a", label=0, split="train")
    assert not any(d.exists() for d in stale)
    assert live.exists() and foreign.exists() and not_ours.exists() and (tmp_path / "store" / "store.json").is_file()
    assert remove_stale(tmp_path) == []


def test_prepare_needs_no_network(tmp_path, capsys, monkeypatch, rng):
    """Run time is offline: any attempt to open a connection fails this test."""
    import socket

    from test_data_readers import GRID, make_hcp

    def refuse(*args, **kwargs):
        raise AssertionError("fmrisynth tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    root = make_hcp(tmp_path / "hcp", rng)
    assert main(["prepare", "--source", "hcp", str(root), "--out", str(tmp_path / "s"), "--grid", GRID, "--quiet"]) == 0
    assert "prepared" in capsys.readouterr().out

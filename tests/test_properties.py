"""Property-based tests of the readers: a damaged input is read correctly or refused with our error.

Hypothesis feeds each reader random corruptions of a valid file -- truncation, bit flips (in the
raw bytes and, for gzip, inside the compressed stream), spliced-in garbage, pure garbage -- and the
only acceptable outcomes are a read whose result is well-formed (the advertised shape, finite
values, events with finite onsets inside the run) or ``FmrisynthError``. Any other exception
(a numpy, nibabel, pandas, zlib or UnicodeDecodeError traceback, a MemoryError) fails the test.
"""

import gzip
import io
import json
import math
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fmrisynth.data.bids import read_events, read_sidecar  # noqa: E402
from fmrisynth.data.hcp import read_ev  # noqa: E402
from fmrisynth.data.nifti import Run, check_events, check_tr, load_run, open_image  # noqa: E402
from fmrisynth.errors import FmrisynthError  # noqa: E402

FAST = settings(max_examples=60, deadline=None, database=None)
N_FRAMES, TR = 12, 2.0


def _nifti_bytes() -> bytes:
    rng = np.random.default_rng(0)
    img = nib.Nifti1Image((1000 + 10 * rng.standard_normal((4, 5, 3, N_FRAMES))).astype(np.float32), np.diag([3.0, 3, 3, 1]))
    img.header.set_zooms((3.0, 3.0, 3.0, TR))
    buf = io.BytesIO()
    nib.Nifti1Image.from_image(img).to_file_map({"image": nib.FileHolder(fileobj=buf), "header": nib.FileHolder(fileobj=buf)})
    return buf.getvalue()


NIFTI = _nifti_bytes()
EVENTS = b"onset\tduration\ttrial_type\n2.0\t6.0\tface\n10.0\t4.0\thouse\n20.0\t2.0\tn/a\n"
SIDECAR = json.dumps({"RepetitionTime": TR, "TaskName": "look", "SliceTiming": [0.0, 0.5, 1.0]}).encode()
EV = b"2.0\t6.0\t1\n12.5\t4.0\t1\n0\t0\t0\n"


@st.composite
def corrupted(draw, data: bytes) -> bytes:
    """``data`` truncated, bit-flipped, with garbage spliced in, or replaced by garbage."""
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "garbage"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "garbage":
        return draw(st.binary(max_size=400))
    out = bytearray(data)
    if kind == "flip":
        for pos, bit in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)), min_size=1, max_size=6)):
            out[pos] ^= 1 << bit
        return bytes(out)
    at = draw(st.integers(0, len(data)))
    return bytes(out[:at]) + draw(st.binary(min_size=1, max_size=64)) + bytes(out[at:])


def _file(folder: str, name: str, content: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(content)
    return path


def _read_run(path: Path) -> None:
    """Read like prepare does; a successful read must be well-formed."""
    img = open_image(path)
    run = Run(path=path, dataset="d", subject="s", task="t", run="1", pe="", tr=TR, shape=tuple(img.shape), affine=img.affine)
    data, bad = load_run(run)
    assert data.shape == tuple(img.shape) and data.dtype == np.float32 and np.isfinite(data).all()
    assert np.isfinite(img.affine).all() and abs(np.linalg.det(img.affine[:3, :3])) > 0
    assert bad is None or bad.shape == tuple(img.shape[:3])


def _expect_read_or_our_error(read, *args) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read(*args)
        except FmrisynthError as e:
            assert len(str(e).splitlines()) == 1


@FAST
@given(damaged=corrupted(NIFTI), compress=st.sampled_from(["raw", "before", "after"]))
def test_nifti_reader_reads_or_refuses(damaged, compress):
    """Uncompressed damage, damage under a valid gzip stream, and damage to the gzip stream itself."""
    with tempfile.TemporaryDirectory() as folder:
        if compress == "raw":
            path = _file(folder, "run_bold.nii", damaged)
        elif compress == "before":
            path = _file(folder, "run_bold.nii.gz", gzip.compress(damaged, mtime=0))
        else:  # the same damage, applied to the compressed bytes instead
            path = _file(folder, "run_bold.nii.gz", damaged)
        _expect_read_or_our_error(_read_run, path)


@FAST
@given(damaged=corrupted(gzip.compress(NIFTI, mtime=0)))
def test_gzipped_nifti_reader_reads_or_refuses(damaged):
    with tempfile.TemporaryDirectory() as folder:
        _expect_read_or_our_error(_read_run, _file(folder, "run_bold.nii.gz", damaged))


def _read_events(path: Path) -> None:
    events = read_events(path, "look")
    check_events(events, N_FRAMES, TR, path)
    for condition, items in events.items():
        assert condition.startswith("look:")
        for onset, duration in items:
            assert math.isfinite(onset) and math.isfinite(duration) and 0 <= onset < N_FRAMES * TR and duration >= 0


@FAST
@given(damaged=corrupted(EVENTS))
def test_bids_events_reader_reads_or_refuses(damaged):
    with tempfile.TemporaryDirectory() as folder:
        _expect_read_or_our_error(_read_events, _file(folder, "sub-01_task-look_events.tsv", damaged))


def _read_sidecar(root: Path) -> None:
    img = nib.Nifti1Image(np.zeros((2, 2, 2, N_FRAMES), np.float32), np.eye(4))
    meta = read_sidecar(root / "sub-01" / "func" / "sub-01_task-look_bold.nii.gz", root)
    assert isinstance(meta, dict)
    tr = check_tr(meta.get("RepetitionTime"), img, root, "sidecar RepetitionTime")
    assert isinstance(tr, float) and math.isfinite(tr) and tr > 0


@FAST
@given(damaged=corrupted(SIDECAR))
def test_bids_sidecar_reader_reads_or_refuses(damaged):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "sub-01" / "func").mkdir(parents=True)
        _file(folder, "task-look_bold.json", damaged)
        _expect_read_or_our_error(_read_sidecar, root)


def _read_ev(path: Path) -> None:
    items = read_ev(path)
    check_events({"MOTOR:rh": items}, N_FRAMES, TR, path)
    assert all(math.isfinite(o) and math.isfinite(d) and o >= 0 and d >= 0 for o, d in items)


@FAST
@given(damaged=corrupted(EV))
def test_hcp_ev_reader_reads_or_refuses(damaged):
    with tempfile.TemporaryDirectory() as folder:
        _expect_read_or_our_error(_read_ev, _file(folder, "rh.txt", damaged))


def test_the_valid_files_read():
    """The properties above are not vacuous: the undamaged files read."""
    with tempfile.TemporaryDirectory() as folder:
        _read_run(_file(folder, "a_bold.nii", NIFTI))
        _read_run(_file(folder, "b_bold.nii.gz", gzip.compress(NIFTI)))
        _read_events(_file(folder, "e_events.tsv", EVENTS))
        _read_ev(_file(folder, "rh.txt", EV))
        (Path(folder) / "sub-01" / "func").mkdir(parents=True)
        _file(folder, "task-look_bold.json", SIDECAR)
        _read_sidecar(Path(folder))

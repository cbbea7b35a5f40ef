"""Outputs appear whole or not at all, what a killed writer leaves is removed by the next one, and
the paths an output records stay valid when its folder tree is moved or used from anywhere.

One scheme for every output (stores, ``sample``'s BIDS datasets, evaluations, single files): a
writer stages its output under ``.<name>.tmp-<host>-<pid>`` beside the target and publishes it with
one rename. Where the target folder already exists and must keep what else is in it (a dataset
that gains a task, an evaluation folder holding a user's notes), each staged file replaces its
namesake instead, and nothing else in the folder is touched; an exception half-way moves them all
back. Before staging, a writer removes the
temporaries in the same folder whose process is gone (SIGKILL, power loss): the README's promise
"temporaries left by a killed process are removed by the next run in the same folder".

A file that names another file (a store's dataset root, a latent store's VQ-GAN and clip store,
``stage2.json``'s stores and VQ-GAN) records it relative to its own folder (``record_path``) and
reads it back from there (``resolve_recorded``), never from the working directory; absolute paths
recorded by older versions still resolve.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
# .<name>.tmp-<host>-<pid>; without <host>: stores of older versions; .tmp-bids-<pid>: sample's of older versions
TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?:(?P<host>[A-Za-z0-9_.]+)-)?(?P<pid>\d+)|\.tmp-bids-(?P<bids_pid>\d+)")


def temp_path(target: str | Path) -> Path:
    """Where this process stages ``target``: ``.<name>.tmp-<host>-<pid>`` in the same folder."""
    target = Path(os.path.abspath(target))
    return target.with_name(f".{target.name}.tmp-{HOST}-{os.getpid()}")


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (another user's, or one we cannot tell: yes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (or we cannot tell): alive
        return True
    return True


def remove_stale(folder: str | Path) -> list[Path]:
    """Delete the temporaries in ``folder`` left by writers that no longer run; return them.

    Only names of this scheme count, and only those made on this host (a shared file system may
    hold another machine's live writer) by a process that is gone; live writers are left alone.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = TEMP.fullmatch(entry.name)
        if not m:
            continue
        pid = int(m["pid"] or m["bids_pid"])
        if m["host"] not in (None, HOST) or pid == os.getpid() or alive(pid):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except OSError:
            continue
        warnings.warn(f"{entry}: removed the temporary output of process {pid}, which is gone", stacklevel=3)
        removed.append(entry)
    return removed


def publish(tmp: Path, target: Path) -> None:
    """Put the staged ``tmp`` in place of ``target``: one rename when ``target`` is absent; else each
    staged file replaces its namesake in the existing folder, and nothing else there changes.

    Into an existing folder the files move one at a time; an exception on the way moves them all
    back (the namesakes they replaced included, kept aside in ``tmp`` until the end) and removes
    the folders it made, so the folder is as it was. Only a new target is published by one rename,
    safe against a kill as well.
    """
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(target)
        return
    files = sorted(p for p in tmp.rglob("*") if not p.is_dir())
    aside = tmp / f".replaced.tmp-{HOST}-{os.getpid()}"  # the namesakes replaced, until all is in place
    done: list[tuple[Path, Path, Path | None]] = []  # (staged file, its destination, the namesake kept aside)
    made: list[Path] = []  # folders created in target, deepest last
    try:
        for f in files:
            dest = target / f.relative_to(tmp)
            missing = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
            dest.parent.mkdir(parents=True, exist_ok=True)
            made += reversed(missing)
            old = None
            if dest.exists() or dest.is_symlink():
                old = aside / f.relative_to(tmp)
                old.parent.mkdir(parents=True, exist_ok=True)
                dest.replace(old)
            done.append((f, dest, old))
            f.replace(dest)
    except BaseException:
        for f, dest, old in reversed(done):
            if not f.exists() and (dest.exists() or dest.is_symlink()):
                dest.replace(f)
            if old is not None and old.exists():
                old.replace(dest)
        for d in reversed(made):
            with suppress(OSError):
                d.rmdir()
        raise


@contextmanager
def staged(target: str | Path) -> Iterator[Path]:
    """A fresh temporary folder to write ``target``'s files into, published when the block succeeds
    (``publish``) and deleted when it fails; stale temporaries beside ``target`` go first."""
    target = Path(os.path.abspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent)
    tmp = temp_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_file(target: str | Path) -> Iterator[Path]:
    """A temporary path to write the single file ``target`` into, renamed over it when the block succeeds."""
    target = Path(os.path.abspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent)
    tmp = temp_path(target)
    try:
        yield tmp
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def record_path(path: str | Path, relative_to_file: str | Path) -> str:
    """``path`` as the file ``relative_to_file`` records it: relative to that file's folder (both
    resolved), so that a run folder moved or shared with what it names still finds it."""
    return os.path.relpath(Path(path).resolve(), Path(relative_to_file).resolve().parent)


def resolve_recorded(text: str | Path, file: str | Path) -> Path:
    """The path ``file`` recorded as ``text``: a relative one from ``file``'s folder, an absolute one as it is."""
    path = Path(text)
    return path if path.is_absolute() else Path(os.path.normpath(Path(file).resolve().parent / path))

"""The one exception type for problems the user can fix (bad input, bad arguments, missing files)."""

from __future__ import annotations

from pathlib import Path


class FmrisynthError(Exception):
    """A user-facing error naming the offending file (if any) and the reason, in one line.

    The CLI prints ``str(error)`` and exits with status 1; library code raises it instead of letting
    numpy or nibabel tracebacks escape, so a user always learns *which* file is wrong and *why*.

    Args:
        reason: what is wrong, phrased for the user ("TR is 0 s; expected a positive number").
        path: the file or directory at fault, if there is one.
    """

    def __init__(self, reason: str, path: str | Path | None = None):
        self.reason = reason
        self.path = None if path is None else Path(path)
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)

"""fmrisynth: conditional synthesis of whole-brain 4D task fMRI.

The package is layered so that data flows one way (docs/design.md, "Layers"; tests/test_layers.py):
``data``, ``models`` ← ``training`` ← ``generate`` ← ``evaluate`` ← ``pipeline`` ← ``cli``.
Importing the package is cheap; heavy libraries are imported where they are used.
"""

from fmrisynth.errors import FmrisynthError

__all__ = ["FmrisynthError", "__version__"]


def __getattr__(name: str):
    if name == "__version__":  # the installed distribution's, so that pyproject.toml is its one source
        from importlib.metadata import version

        return version("fmrisynth")
    raise AttributeError(f"module 'fmrisynth' has no attribute {name!r}")

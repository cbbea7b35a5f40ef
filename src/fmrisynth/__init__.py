"""fmrisynth: conditional synthesis of whole-brain 4D task fMRI.

The package is layered so that data flows one way (see docs/design.md):
``data`` ← ``models`` ← ``diffusion`` ← ``train`` ← ``evaluate`` ← ``cli``.
Importing the package is cheap; heavy libraries are imported where they are used.
"""

from fmrisynth.errors import FmrisynthError

__version__ = "0.1.0"
__all__ = ["FmrisynthError", "__version__"]

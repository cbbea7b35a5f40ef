"""Generation: codec (VQ-GAN), sampling of clips and whole runs, BIDS output, synthetic datasets.

``fmrisynth.generate.SyntheticClips`` is imported on first use, so that importing a submodule
(the CLI's ``sample`` verb) does not pay for torch's Dataset machinery it does not need.
"""

__all__ = ["SyntheticClips"]


def __getattr__(name: str):
    if name == "SyntheticClips":
        from fmrisynth.generate.synthetic import SyntheticClips

        return SyntheticClips
    raise AttributeError(f"module 'fmrisynth.generate' has no attribute {name!r}")

"""flareseg: fast coarse-to-fine abdominal CT organ and tumor segmentation in PyTorch.

`flareseg.segment(image, output, coarse=..., fine=...)` segments one CT in one call (see flareseg.api).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`flareseg.segment` without importing torch when only the version is asked for."""
    if name in ("segment", "Segmentation"):
        from flareseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'flareseg' has no attribute {name!r}")

"""flareseg: fast coarse-to-fine abdominal CT organ and tumor segmentation in PyTorch."""

__version__ = "0.1.0"

"""Image input/output with exact geometry, and reorientation to one canonical axis order."""

from flareseg.io.geometry import Geometry
from flareseg.io.image_io import (
    IMAGE_SUFFIXES,
    ImageReadError,
    image_suffix,
    is_dicom_dir,
    read_image,
    strip_image_suffix,
    to_sitk,
    write_image,
)
from flareseg.io.orientation import Reorientation, from_canonical, plan_reorientation, to_canonical

__all__ = [
    "IMAGE_SUFFIXES",
    "Geometry",
    "ImageReadError",
    "Reorientation",
    "from_canonical",
    "image_suffix",
    "is_dicom_dir",
    "plan_reorientation",
    "read_image",
    "strip_image_suffix",
    "to_canonical",
    "to_sitk",
    "write_image",
]

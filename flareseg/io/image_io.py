"""Read and write 3D images (NIfTI, NRRD, MHA, DICOM series) as [z, y, x] arrays with their geometry."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flareseg.atomic import atomic_write
from flareseg.io.dicom import read_dicom_series
from flareseg.io.errors import ImageReadError
from flareseg.io.geometry import Geometry
from flareseg.io.gzip_check import scan_gzip, verify_gzip_voxels
from flareseg.io.nifti_check import check_nifti
from flareseg.io.stream_check import verify_compressed_voxels

# Longest first, so that ".nii.gz" wins over ".gz"-less matches.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def image_suffix(path: str | os.PathLike) -> str | None:
    """The supported image suffix of a file name (".nii.gz", ...), or None."""
    name = Path(path).name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def strip_image_suffix(path: str | os.PathLike) -> str:
    """File name without its image suffix: "case_0000.nii.gz" -> "case_0000"."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


def is_dicom_dir(path: str | os.PathLike) -> bool:
    """True when a folder holds at least one DICOM series that GDCM can find."""
    path = Path(path)
    return path.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def geometry_of(image: sitk.Image) -> Geometry:
    """The geometry record of a SimpleITK image (spacing and shape turned into [z, y, x] order)."""
    return Geometry(
        spacing=image.GetSpacing()[::-1],
        origin=image.GetOrigin(),
        direction=image.GetDirection(),
        shape=image.GetSize()[::-1],
    )


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image holding `array` ([z, y, x]) placed exactly at `geometry`."""
    if tuple(array.shape) != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match the geometry's shape {geometry.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    image.SetSpacing(geometry.spacing_xyz)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read a 3D scalar image file or DICOM series folder into a [z, y, x] array and its geometry.

    Raises ImageReadError naming the file and the reason for anything unusable: unreadable, truncated or corrupt
    files (the checksum of compressed .nii.gz, .mha or .nrrd data must match the voxels ITK returns), non-3D or
    vector images, NaN or infinite voxels (looked for in the raw NIfTI data, which ITK turns into 0), zero or
    negative spacing, DICOM series with missing, duplicated or unevenly spaced slices or mixed orientations.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file or folder")
    suffix = image_suffix(path) if path.is_file() else None
    header = check_nifti(path) if suffix in (".nii", ".nii.gz") else None
    try:
        image = read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as error:
        if suffix == ".nii.gz":
            scan_gzip(path, header)  # a damaged stream is the likely cause: name it
        raise ImageReadError(path, f"cannot be read as an image ({_itk_reason(error)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(
            path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar image"
        )
    if suffix == ".nii.gz":
        verify_gzip_voxels(path, sitk.GetArrayViewFromImage(image), header)
    elif suffix in (".mha", ".nrrd"):
        verify_compressed_voxels(path, suffix, sitk.GetArrayViewFromImage(image))
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise ImageReadError(path, f"is {image.GetDimension()}D with size {image.GetSize()}; expected a 3D volume")
    if min(image.GetSize()) < 2:
        raise ImageReadError(path, f"has size {image.GetSize()}; a 3D volume needs at least 2 voxels per axis")
    try:
        geometry = geometry_of(image)
    except ValueError as error:
        raise ImageReadError(path, f"has an invalid header ({error})") from None
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and (count := _count_non_finite(array)):
        raise ImageReadError(path, f"contains {count} NaN or infinite voxels")
    return array, geometry


def _count_non_finite(array: np.ndarray) -> int:
    """NaN and infinite voxels of a float array. A float64 sum is finite exactly when every voxel is (float32 voxels
    cannot overflow it), and takes one pass without a 200 MB mask; voxels are counted only when it is not."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(array, axis=None, dtype=np.float64)):
            return 0
    return int(np.count_nonzero(~np.isfinite(array)))


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: Geometry, compress: bool = True) -> Path:
    """Write `array` with exactly `geometry`, atomically: a crash never leaves a partial file at `path`."""
    path = Path(path)
    suffix = image_suffix(path)
    if suffix is None:
        raise ValueError(f"{path}: unsupported output format; use one of {', '.join(IMAGE_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = to_sitk(array, geometry)
    use_compression = compress and suffix != ".nii"
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=use_compression))


def _itk_reason(error: RuntimeError) -> str:
    """The informative last line of an ITK exception message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[-1] if lines else "unknown error"
    return reason.removeprefix("itk::ERROR: ")[:300]

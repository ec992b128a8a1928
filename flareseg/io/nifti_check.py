"""Checks for NIfTI files on what ITK lets through: zero spacing (ITK silently turns it into 1 mm), truncated data
(ITK returns zeros for the missing part without an error) and NaN or infinite float voxels (ITK's NIfTI reader
replaces them with 0, so they cannot be seen in what it returns).

The header is parsed here only to validate the file; ITK alone interprets it for the voxels and the geometry that
`read_image` returns.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flareseg.io.errors import ImageReadError

# (dim format, dim offset, datatype offset, bitpix offset, pixdim format, pixdim offset, vox_offset format, offset)
_LAYOUTS = {
    348: ("8h", 40, 70, 72, "8f", 76, "f", 108),  # NIfTI-1
    540: ("8q", 16, 12, 14, "8d", 104, "q", 168),  # NIfTI-2
}
_FLOAT_DATATYPES = {16: "f4", 64: "f8"}  # NIFTI_TYPE_FLOAT32, NIFTI_TYPE_FLOAT64
_BLOCK = 1 << 24  # bytes counted at a time: bounded memory on any volume (a multiple of every item size)


@dataclass(frozen=True)
class NiftiHeader:
    """The few header fields the checks need."""

    byte_order: str  # "<" or ">"
    dims: tuple[int, ...]  # dim[0..7]
    datatype: int
    bitpix: int
    pixdim: tuple[float, ...]
    vox_offset: int  # where the voxel data starts in the (uncompressed) file

    @property
    def data_bytes(self) -> int:
        """Bytes of voxel data the header announces."""
        return _product(self.dims[1 : self.dims[0] + 1]) * self.bitpix // 8

    @property
    def float_dtype(self) -> np.dtype | None:
        """The raw numpy dtype of float voxels, None for every other datatype."""
        code = _FLOAT_DATATYPES.get(self.datatype)
        return np.dtype(self.byte_order + code) if code else None


def check_nifti(path: Path) -> NiftiHeader | None:
    """Validate a .nii or .nii.gz file before ITK reads it; its header, or None if it is not one we know.

    Raises ImageReadError for an unreadable start, an invalid dimension count, zero or non-finite spacing, and,
    for an uncompressed file, truncated data and non-finite float voxels (a .nii.gz file's data is checked after
    the read, against its gzip trailer: see gzip_check).
    """
    compressed = path.name.lower().endswith(".gz")
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as handle:
            head = handle.read(540)
    except (OSError, EOFError, zlib.error) as error:
        raise ImageReadError(path, f"cannot be read as an image ({error})") from None
    header = parse_header(head)
    if header is None:
        return None  # not a NIfTI header we know; ITK will judge it
    ndim = header.dims[0]
    if not 1 <= ndim <= 7:
        raise ImageReadError(path, f"has an invalid NIfTI header (dim[0] = {ndim})")
    spacing = header.pixdim[1 : min(ndim, 3) + 1]
    if any(not np.isfinite(s) or s == 0 for s in spacing):
        raise ImageReadError(path, f"has zero or non-finite voxel spacing in its header (pixdim {list(spacing)})")
    if not compressed:
        expected = header.vox_offset + header.data_bytes
        actual = path.stat().st_size
        if actual < expected:
            raise ImageReadError(path, f"is truncated: {actual} bytes where the header needs {expected}")
        if header.float_dtype is not None:
            data = np.memmap(path, np.uint8, "r", offset=header.vox_offset, shape=header.data_bytes)
            counter = NonFiniteCounter(header.float_dtype)
            for start in range(0, data.size, _BLOCK):
                counter.feed(data[start : start + _BLOCK])
            raise_if_non_finite(path, counter.count)
    return header


def parse_header(head: bytes) -> NiftiHeader | None:
    """The NIfTI-1 or NIfTI-2 header at the start of `head`, in either byte order; None if there is none."""
    for order in "<>":
        if len(head) < 4:
            return None
        (size,) = struct.unpack(order + "i", head[:4])
        if size in _LAYOUTS and len(head) >= size:
            dim_fmt, dim_at, type_at, bitpix_at, pix_fmt, pix_at, vox_fmt, vox_at = _LAYOUTS[size]
            (vox_offset,) = struct.unpack_from(order + vox_fmt, head, vox_at)
            return NiftiHeader(
                byte_order=order,
                dims=struct.unpack_from(order + dim_fmt, head, dim_at),
                datatype=struct.unpack_from(order + "h", head, type_at)[0],
                bitpix=struct.unpack_from(order + "h", head, bitpix_at)[0],
                pixdim=struct.unpack_from(order + pix_fmt, head, pix_at),
                vox_offset=max(int(vox_offset), size),
            )
    return None


class NonFiniteCounter:
    """Counts NaN and infinite values in raw float data fed in pieces of any length (a piece may split a value)."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.count = 0
        self._carry = b""  # the first bytes of a value split between two pieces

    def feed(self, piece) -> None:
        piece = memoryview(piece).cast("B")
        if self._carry:
            take = min(self.dtype.itemsize - len(self._carry), len(piece))
            self._carry += bytes(piece[:take])
            piece = piece[take:]
            if len(self._carry) < self.dtype.itemsize:
                return
            self._count(np.frombuffer(self._carry, self.dtype))
            self._carry = b""
        whole = len(piece) - len(piece) % self.dtype.itemsize
        self._count(np.frombuffer(piece[:whole], self.dtype))
        self._carry = bytes(piece[whole:])

    def _count(self, values: np.ndarray) -> None:
        self.count += values.size - int(np.count_nonzero(np.isfinite(values)))


def raise_if_non_finite(path: Path, count: int) -> None:
    """The one message for NaN or infinite voxels, whichever check found them."""
    if count:
        raise ImageReadError(path, f"contains {count} NaN or infinite voxels")


def _product(values) -> int:
    out = 1
    for v in values:
        out *= max(int(v), 1)
    return out

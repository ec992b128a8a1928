"""Header checks for NIfTI files that ITK lets through: zero spacing (ITK silently turns it into 1 mm) and
truncated data (ITK's gzip reader returns zeros for the missing part without an error)."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

# (header size, dim format, dim offset, bitpix offset, pixdim format, pixdim offset, vox_offset format, offset)
_LAYOUTS = {
    348: ("8h", 40, 72, "8f", 76, "f", 108),  # NIfTI-1
    540: ("8q", 16, 14, "8d", 104, "q", 168),  # NIfTI-2
}


def check_nifti(path: Path) -> str | None:
    """The reason a NIfTI file is unusable, or None when its header and data length are sound."""
    compressed = path.name.lower().endswith(".gz")
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as handle:
            head = handle.read(540)
    except (OSError, EOFError, zlib.error) as error:
        return f"cannot be read as an image ({error})"
    parsed = _parse(head)
    if parsed is None:
        return None  # not a NIfTI header we know; ITK will judge it
    dims, bitpix, pixdim, vox_offset = parsed
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        return f"has an invalid NIfTI header (dim[0] = {ndim})"
    spacing = pixdim[1 : min(ndim, 3) + 1]
    if any(not (s == s and abs(s) < float("inf")) or s == 0 for s in spacing):
        return f"has zero or non-finite voxel spacing in its header (pixdim {list(spacing)})"
    expected = int(vox_offset) + _product(dims[1 : ndim + 1]) * bitpix // 8
    actual = _data_length(path, compressed, expected)
    if actual is not None and actual < expected:
        return f"is truncated: {actual} bytes of image data where the header needs {expected}"
    return None


def _parse(head: bytes):
    for order in "<>":
        if len(head) < 4:
            return None
        (size,) = struct.unpack(order + "i", head[:4])
        if size in _LAYOUTS and len(head) >= size:
            dim_fmt, dim_at, bitpix_at, pix_fmt, pix_at, vox_fmt, vox_at = _LAYOUTS[size]
            dims = struct.unpack_from(order + dim_fmt, head, dim_at)
            (bitpix,) = struct.unpack_from(order + "h", head, bitpix_at)
            pixdim = struct.unpack_from(order + pix_fmt, head, pix_at)
            (vox_offset,) = struct.unpack_from(order + vox_fmt, head, vox_at)
            return dims, bitpix, pixdim, max(vox_offset, size)
    return None


def _data_length(path: Path, compressed: bool, expected: int) -> int | None:
    """Uncompressed length of the file; for gzip first from its trailer (O(1)), decompressing only if it disagrees."""
    if not compressed:
        return path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(-4, 2)
        (trailer_size,) = struct.unpack("<I", handle.read(4))
    if trailer_size == expected % (1 << 32):
        return None  # the gzip trailer records exactly the expected length
    total = 0
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(1 << 16):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        return total  # the stream ends early: what could be read is all there is
    return total


def _product(values) -> int:
    out = 1
    for v in values:
        out *= max(int(v), 1)
    return out

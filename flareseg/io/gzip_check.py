"""Integrity of a .nii.gz read: ITK never checks a gzip stream's CRC-32, so a bit flip in the compressed data
gives wrong voxels without an error. Here the voxels ITK returned are checked against the gzip trailer instead.

Fast path, no second decompression: when ITK's voxel buffer holds the file's raw data bytes (same type and byte
order, no scaling; true for every file ITK or nibabel writes without scl_slope), the CRC-32 of the file's first
bytes (its header, decompressed alone) continued over that buffer must equal the trailer's CRC-32, and the lengths
must add up to the trailer's ISIZE. A match proves that the voxels are the bytes that were compressed, NaN and
infinite values included (ITK's reader turns them into 0, which would change the CRC).

Any mismatch (damage, but also scaled or big-endian data, a multi-member stream) falls back to `scan_gzip`: one
streaming decompression in bounded memory that verifies every member's CRC-32 and length, finds truncation, and
counts non-finite float voxels in the raw data. Its verdict decides, so a mismatch alone never rejects a file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from flareseg.io.errors import ImageReadError
from flareseg.io.nifti_check import NiftiHeader, NonFiniteCounter, raise_if_non_finite

_MAX_HEAD = 1 << 24  # header + extensions longer than this go to the scan (bounded memory)
_CHUNK = 1 << 22  # bytes decompressed at a time by the scan
_DAMAGED = "the file is damaged; restore it from its source or export it again"


def verify_gzip_voxels(path: Path, voxels: np.ndarray, header: NiftiHeader | None) -> None:
    """Raise ImageReadError unless `voxels` (ITK's C-contiguous buffer) are the data of the gzip file at `path`."""
    if _voxels_match_trailer(path, voxels):
        return
    scan_gzip(path, header)


def scan_gzip(path: Path, header: NiftiHeader | None) -> None:
    """Decompress the whole file once, streaming; raise ImageReadError if it is corrupt, truncated, shorter than
    its header needs, or (float data) holds NaN or infinite voxels."""
    float_dtype = header.float_dtype if header is not None else None
    counter = NonFiniteCounter(float_dtype) if float_dtype is not None else None
    data_start = header.vox_offset if header is not None else 0
    data_stop = data_start + header.data_bytes if header is not None else 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    position = 0
    try:
        with gzip.open(path, "rb") as stream:
            while length := stream.readinto(buffer):
                if counter is not None and position < data_stop and position + length > data_start:
                    counter.feed(view[max(data_start - position, 0) : min(data_stop - position, length)])
                position += length
    except EOFError:
        needs = f" where the header needs {data_stop}" if header is not None else ""
        raise ImageReadError(path, f"is truncated: its gzip stream ends after {position} bytes{needs}") from None
    except gzip.BadGzipFile as error:
        raise ImageReadError(path, f"corrupt gzip data ({_gzip_reason(error)}): {_DAMAGED}") from None
    except zlib.error as error:
        raise ImageReadError(path, f"corrupt gzip data ({error}): {_DAMAGED}") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot be read ({error})") from None
    if position < data_stop:
        raise ImageReadError(path, f"is truncated: {position} bytes of data where the header needs {data_stop}")
    if counter is not None:
        raise_if_non_finite(path, counter.count)


def _voxels_match_trailer(path: Path, voxels: np.ndarray) -> bool:
    """Whether CRC-32 and length of (the file's first bytes + `voxels`) are those in the gzip trailer."""
    if not voxels.flags.c_contiguous:
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(-8, 2)
            crc, isize = struct.unpack("<II", handle.read(8))
        head_length = (isize - voxels.nbytes) % (1 << 32)  # ISIZE is the length modulo 2^32
        if head_length > _MAX_HEAD:
            return False
        with gzip.open(path, "rb") as stream:
            head = stream.read(head_length)
    except (OSError, EOFError, zlib.error):
        return False  # the scan says what is wrong
    return len(head) == head_length and zlib.crc32(voxels, zlib.crc32(head)) == crc


def _gzip_reason(error: gzip.BadGzipFile) -> str:
    """Python's reason without the checksum values: "CRC check failed", "length check failed", ..."""
    text = str(error)
    if text.startswith("CRC check failed"):
        return "CRC check failed"
    if text.startswith("Incorrect length"):
        return "length check failed"
    return text

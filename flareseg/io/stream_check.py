"""Integrity of compressed .mha and .nrrd reads: ITK ignores their checksums too. A bit flip in a compressed .mha
(zlib, Adler-32) gives wrong voxels with only "Uncompress failed" printed; in a gzip-encoded .nrrd (CRC-32) some
flips go unnoticed.

As for .nii.gz (see gzip_check), the voxels ITK returned are checked against the stream's own checksum, which in
these formats covers the voxel data alone: zlib.adler32 or zlib.crc32 of ITK's buffer must equal the value at the
end of the file. Any mismatch (damage, or data ITK converted, such as big-endian voxels) falls back to one streaming
decompression of the data from where the header ends, which decides. Only the few header fields that say whether
and where the data is compressed are read here; ITK interprets the rest.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from flareseg.io.errors import ImageReadError

_HEADER_LIMIT = 1 << 16  # a text header longer than this is not one these checks know; left to ITK
_CHUNK = 1 << 16  # compressed bytes per step: at most ~64 MB of output each (deflate expands at most 1032x)
_DAMAGED = "the file is damaged; restore it from its source or export it again"


def verify_compressed_voxels(path: Path, suffix: str, voxels: np.ndarray) -> None:
    """Raise ImageReadError unless `voxels` (ITK's C-contiguous buffer) are the data of a compressed .mha or .nrrd;
    uncompressed files and layouts these checks do not know (detached data files) pass unchecked."""
    layout = _mha_layout(path) if suffix == ".mha" else _nrrd_layout(path)
    if layout is None:
        return
    codec, data_start = layout
    with open(path, "rb") as handle:
        handle.seek(-8, 2)
        trailer = handle.read(8)
    if voxels.flags.c_contiguous:
        if codec == "zlib" and zlib.adler32(voxels) == struct.unpack(">I", trailer[4:])[0]:
            return
        crc, isize = struct.unpack("<II", trailer)
        if codec == "gzip" and isize == voxels.nbytes % (1 << 32) and zlib.crc32(voxels) == crc:
            return
    _scan(path, codec, data_start, voxels.nbytes)


def _scan(path: Path, codec: str, data_start: int, needed: int) -> None:
    """Decompress the data once, streaming; raise ImageReadError if it is corrupt or shorter than `needed`."""
    produced = 0
    try:
        with open(path, "rb") as handle:
            handle.seek(data_start)
            if codec == "gzip":
                with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
                    while chunk := stream.read(1 << 22):
                        produced += len(chunk)
            else:
                decompressor = zlib.decompressobj()
                while not decompressor.eof and (chunk := handle.read(_CHUNK)):
                    produced += len(decompressor.decompress(chunk))
                if not decompressor.eof:
                    raise EOFError
    except EOFError:
        raise ImageReadError(path, f"is truncated: its compressed data ends after {produced} bytes") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        text = str(error)
        reason = "checksum failed" if "data check" in text or "CRC check" in text else text
        reason = "length check failed" if text.startswith("Incorrect length") else reason
        raise ImageReadError(path, f"corrupt {codec} data ({reason}): {_DAMAGED}") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot be read ({error})") from None
    if produced < needed:
        raise ImageReadError(path, f"is truncated: {produced} bytes of image data where {needed} are needed")


def _mha_layout(path: Path) -> tuple[str, int] | None:
    """("zlib", data offset) for a compressed MetaImage with its data in the file, else None."""
    fields, data_start = _text_header(path, b"=", lambda key, _: key == "elementdatafile")
    if data_start is None or fields.get("compresseddata", "").lower() != "true":
        return None
    return ("zlib", data_start) if fields["elementdatafile"].lower() == "local" else None


def _nrrd_layout(path: Path) -> tuple[str, int] | None:
    """("gzip", data offset) for a gzip-encoded NRRD with its data in the file, else None."""
    fields, data_start = _text_header(path, b":", lambda key, line: line == b"")
    if data_start is None or fields.get("encoding", "").lower() not in ("gzip", "gz"):
        return None
    return None if "data file" in fields or "datafile" in fields else ("gzip", data_start)


def _text_header(path: Path, separator: bytes, is_last) -> tuple[dict[str, str], int | None]:
    """The "key <separator> value" lines of a text header (keys lower-cased) and the offset just after the line
    for which `is_last(key, line)` holds; (fields, None) when no such line comes within the limit."""
    with open(path, "rb") as handle:
        head = handle.read(_HEADER_LIMIT)
    fields, position = {}, 0
    while (end := head.find(b"\n", position)) >= 0:
        line = head[position:end].rstrip(b"\r")
        key, _, value = line.partition(separator)
        key = key.strip().decode("latin-1").lower()
        fields[key] = value.strip().decode("latin-1")
        position = end + 1
        if is_last(key, line):
            return fields, position
    return fields, None

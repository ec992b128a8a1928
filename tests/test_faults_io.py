"""Faults of the image reader: it must never return wrong voxels or a wrong geometry without an error.

Each test builds the attack (a bit flip in compressed data, a truncated file, NaN voxels that ITK turns into 0, a
DICOM series with a missing, duplicated, tilted or re-oriented slice), shows where ITK alone accepts it, and checks
that `read_image` rejects it with one line naming the file and the reason.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flareseg.io import Geometry, ImageReadError, gzip_check, read_image, write_image
from flareseg.io.dicom import check_slice_positions


def _rejected(path: Path, reason: str) -> str:
    """read_image's one-line message for `path`, which must hold `reason`."""
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and reason in message and "\n" not in message, message
    return message


@pytest.fixture
def noisy_volume() -> tuple[np.ndarray, Geometry]:
    """Random int16 voxels, large enough (440 kB) that ITK reads the file in several pieces: a smaller .nii.gz is
    inflated whole on ITK's first read, whose zlib then checks the CRC itself."""
    array = np.random.default_rng(3).integers(-1000, 1500, size=(24, 96, 96), dtype=np.int16)
    return array, Geometry((2.5, 0.8, 0.7), (-12.5, 30.25, 101.0), np.eye(3), array.shape)


def _flip_until_crc_error(data: bytes) -> bytes:
    """`data` (a gzip file) with one bit flipped where deflate still decodes, so only the CRC-32 can tell."""
    for offset in range(len(data) // 2, len(data) - 8):
        flipped = bytearray(data)
        flipped[offset] ^= 0x04
        try:
            gzip.decompress(bytes(flipped))
        except gzip.BadGzipFile as error:
            if str(error).startswith("CRC check failed"):
                return bytes(flipped)
        except (zlib.error, EOFError):  # deflate itself noticed this flip; try the next byte
            continue
    raise AssertionError("no flip that only the CRC detects")


@pytest.mark.parametrize("level", ["deflate", "stored"])
def test_bit_flip_in_nii_gz_is_rejected(tmp_path, noisy_volume, level):
    array, geometry = noisy_volume
    good = write_image(tmp_path / "good.nii.gz", array, geometry)
    data = good.read_bytes()
    if level == "stored":  # stored deflate blocks: every data bit decodes, any flip changes a voxel
        data = gzip.compress(gzip.decompress(data), compresslevel=0)
    bad = tmp_path / "flipped.nii.gz"
    bad.write_bytes(_flip_until_crc_error(data))
    # The attack: ITK reads it without an error, with other voxels.
    assert not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(bad))), array)
    message = _rejected(bad, "corrupt gzip data (CRC check failed)")
    assert "damaged" in message


def _silent_flip(path: Path, array: np.ndarray) -> Path:
    """A copy of `path` with one bit flipped where ITK reads it without an error, with other voxels."""
    data = path.read_bytes()
    flipped = path.with_name(f"flipped{path.suffix}")
    for offset in range(len(data) // 2, len(data) - 8, 101):
        flipped.write_bytes(data[:offset] + bytes([data[offset] ^ 0x04]) + data[offset + 1 :])
        try:
            if not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(flipped))), array):
                return flipped
        except RuntimeError:
            continue  # ITK noticed this one
    raise AssertionError("no flip that ITK misses")


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_bit_flip_in_compressed_mha_and_nrrd_is_rejected(tmp_path, noisy_volume, suffix):
    array, geometry = noisy_volume
    good = write_image(tmp_path / f"good{suffix}", array, geometry)  # compressed: zlib (.mha), gzip (.nrrd)
    assert np.array_equal(read_image(good)[0], array)
    _rejected(_silent_flip(good, array), "data (checksum failed): the file is damaged")
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ImageReadError, match="truncated|cannot be read"):  # ITK itself notices these
        read_image(truncated)


def test_wrong_gzip_length_is_rejected(tmp_path, noisy_volume):
    array, geometry = noisy_volume
    path = write_image(tmp_path / "length.nii.gz", array, geometry)
    data = bytearray(path.read_bytes())
    data[-4:] = struct.pack("<I", struct.unpack("<I", data[-4:])[0] + 2)  # ISIZE, the last 4 bytes
    path.write_bytes(bytes(data))
    # The attack: ITK's zlib notices at its last read, ITK leaves the voxels it had not copied yet at 0.
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[-1] == 0).all()
    _rejected(path, "corrupt gzip data (length check failed)")


@pytest.mark.parametrize("cut", [8, 1000])  # the trailer alone; the trailer and some data
def test_truncated_nii_gz_is_rejected_although_itk_reads_it(tmp_path, noisy_volume, cut):
    array, geometry = noisy_volume
    path = write_image(tmp_path / "cut.nii.gz", array, geometry)
    path.write_bytes(path.read_bytes()[:-cut])
    sitk.ReadImage(str(path))  # no error from ITK: the missing voxels come back as 0
    _rejected(path, "is truncated: its gzip stream ends after")


def test_good_nii_gz_is_verified_without_a_second_decompression(tmp_path, small_volume, monkeypatch):
    array, geometry = small_volume
    path = write_image(tmp_path / "good.nii.gz", array, geometry)

    def no_scan(*args):
        raise AssertionError("a sound file took the slow path")

    monkeypatch.setattr(gzip_check, "scan_gzip", no_scan)
    assert np.array_equal(read_image(path)[0], array)


def test_unusual_but_sound_nii_gz_files_are_read(tmp_path, small_volume):
    """Files whose voxels ITK changes (scaling) or whose trailer covers only a part (several gzip members) miss the
    fast check; the full scan must then accept them."""
    array, geometry = small_volume
    raw = bytearray(gzip.decompress(write_image(tmp_path / "a.nii.gz", array, geometry).read_bytes()))
    members = tmp_path / "members.nii.gz"
    members.write_bytes(gzip.compress(bytes(raw[:1000])) + gzip.compress(bytes(raw[1000:])))
    assert np.array_equal(read_image(members)[0], array)
    raw[112:120] = struct.pack("<ff", 1.0, -1024.0)  # NIfTI-1 scl_slope, scl_inter: ITK returns float32 HU
    scaled = tmp_path / "scaled.nii.gz"
    scaled.write_bytes(gzip.compress(bytes(raw)))
    values, _ = read_image(scaled)
    assert values.dtype == np.float32 and np.array_equal(values, array.astype(np.float32) - 1024)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_nifti_voxels_are_rejected(tmp_path, suffix, dtype):
    array = np.zeros((3, 4, 5), dtype)
    array[1, 2, 3], array[2, 0, 4], array[0, 3, 1] = np.nan, np.inf, -np.inf
    path = tmp_path / f"image{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # ITK hides them as 0
    _rejected(path, "contains 3 NaN or infinite voxels")


def test_finite_float_nifti_is_read(tmp_path):
    array = np.linspace(-1, 1, 60, dtype=np.float32).reshape(3, 4, 5)
    for suffix in (".nii", ".nii.gz"):
        path = tmp_path / f"label{suffix}"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
        assert np.array_equal(read_image(path)[0], array)


def test_non_finite_voxels_of_other_formats_are_counted_and_huge_finite_ones_pass(tmp_path):
    """ITK keeps NaN and infinities in .mha: the check after reading counts them (+inf and -inf too, whose sum is
    NaN); huge finite float64 voxels, whose sum overflows, are not called infinite."""
    array = np.zeros((3, 4, 5), np.float32)
    array[0, 0, 0], array[1, 1, 1] = np.inf, -np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "inf.mha"))
    _rejected(tmp_path / "inf.mha", "contains 2 NaN or infinite voxels")
    huge = np.full((3, 4, 5), 1e308)
    sitk.WriteImage(sitk.GetImageFromArray(huge), str(tmp_path / "huge.mha"))
    assert np.array_equal(read_image(tmp_path / "huge.mha")[0], huge)


# ---- DICOM series --------------------------------------------------------------------------------------------


def _write_series(folder: Path, prefix: str, uid: str, slices: int = 4, step: float = 2.5, **changes) -> list[Path]:
    """A tiny CT series of `slices` files; `changes` maps a slice index to (position, orientation) overrides."""
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(slices):
        position, orientation = changes.get(f"slice{k}", ((10.0, 20.0, 5.0 + k * step), (1, 0, 0, 0, 1, 0)))
        row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
        image = sitk.GetImageFromArray(np.full((1, 6, 7), 100 * k, np.int16))
        image.SetOrigin(position)
        image.SetDirection(tuple(np.column_stack([row, col, np.cross(row, col)]).ravel()))
        tags = {
            "0008|0060": "CT",
            "0008|103e": prefix,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0008|0018": f"{uid}.{k + 1}",
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in orientation),
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        files.append(folder / f"{prefix}_{k:02d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(image)
    return files


def test_dicom_gap_and_duplicate_are_rejected(shared_data, tmp_path):
    source = sorted((shared_data / "ct_dicom_20sl" / "dicom").iterdir())
    gap, duplicate = tmp_path / "gap", tmp_path / "duplicate"
    for folder in (gap, duplicate):
        folder.mkdir()
        for file in source:
            shutil.copyfile(file, folder / file.name)
    (gap / source[10].name).unlink()
    shutil.copyfile(source[10], duplicate / "copy_of_slice_10")
    for folder in (gap, duplicate):  # the attack: ITK reads them, evenly spaced at a wrong step
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), ""))
        assert abs(reader.Execute().GetSpacing()[2] - 2.0) > 0.1
    message = _rejected(gap, "is not evenly spaced (missing slices?): the median step is 2.000 mm but 4.000 mm")
    assert source[9].name in message and source[11].name in message
    message = _rejected(duplicate, "1 duplicated slice position(s)")
    assert source[10].name in message and "copy_of_slice_10" in message


def test_good_dicom_series_keeps_itk_geometry(shared_data):
    folder = shared_data / "ct_dicom_20sl" / "dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), ""))
    expected = reader.Execute()
    array, geometry = read_image(folder)
    assert geometry.spacing == expected.GetSpacing()[::-1] == (2.0, 0.9765625, 0.9765625)
    assert geometry.origin == expected.GetOrigin() and geometry.direction == expected.GetDirection()
    assert np.array_equal(array, sitk.GetArrayFromImage(expected))


def test_several_dicom_series_say_which_is_read(tmp_path, caplog):
    _write_series(tmp_path / "study", "scout", "1.2.3.1", slices=2)
    _write_series(tmp_path / "study", "abdomen", "1.2.3.2", slices=5)
    _write_series(tmp_path / "study", "bones", "1.2.3.3", slices=3)
    with caplog.at_level(logging.WARNING, logger="flareseg.io.dicom"):
        array, geometry = read_image(tmp_path / "study")
    assert array.shape == (5, 6, 7) and geometry.spacing[0] == pytest.approx(2.5)
    assert [int(v) for v in array[:, 0, 0]] == [0, 100, 200, 300, 400]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "holds 3 DICOM series; reading series 1.2.3.2 'abdomen' (5 files), the series with the most files" in (
        warning
    )
    assert "series 1.2.3.1 'scout' (2 files)" in warning and "series 1.2.3.3 'bones' (3 files)" in warning


def test_synthetic_dicom_faults_are_rejected(tmp_path):
    good = _write_series(tmp_path / "good", "good", "1.2.3.9")
    assert read_image(good[0].parent)[1].spacing[0] == pytest.approx(2.5)
    tilted = (0.0, 0.96, 0.28)  # the slice plane turned by 16 degrees about x
    _write_series(tmp_path / "mixed", "s", "1.2.3.10", slice2=((10.0, 20.0, 10.0), (1, 0, 0, *tilted)))
    _rejected(tmp_path / "mixed", "mixes slice orientations: s_02.dcm has ImageOrientationPatient 1\\0\\0\\0\\0.96")
    _write_series(tmp_path / "tilt", "t", "1.2.3.11", slice3=((10.0, 21.0, 12.5), (1, 0, 0, 0, 1, 0)))
    _rejected(tmp_path / "tilt", "shift sideways along the series (gantry tilt?): t_03.dcm lies 1.000 mm off")
    _write_series(tmp_path / "uneven", "u", "1.2.3.12", slice3=((10.0, 20.0, 12.6), (1, 0, 0, 0, 1, 0)))
    _rejected(tmp_path / "uneven", "median step is 2.500 mm but 2.600 mm between u_02.dcm (10.000 mm)")


def test_slice_order_and_orientation_values_are_checked():
    orientations = np.tile([1.0, 0, 0, 0, 1, 0], (4, 1))
    descending = np.array([[0, 0, z] for z in (6.0, 4.0, 2.0, 0.0)])
    check_slice_positions(Path("series"), list("abcd"), descending, orientations)  # either direction is fine
    with pytest.raises(ImageReadError, match=r"d has an invalid ImageOrientationPatient 1\\0\\0\\1\\0\\0"):
        check_slice_positions(Path("series"), list("dcba"), descending, np.tile([1.0, 0, 0, 1, 0, 0], (4, 1)))
    with pytest.raises(ImageReadError, match=r"not in slice order: c \(6.000 mm\) comes after b \(2.000 mm\)"):
        check_slice_positions(Path("series"), list("abcd"), descending[[3, 2, 0, 1]], orientations)

"""Image I/O: round trips in every format with exact geometry, DICOM series, and clear errors for bad files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from flareseg.io import Geometry, ImageReadError, read_image, strip_image_suffix, write_image

FORMATS = [".nii.gz", ".nii", ".nrrd", ".mha"]


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_round_trip_keeps_voxels_and_geometry(tmp_path, small_volume, suffix, dtype):
    array, geometry = small_volume
    array = array.astype(dtype)
    path = write_image(tmp_path / f"case{suffix}", array, geometry)
    back, back_geometry = read_image(path)
    assert back.dtype == dtype
    assert np.array_equal(back, array)
    assert back_geometry.shape == geometry.shape
    # NIfTI stores its header in float32; the others in full precision.
    tolerance = 1e-5 if suffix.startswith(".nii") else 1e-12
    assert np.allclose(back_geometry.spacing, geometry.spacing, rtol=0, atol=tolerance)
    assert np.allclose(back_geometry.origin, geometry.origin, rtol=0, atol=tolerance * 100)
    assert np.allclose(back_geometry.direction, geometry.direction, rtol=0, atol=tolerance)
    # Writing what was read gives back the same header: bit for bit in MHA; in NRRD (which stores
    # spacing x direction) to the last bit; in NIfTI, whose reader re-orthonormalises an oblique direction
    # through a float32 quaternion, to float32 precision.
    again = read_image(write_image(tmp_path / f"again{suffix}", back, back_geometry))[1]
    if suffix.startswith(".nii"):
        assert again.spacing == back_geometry.spacing and again.origin == back_geometry.origin
        assert np.allclose(again.direction, back_geometry.direction, rtol=0, atol=1e-6)
    elif suffix == ".nrrd":
        assert np.allclose(again.spacing + again.direction, back_geometry.spacing + back_geometry.direction, atol=1e-15)
        assert again.origin == back_geometry.origin
    else:
        assert again == back_geometry


def test_array_axes_are_z_y_x(tmp_path):
    image = sitk.Image(5, 4, 3, sitk.sitkInt16)  # ITK size is (x, y, z)
    image.SetSpacing((0.5, 0.75, 3.0))
    image.SetPixel(4, 1, 2, 42)
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    array, geometry = read_image(tmp_path / "a.nii.gz")
    assert array.shape == (3, 4, 5) and geometry.shape == (3, 4, 5)
    assert geometry.spacing == (3.0, 0.75, 0.5)
    assert array[2, 1, 4] == 42


def test_index_to_physical_matches_simpleitk(small_volume):
    array, geometry = small_volume
    from flareseg.io import to_sitk

    image = to_sitk(array, geometry)
    for index in [(0, 0, 0), (3, 5, 7), (10, 13, 16)]:
        expected = image.TransformIndexToPhysicalPoint(tuple(int(i) for i in index[::-1]))
        assert np.allclose(geometry.index_to_physical(np.array(index)), expected, atol=1e-9)


def test_reads_dicom_series_with_empty_uids(shared_data):
    array, geometry = read_image(shared_data / "ct_dicom_20sl" / "dicom")
    assert array.shape == (20, 512, 512)
    assert np.allclose(geometry.spacing, (2.0, 0.9765625, 0.9765625))
    label, label_geometry = read_image(shared_data / "ct_dicom_20sl" / "label.nii.gz")
    assert label_geometry.same_grid(geometry)
    # Slices are ordered along z: the liver label and the image agree on which slices hold tissue.
    assert array.dtype == np.int16 and array.min() < -900 and array.max() > 500


def test_reads_real_nifti(shared_data):
    array, geometry = read_image(shared_data / "ct_abdomen_30sl" / "case_0000.nii.gz")
    assert array.shape == (30, 101, 122)
    assert geometry.spacing == (3.0, 3.0, 3.0)
    assert geometry.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def test_write_is_atomic_when_the_writer_fails(tmp_path, small_volume, monkeypatch):
    array, geometry = small_volume
    target = tmp_path / "out.nii.gz"

    def crash(*args, **kwargs):
        with open(args[1], "wb") as handle:  # a partial file appears, then the writer dies
            handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_image(target, array, geometry)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_shape_mismatch_and_unknown_format(tmp_path, small_volume):
    array, geometry = small_volume
    with pytest.raises(ValueError, match="does not match"):
        write_image(tmp_path / "a.nii.gz", array[:-1], geometry)
    with pytest.raises(ValueError, match="unsupported output format"):
        write_image(tmp_path / "a.png", array, geometry)


def _nifti(tmp_path, array, name="bad.nii.gz", spacing=None):
    image = sitk.GetImageFromArray(array)
    if spacing is not None:
        image.SetSpacing(spacing)
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def test_bad_inputs_name_the_file_and_the_reason(tmp_path, small_volume):
    array, geometry = small_volume
    good = write_image(tmp_path / "good.nii.gz", array, geometry)

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.nii"
    text.write_text("this is a text file, not an image\n" * 20)
    flat = _nifti(tmp_path, np.zeros((16, 16), np.int16), "flat.nii.gz")
    four_d = tmp_path / "four_d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))] * 3), str(four_d))
    nan = _nifti(tmp_path, np.where(np.arange(60).reshape(3, 4, 5) == 7, np.nan, 0).astype(np.float32), "nan.mha")
    expectations = {
        corrupt: "cannot be read",
        truncated: "is truncated",
        text: "cannot be read",
        flat: "expected a 3D volume",
        four_d: "expected a 3D volume",
        nan: "1 NaN or infinite voxels",
        tmp_path / "missing.nii.gz": "no such file",
        tmp_path: "without a readable DICOM series",
    }
    for path, reason in expectations.items():
        with pytest.raises(ImageReadError) as caught:
            read_image(path)
            pytest.fail(f"{path.name} was read without an error")
        assert str(caught.value).startswith(str(path)), caught.value
        assert reason in str(caught.value), caught.value


def test_zero_spacing_is_rejected(tmp_path):
    path = _nifti(tmp_path, np.zeros((4, 5, 6), np.int16), "zero.nii.gz")
    raw = bytearray(gzip.decompress(path.read_bytes()))
    # NIfTI-1 pixdim[1..3] are float32 at byte offsets 80, 84, 88: set the x spacing to 0.
    raw[80:84] = np.float32(0.0).tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert str(caught.value).startswith(str(path)) and "zero or non-finite voxel spacing" in str(caught.value)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_detected(tmp_path, small_volume, suffix):
    array, geometry = small_volume
    good = write_image(tmp_path / f"good{suffix}", array, geometry)
    truncated = tmp_path / f"cut{suffix}"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size - 200])
    with pytest.raises(ImageReadError, match="truncated|cannot be read"):
        read_image(truncated)
    assert np.array_equal(read_image(good)[0], array)


def test_geometry_validates_and_round_trips_through_dict():
    geometry = Geometry((1.0, 2.0, 3.0), (0.1, 0.2, 0.3), np.eye(3), (4, 5, 6))
    assert Geometry.from_dict(geometry.to_dict()) == geometry
    with pytest.raises(ValueError, match="spacing must be positive"):
        Geometry((0.0, 1.0, 1.0), (0, 0, 0), np.eye(3), (2, 2, 2))
    with pytest.raises(ValueError, match="3D geometry"):
        Geometry((1.0, 1.0), (0, 0, 0), np.eye(3), (2, 2, 2))


def test_strip_image_suffix():
    assert strip_image_suffix("case_0000.nii.gz") == "case_0000"
    assert strip_image_suffix("a.b.mha") == "a.b"
    assert strip_image_suffix("x.nrrd") == "x"

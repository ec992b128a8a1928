"""The preprocessing functions shared by training and inference: resampling, intensity, crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flareseg.data.crop import Box, bounding_box, crop, expand_box_mm
from flareseg.data.intensity import intensity_statistics, window_and_zscore
from flareseg.data.resample import resampled_geometry, resize_image, resize_label, size_for_spacing
from flareseg.io import Geometry, to_sitk


def _blobs(shape=(23, 31, 29), seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    for value in range(1, 6):
        centre = rng.uniform(3, np.array(shape) - 3)
        radius = rng.uniform(2, 6, size=3)
        inside = (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1
        label[inside] = value
    return torch.from_numpy(label)


def _per_label_reference(label: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    """The FLARE21 reference: each label's full mask interpolated linearly, > 0.5, later labels overwrite.

    Also returns where some mask value was a tie (0.5 to within float rounding), where any answer is right.
    """
    out = torch.zeros(size, dtype=label.dtype)
    tie = torch.zeros(size, dtype=torch.bool)
    for value in range(1, int(label.max()) + 1):
        mask = F.interpolate((label == value).float()[None, None], size=size, mode="trilinear", align_corners=True)[
            0, 0
        ]
        out[mask > 0.5] = value
        tie |= (mask - 0.5).abs() < 1e-5
    return out, tie


@pytest.mark.parametrize("size", [(11, 13, 17), (40, 57, 33), (23, 31, 29), (5, 90, 7)])
def test_per_label_resize_equals_full_volume_reference(size):
    label = _blobs()
    fast = resize_label(label, size, "per_label")
    assert fast.dtype == torch.uint8 and tuple(fast.shape) == size
    reference, tie = _per_label_reference(label, size)
    assert torch.equal(fast[~tie], reference[~tie])
    assert (fast != reference).sum() <= tie.sum() and tie.float().mean() < 0.01


@pytest.mark.parametrize("size", [(11, 13, 17), (40, 57, 33), (61, 97, 101), (5, 90, 7)])
def test_per_label_resize_of_noise_equals_full_volume_reference(size, monkeypatch):
    """Random networks label every voxel at random: every label's box is the whole volume, and resize_label then
    resamples all labels in one pass (_resize_labels_dense); the result is still the reference's."""
    import flareseg.data.resample as resample

    dense = []
    original = resample._resize_labels_dense
    monkeypatch.setattr(resample, "_resize_labels_dense", lambda *args: dense.append(1) or original(*args))
    label = torch.from_numpy(np.random.default_rng(1).integers(0, 14, (23, 31, 29), dtype=np.uint8))
    fast = resize_label(label, size, "per_label")
    assert dense == [1]  # the dense path was taken
    reference, tie = _per_label_reference(label, size)
    assert torch.equal(fast[~tie], reference[~tie])
    assert (fast != reference).sum() <= tie.sum()
    assert not dense[1:] and resize_label(_blobs(), size, "per_label").shape == size and dense == [1]  # blobs: per box


def test_labels_are_never_mixed():
    label = _blobs()
    for mode in ("per_label", "nearest"):
        out = resize_label(label, (17, 45, 20), mode)
        assert set(torch.unique(out).tolist()) <= set(torch.unique(label).tolist())


def test_nearest_is_corner_aligned():
    label = torch.arange(5, dtype=torch.uint8).reshape(5, 1, 1).expand(5, 2, 2).contiguous()
    out = resize_label(label, (9, 2, 2), "nearest")
    # Output z = 0, 0.5, 1, ..., 4 in input units: corners map onto corners.
    assert out[:, 0, 0].tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4]  # halves round up


def test_resize_image_is_linear_and_corner_aligned():
    z = torch.arange(4, dtype=torch.int16).reshape(4, 1, 1).expand(4, 3, 3).contiguous() * 10
    out = resize_image(z, (7, 3, 3))
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, 1, 1], torch.tensor([0, 5, 10, 15, 20, 25, 30], dtype=torch.float32))
    with pytest.raises(ValueError, match="volume"):
        resize_image(z[0], (2, 2, 2))
    with pytest.raises(TypeError, match="integer"):
        resize_label(z.float(), (2, 2, 2))


def test_resampled_geometry_keeps_physical_corners():
    geometry = Geometry((2.5, 0.8, 0.7), (1.0, 2.0, 3.0), np.eye(3)[[1, 0, 2]], (41, 100, 120))
    out = resampled_geometry(geometry, (17, 50, 61))
    last_in = geometry.index_to_physical(np.array([40, 99, 119]))
    last_out = out.index_to_physical(np.array([16, 49, 60]))
    assert np.allclose(last_in, last_out) and out.origin == geometry.origin and out.direction == geometry.direction


def test_size_for_spacing_hits_the_target():
    shape, spacing = (101, 512, 480), (2.0, 0.7, 0.7)
    size = size_for_spacing(shape, spacing, (3.0, 2.0, 2.0))
    geometry = resampled_geometry(Geometry(spacing, (0, 0, 0), np.eye(3), shape), size)
    assert np.allclose(geometry.spacing, (3.0, 2.0, 2.0), rtol=0.01)
    with pytest.raises(ValueError, match="positive"):
        size_for_spacing(shape, spacing, (0.0, 1.0, 1.0))


def test_resize_image_matches_simpleitk_linear_on_the_same_grid():
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    array = rng.normal(size=(9, 12, 10)).astype(np.float32)
    geometry = Geometry((3.0, 1.0, 1.5), (0, 0, 0), np.eye(3), array.shape)
    size = (5, 19, 7)
    target = resampled_geometry(geometry, size)
    reference = sitk.Resample(
        to_sitk(array, geometry),
        to_sitk(np.zeros(size, np.float32), target),
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    ours = resize_image(torch.from_numpy(array), size).numpy()
    assert np.allclose(ours, sitk.GetArrayFromImage(reference), atol=1e-4)


def test_window_and_zscore():
    volume = torch.tensor([-2000.0, -325.0, 0.0, 325.0, 3000.0]).reshape(1, 1, 5)
    out = window_and_zscore(volume, (-325.0, 325.0))
    clipped = torch.tensor([-325.0, -325.0, 0.0, 325.0, 325.0])
    expected = (clipped - clipped.mean()) / clipped.std(unbiased=False)
    assert torch.allclose(out.flatten(), expected, atol=1e-6)
    assert torch.allclose(out.mean(), torch.tensor(0.0), atol=1e-6)
    constant = window_and_zscore(torch.full((2, 2, 2), 40, dtype=torch.int16), (-325.0, 325.0))
    assert constant.dtype == torch.float32 and torch.all(constant == 0)
    with pytest.raises(ValueError, match="low < high"):
        window_and_zscore(volume, (10.0, -10.0))


def test_intensity_statistics_inside_mask():
    image = np.arange(1000, dtype=np.int16).reshape(10, 10, 10)
    mask = np.zeros_like(image, dtype=np.uint8)
    mask[5:] = 1
    stats = intensity_statistics(image, mask)
    assert stats["min"] == 500 and stats["max"] == 999 and stats["mean"] == pytest.approx(749.5)
    assert intensity_statistics(image, np.zeros_like(mask)) == {}


def test_bounding_box_and_mm_margin():
    mask = np.zeros((20, 30, 40), dtype=bool)
    mask[5:8, 10:12, 20:31] = True
    box = bounding_box(mask)
    assert box == Box((5, 10, 20), (8, 12, 31))
    grown = expand_box_mm(box, 5.0, spacing=(2.5, 1.0, 0.7), shape=mask.shape)
    assert grown == Box((3, 5, 12), (10, 17, 39))  # 2, 5 and ceil(5 / 0.7) = 8 voxels
    clipped = expand_box_mm(box, 100.0, spacing=(1.0, 1.0, 1.0), shape=mask.shape)
    assert clipped == Box.full(mask.shape)
    assert crop(mask, box).all() and crop(mask, box).shape == box.shape
    assert bounding_box(np.zeros((3, 3, 3))) is None
    with pytest.raises(ValueError, match="lo < hi"):
        Box((1, 1, 1), (1, 2, 2))
    with pytest.raises(ValueError, match="exceeds"):
        crop(mask, Box((0, 0, 0), (21, 1, 1)))

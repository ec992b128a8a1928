"""Reorientation to the canonical axis order: exact, lossless, and physically consistent."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from flareseg.io import Geometry, from_canonical, read_image, to_canonical, to_sitk, write_image


def _signed_permutations():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            matrix = np.zeros((3, 3))
            for column, row in enumerate(perm):
                matrix[row, column] = signs[column]
            yield matrix


def _physical_value_map(array: np.ndarray, geometry: Geometry) -> dict:
    """Voxel value at every voxel centre, keyed by the rounded physical position."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in array.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    points = np.round(geometry.index_to_physical(index), 6)
    return {tuple(p): v for p, v in zip(points, array.reshape(-1))}


@pytest.mark.parametrize(
    "direction", list(_signed_permutations()), ids=lambda d: "".join(map(str, d.ravel().astype(int)))
)
def test_every_axis_aligned_orientation_becomes_identity(direction):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 1000, size=(4, 5, 6)).astype(np.int16)
    geometry = Geometry((3.0, 0.8, 0.7), (10.0, -20.0, 5.0), direction, array.shape)
    canonical, canonical_geometry, plan = to_canonical(array, geometry)
    assert np.allclose(canonical_geometry.direction_matrix, np.eye(3))
    # Same voxel values at the same physical points: nothing moved in the patient.
    assert _physical_value_map(canonical, canonical_geometry) == _physical_value_map(array, geometry)
    back, back_geometry = from_canonical(canonical, plan)
    assert np.array_equal(back, array) and back_geometry == geometry


def test_oblique_keeps_residual_and_round_trips_exactly(small_volume):
    array, geometry = small_volume
    canonical, canonical_geometry, plan = to_canonical(array, geometry)
    # The closest canonical orientation: the residual rotation is what remains, no axis swapped or reversed.
    residual = canonical_geometry.direction_matrix
    assert np.all(np.diag(residual) > 0.9)
    # ...and it is the fixture's 17 degree rotation (seen in the canonical frame): same rotation angle.
    assert np.isclose(np.trace(residual), 1 + 2 * np.cos(np.deg2rad(17.0)), atol=1e-12)
    assert _physical_value_map(canonical, canonical_geometry) == _physical_value_map(array, geometry)
    back, back_geometry = from_canonical(canonical, plan)
    assert np.array_equal(back, array) and back_geometry == geometry


def test_canonical_geometry_agrees_with_simpleitk(small_volume):
    array, geometry = small_volume
    canonical, canonical_geometry, _ = to_canonical(array, geometry)
    original = to_sitk(array, geometry)
    reoriented = to_sitk(np.ascontiguousarray(canonical), canonical_geometry)
    for index in [(0, 0, 0), (2, 3, 4), (canonical.shape[0] - 1, 1, canonical.shape[2] - 1)]:
        point = reoriented.TransformIndexToPhysicalPoint(tuple(int(i) for i in index[::-1]))
        source = original.TransformPhysicalPointToIndex(point)
        assert canonical[index] == array[source[::-1]]


def test_real_ras_nifti_round_trip_through_files(tmp_path, shared_data):
    array, geometry = read_image(shared_data / "ct_abdomen_30sl" / "case_0000.nii.gz")
    canonical, canonical_geometry, plan = to_canonical(array, geometry)
    assert plan.flips == (False, True, True) and plan.axes == (0, 1, 2)
    back, back_geometry = from_canonical(canonical, plan)
    written = write_image(tmp_path / "back.nii.gz", back, back_geometry)
    again, again_geometry = read_image(written)
    assert np.array_equal(again, array) and again_geometry == geometry


def test_shape_mismatch_is_an_error(small_volume):
    array, geometry = small_volume
    with pytest.raises(ValueError, match="does not match"):
        to_canonical(array[1:], geometry)
    canonical, _, plan = to_canonical(array, geometry)
    with pytest.raises(ValueError, match="expected"):
        from_canonical(canonical[1:], plan)

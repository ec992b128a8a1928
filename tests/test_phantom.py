"""Tests of the synthetic CT phantom generator (flareseg.data.phantom)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from flareseg.data.phantom import (
    FLARE_ORGANS,
    LESION_LABEL,
    make_phantom,
    phantom_case_seed,
    phantom_geometry,
    write_phantom_dataset,
)
from flareseg.io import read_image, to_canonical
from flareseg.io.orientation import plan_reorientation

SMALL = (40, 64, 64)
MEDIUM = (48, 96, 96)
ID = {name: index + 1 for index, name in enumerate(FLARE_ORGANS)}


def volumes_ml(phantom) -> np.ndarray:
    """Volume in ml of every label id 0..14."""
    voxel_ml = float(np.prod(phantom.geometry.spacing)) / 1000
    return np.bincount(phantom.label.ravel(), minlength=LESION_LABEL + 1) * voxel_ml


def centroid_mm(phantom, label_id: int) -> np.ndarray:
    """Physical (x, y, z) LPS centroid of a label."""
    index = np.argwhere(phantom.label == label_id)
    assert len(index), f"label {label_id} is empty"
    return phantom.geometry.index_to_physical(index).mean(axis=0)


def rotation_angle_deg(matrix: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(matrix) - 1) / 2, -1, 1))))


def nearest_signed_permutation(matrix: np.ndarray) -> np.ndarray:
    out = np.zeros((3, 3))
    for column in range(3):
        row = int(np.argmax(np.abs(matrix[:, column])))
        out[row, column] = np.sign(matrix[row, column])
    return out


@pytest.fixture(scope="module")
def medium():
    return make_phantom(1, shape=MEDIUM, orientation="identity")


def test_organ_names_and_label_ids():
    assert len(FLARE_ORGANS) == 13 and len(set(FLARE_ORGANS)) == 13
    assert FLARE_ORGANS[0] == "liver" and FLARE_ORGANS[1] == "right_kidney" and FLARE_ORGANS[12] == "left_kidney"
    assert FLARE_ORGANS.index("gallbladder") + 1 == 9
    assert LESION_LABEL == 14


def test_same_seed_is_bit_identical_and_other_seeds_differ():
    a = make_phantom(5, shape=SMALL)
    b = make_phantom(5, shape=SMALL)
    c = make_phantom(6, shape=SMALL)
    assert a.image.dtype == np.int16 and a.label.dtype == np.uint8
    assert a.image.shape == a.label.shape == a.geometry.shape
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.geometry == b.geometry and a.annotated == b.annotated
    assert not np.array_equal(a.label, c.label)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_all_organs_present_with_plausible_volumes(seed):
    phantom = make_phantom(seed, shape=SMALL)
    assert set(np.unique(phantom.label)) == set(range(14))
    assert phantom.annotated == tuple(range(1, 14))
    ml = volumes_ml(phantom)
    organs = ml[1:14]
    assert int(np.argmax(organs)) + 1 == ID["liver"]
    assert 700 < ml[ID["liver"]] < 2500
    assert 60 < ml[ID["spleen"]] < 450
    for kidney in ("right_kidney", "left_kidney"):
        assert 50 < ml[ID[kidney]] < 300
        for adrenal in ("right_adrenal_gland", "left_adrenal_gland"):
            assert ml[ID[adrenal]] < 0.1 * ml[ID[kidney]]
    for adrenal in ("right_adrenal_gland", "left_adrenal_gland"):
        assert 0 < ml[ID[adrenal]] < 6
    assert ml[ID["gallbladder"]] < ml[ID["spleen"]] and ml[ID["stomach"]] > ml[ID["pancreas"]]


def test_anatomy_is_defined_in_millimetres_not_voxels():
    coarse = make_phantom(4, shape=SMALL, orientation="identity")
    fine = make_phantom(4, shape=(64, 112, 112), orientation="identity")
    assert fine.geometry.spacing[1] < 0.6 * coarse.geometry.spacing[1]
    ml_coarse, ml_fine = volumes_ml(coarse), volumes_ml(fine)
    for name in ("liver", "spleen", "right_kidney", "left_kidney", "stomach", "aorta"):
        assert ml_coarse[ID[name]] == pytest.approx(ml_fine[ID[name]], rel=0.12), name
        assert np.linalg.norm(centroid_mm(coarse, ID[name]) - centroid_mm(fine, ID[name])) < 3.0, name


def test_hounsfield_units_are_plausible(medium):
    image, label = medium.image, medium.label

    def median(name):
        return float(np.median(image[label == ID[name]]))

    assert 40 <= median("liver") <= 80
    assert 30 <= median("spleen") <= 70
    assert 115 <= median("right_kidney") <= 175 and 115 <= median("left_kidney") <= 175
    assert median("aorta") > 120 and median("aorta") > median("inferior_vena_cava") > median("liver")
    assert median("gallbladder") < 30 and median("gallbladder") < median("liver")
    for name in ("pancreas", "duodenum", "esophagus", "stomach"):
        assert 0 <= median(name) <= 70, name
    assert (image[label == ID["stomach"]] < -500).any()  # gas in the stomach
    corners = image[:, :4, :4]
    assert np.median(corners) < -950  # air around the body
    assert image.max() > 300  # bone
    background = image[label == 0]
    body = background[background > -500]  # not air, not lung
    assert len(body) > 0.2 * len(background)
    assert ((body > -200) & (body < 100)).mean() > 0.85  # mostly fat, bowel and muscle
    assert ((body > -150) & (body < -50)).mean() > 0.05  # subcutaneous fat
    assert ((body > -60) & (body < 10)).mean() > 0.3  # inner fat / bowel


def test_noise_level_and_in_plane_only_blur(medium):
    liver = ndimage.binary_erosion(medium.label == ID["liver"], iterations=2)
    assert liver.sum() > 2000
    residual = medium.image.astype(np.float64) - np.median(medium.image[liver])
    assert 7 <= residual[liver].std() <= 25

    def correlation(axis):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(0, -1), slice(1, None)
        both = liver[tuple(a)] & liver[tuple(b)]
        return float(np.corrcoef(residual[tuple(a)][both], residual[tuple(b)][both])[0, 1])

    assert correlation(2) > 0.35 and correlation(1) > 0.35  # the in-plane blur correlates neighbours
    assert abs(correlation(0)) < 0.15  # slices are independent
    # The label stays crisp: only label ids, no blur.
    assert set(np.unique(medium.label)) <= set(range(14))


@pytest.mark.parametrize(("orientation", "seed"), [("identity", 0), ("ras", 1), ("random", 2), ("oblique", 3)])
def test_anatomy_sides_in_physical_space(orientation, seed):
    phantom = make_phantom(seed, shape=SMALL, orientation=orientation)

    def c(name):
        return centroid_mm(phantom, ID[name])

    # LPS: x grows towards the patient's left, y towards posterior, z towards superior.
    assert c("liver")[0] < c("spleen")[0] - 60
    assert c("right_kidney")[0] < c("left_kidney")[0] - 60
    assert c("right_adrenal_gland")[0] < c("left_adrenal_gland")[0]
    assert c("inferior_vena_cava")[0] < c("aorta")[0]
    assert c("stomach")[1] < c("left_kidney")[1] - 20 and c("gallbladder")[1] < c("right_kidney")[1] - 20
    assert c("liver")[2] > c("right_kidney")[2] + 20
    assert c("right_adrenal_gland")[2] > c("right_kidney")[2] + 20
    assert c("esophagus")[2] > c("pancreas")[2] + 40


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_orientations_hold_the_same_patient(seed):
    reference = make_phantom(seed, shape=SMALL, orientation="identity")
    assert np.allclose(reference.geometry.direction_matrix, np.eye(3))
    for orientation in ("ras", "random"):
        other = make_phantom(seed, shape=SMALL, orientation=orientation)
        image, geometry, _ = to_canonical(other.image, other.geometry)
        label, _, _ = to_canonical(other.label, other.geometry)
        assert geometry.same_grid(reference.geometry)
        assert np.array_equal(label, reference.label) and np.array_equal(image, reference.image)
        for name in FLARE_ORGANS:
            assert np.allclose(centroid_mm(other, ID[name]), centroid_mm(reference, ID[name]), atol=1e-3), name
    # Oblique: other voxel centres, the same anatomy (organs away from the field of view's edges).
    reference = make_phantom(seed, shape=MEDIUM, orientation="identity")
    oblique = make_phantom(seed, shape=MEDIUM, orientation="oblique")
    for name in ("right_kidney", "left_kidney", "spleen", "pancreas", "gallbladder", "duodenum"):
        distance = np.linalg.norm(centroid_mm(oblique, ID[name]) - centroid_mm(reference, ID[name]))
        assert distance < 3.0, (name, distance)


def test_orientation_directions():
    identity = phantom_geometry(0, shape=SMALL, orientation="identity")
    assert np.array_equal(identity.direction_matrix, np.eye(3))
    ras = phantom_geometry(0, shape=SMALL, orientation="ras")
    assert np.array_equal(ras.direction_matrix, np.diag([-1.0, -1.0, 1.0]))
    seen = set()
    for seed in range(16):
        direction = phantom_geometry(seed, shape=SMALL, orientation="random").direction_matrix
        assert np.array_equal(np.abs(direction).sum(axis=0), np.ones(3))
        assert np.array_equal(np.abs(direction).sum(axis=1), np.ones(3))
        assert set(np.unique(direction)) <= {-1.0, 0.0, 1.0}
        seen.add(tuple(direction.ravel()))

        oblique = phantom_geometry(seed, shape=SMALL, orientation="oblique").direction_matrix
        assert np.allclose(oblique.T @ oblique, np.eye(3), atol=1e-9)
        residual = oblique @ nearest_signed_permutation(oblique).T
        assert 5 - 1e-6 <= rotation_angle_deg(residual) <= 20 + 1e-6
    assert len(seen) >= 6
    with pytest.raises(ValueError, match="orientation"):
        make_phantom(0, shape=SMALL, orientation="sideways")


def test_phantom_geometry_matches_make_phantom():
    for orientation in ("random", "oblique"):
        assert (
            phantom_geometry(8, shape=SMALL, orientation=orientation)
            == make_phantom(8, shape=SMALL, orientation=orientation).geometry
        )


def test_random_spacing_ranges_and_field_of_view():
    geometries = [phantom_geometry(seed) for seed in range(40)]
    for geometry in geometries:
        canonical = plan_reorientation(geometry).canonical_geometry()
        sz, sy, sx = canonical.spacing
        assert sy == sx and 0.6 <= sx <= 1.0
        assert 1.0 <= sz <= 5.0
        nz, ny, nx = canonical.shape
        assert ny == nx and 340 <= nx * sx <= 430
        assert 200 <= nz * sz <= 300
    in_plane = [plan_reorientation(g).canonical_geometry().spacing[2] for g in geometries]
    slices = [plan_reorientation(g).canonical_geometry().spacing[0] for g in geometries]
    assert np.ptp(in_plane) > 0.2 and np.ptp(slices) > 1.5  # really random
    # One full-size phantom with random spacing (the smallest of these, to stay quick).
    seed = int(np.argmin([np.prod(g.shape) for g in geometries]))
    phantom = make_phantom(seed)
    assert phantom.geometry == geometries[seed]
    assert phantom.annotated == tuple(range(1, 14))


def test_given_shape_keeps_the_whole_body_in_view():
    phantom = make_phantom(9, shape=SMALL, orientation="identity")
    assert phantom.geometry.shape == SMALL
    borders = [phantom.image[:, 0], phantom.image[:, -1], phantom.image[:, :, 0], phantom.image[:, :, -1]]
    for border in borders:
        assert np.median(border) < -950
    assert not phantom.label[:, [0, -1]].any() and not phantom.label[:, :, [0, -1]].any()


def test_given_shape_and_spacing_are_used_as_is():
    phantom = make_phantom(9, shape=(30, 50, 50), spacing=(4.0, 3.0, 3.0), orientation="identity")
    assert phantom.geometry.shape == (30, 50, 50) and phantom.geometry.spacing == (4.0, 3.0, 3.0)
    # A 150 mm field of view crops the 320 mm wide body: its borders are not air.
    assert (phantom.image[:, :, 0] > -500).mean() > 0.5
    spacing_only = make_phantom(9, spacing=(5.0, 4.0, 4.0), orientation="identity")
    assert spacing_only.geometry.spacing == (5.0, 4.0, 4.0)
    assert spacing_only.geometry.shape[2] * 4.0 >= 360
    with pytest.raises(ValueError):
        make_phantom(0, shape=(10, 10))
    with pytest.raises(ValueError):
        make_phantom(0, spacing=(1.0, -1.0, 1.0))


def test_partial_labels_drop_organs():
    subsets = set()
    for seed in range(6):
        full = make_phantom(seed, shape=SMALL)
        part = make_phantom(seed, shape=SMALL, partial=True)
        kept = part.annotated
        assert 1 <= len(kept) < 13 and set(kept) <= set(range(1, 14))
        assert set(np.unique(part.label)) - {0} == set(kept)
        assert np.array_equal(part.label, np.where(np.isin(full.label, kept), full.label, 0))
        assert np.array_equal(part.image, full.image)
        subsets.add(kept)
    assert len(subsets) > 1


def test_lesions_sit_inside_their_host_organs():
    hosts = {ID["liver"], ID["right_kidney"], ID["left_kidney"], ID["pancreas"]}
    contrasts = []
    for seed in range(5):
        plain = make_phantom(seed, shape=MEDIUM, orientation="identity")
        sick = make_phantom(seed, shape=MEDIUM, orientation="identity", lesions=True)
        lesion = sick.label == LESION_LABEL
        assert lesion.any() and LESION_LABEL in sick.annotated
        assert set(np.unique(plain.label[lesion])) <= hosts  # inside the liver, a kidney or the pancreas
        assert np.array_equal(sick.label[~lesion], plain.label[~lesion])
        components, count = ndimage.label(lesion)
        assert 1 <= count <= 3
        for index in range(1, count + 1):
            voxels = np.argwhere(components == index)
            extent = np.ptp(sick.geometry.index_to_physical(voxels), axis=0)
            assert extent.max() <= 30 * 1.15 + 1e-6
            if len(voxels) >= 8:  # smaller ones are mostly blurred edge
                host = int(np.bincount(plain.label[components == index]).argmax())
                contrast = np.median(sick.image[sick.label == host]) - np.median(sick.image[components == index])
                assert contrast > 0  # darker than the host organ (painted 30-60 HU lower, before noise and blur)
                contrasts.append(contrast)
    assert len(contrasts) >= 3 and np.mean(contrasts) > 15


def test_write_phantom_dataset(tmp_path):
    shape = (24, 40, 40)
    case_ids = write_phantom_dataset(tmp_path, 2, seed=5, shape=shape, partial=True, unlabeled=1)
    assert case_ids == ["phantom_000", "phantom_001"]
    annotated = json.loads((tmp_path / "labelsTr" / "annotated.json").read_text())
    assert sorted(annotated) == case_ids
    for index, case_id in enumerate(case_ids):
        expected = make_phantom(phantom_case_seed(5, index), shape=shape, partial=True)
        image, geometry = read_image(tmp_path / "imagesTr" / f"{case_id}_0000.nii.gz")
        label, label_geometry = read_image(tmp_path / "labelsTr" / f"{case_id}.nii.gz")
        assert geometry.same_grid(expected.geometry) and label_geometry.same_grid(expected.geometry)
        assert np.array_equal(image, expected.image) and np.array_equal(label, expected.label)
        assert annotated[case_id] == list(expected.annotated)
    assert phantom_case_seed(5, 0) != phantom_case_seed(5, 1) != phantom_case_seed(6, 1)
    unlabeled, _ = read_image(tmp_path / "unlabeled" / "phantom_002_0000.nii.gz")
    assert np.array_equal(unlabeled, make_phantom(phantom_case_seed(5, 2), shape=shape).image)
    assert not (tmp_path / "labelsTr" / "phantom_002.nii.gz").exists()
    images = sorted(p.name for p in (tmp_path / "imagesTr").iterdir())
    assert images == ["phantom_000_0000.nii.gz", "phantom_001_0000.nii.gz"]

    other = tmp_path / "nrrd"
    assert write_phantom_dataset(other, 1, seed=1, shape=shape, suffix=".nrrd") == ["phantom_000"]
    assert (other / "imagesTr" / "phantom_000_0000.nrrd").exists()
    assert (other / "labelsTr" / "phantom_000.nrrd").exists()
    assert not (other / "labelsTr" / "annotated.json").exists()

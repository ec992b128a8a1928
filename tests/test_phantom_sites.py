"""Tests of the phantom sites (flareseg.data.phantom.sites): each measures the generated images and labels."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

import flareseg.data.phantom as phantom_module
from flareseg.cli import main
from flareseg.cli_parser import build_parser
from flareseg.data.phantom import (
    FLARE_ORGANS,
    SITES,
    make_phantom,
    phantom_case_seed,
    phantom_geometry,
    write_phantom_dataset,
)
from flareseg.data.phantom.sites import FIELDS_OF_VIEW
from flareseg.io import read_image

SPACING = (4.0, 1.5, 1.5)  # coarse slices, fine enough in-plane for the kidney's cortex (about 3 voxels)
ID = {name: index + 1 for index, name in enumerate(FLARE_ORGANS)}
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)  # erosions within each slice: the blur is in-plane only


@pytest.fixture(scope="module")
def phantoms():
    """make_phantom(seed, site=name) at SPACING, identity orientation, each made once for the module."""
    cache = {}

    def get(name, seed=1):
        if (name, seed) not in cache:
            cache[name, seed] = make_phantom(seed, site=name, spacing=SPACING, orientation="identity")
        return cache[name, seed]

    return get


def inner(label: np.ndarray, value, erosions: int = 1) -> np.ndarray:
    """The organ's mask (or the union of several ids) eroded in-plane, away from its blurred edge."""
    return ndimage.binary_erosion(np.isin(label, value), IN_PLANE, iterations=erosions)


def mean_hu(phantom, name: str) -> float:
    return float(phantom.image[inner(phantom.label, ID[name])].mean())


def noise_and_correlation(image: np.ndarray) -> tuple[float, float]:
    """Noise std and the noise's in-plane neighbour correlation, from the difference of adjacent slices: the
    noise of two slices is independent, the anatomy nearly the same, so the robust spread of the difference over
    the body is sqrt(2) times the noise."""
    body = (image[1:] > -500) & (image[:-1] > -500)
    difference = image[1:].astype(np.float32) - image[:-1]
    values = difference[body]
    std = 1.4826 * float(np.median(np.abs(values - np.median(values)))) / np.sqrt(2)
    quiet = body & (np.abs(difference) < 3 * np.sqrt(2) * std)  # not across an edge between slices
    pairs = quiet[:, :, 1:] & quiet[:, :, :-1]
    correlation = np.corrcoef(difference[:, :, 1:][pairs], difference[:, :, :-1][pairs])[0, 1]
    return std, float(correlation)


def test_the_site_table_is_valid_and_the_command_line_names_it():
    assert len(SITES) >= 5 and all(site.name == name for name, site in SITES.items())
    assert {site.phase for site in SITES.values()} == {"non_contrast", "arterial", "portal_venous", "delayed"}
    assert {site.kernel for site in SITES.values()} == {"sharp", "standard", "soft"}
    assert set(FIELDS_OF_VIEW) == {site.fov for site in SITES.values()}
    assert any(site.metal for site in SITES.values()) and any(site.truncated for site in SITES.values())
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    site_flag = next(a for a in commands.choices["phantoms"]._actions if a.dest == "site")
    assert tuple(site_flag.choices) == tuple(SITES)


def test_a_bad_site_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="did you mean 'portal_venous'.*arterial_sharp"):
        make_phantom(0, site="portal_venus", shape=(8, 16, 16))
    with pytest.raises(ValueError, match="phase must be one of"):
        dataclasses.replace(SITES["portal_venous"], phase="venous")
    with pytest.raises(ValueError, match="truncated needs fov_xy below the narrowest body"):
        dataclasses.replace(SITES["portal_venous"], truncated=True)
    with pytest.raises(ValueError, match="noise_std must be a range"):
        dataclasses.replace(SITES["portal_venous"], noise_std=(20.0, 10.0))


@pytest.mark.parametrize("seed", [1, 2])
def test_contrast_phases_order_the_organs(phantoms, seed):
    plain = phantoms("non_contrast_lowdose", seed)
    arterial = phantoms("arterial_sharp", seed)
    venous = phantoms("portal_venous", seed)
    delayed = phantoms("delayed_large", seed)
    aorta = [mean_hu(p, "aorta") for p in (arterial, venous, delayed, plain)]
    assert aorta[0] > aorta[1] > aorta[2] > aorta[3] and aorta[0] > 200 and aorta[3] < 70
    liver = [mean_hu(p, "liver") for p in (venous, delayed, arterial, plain)]
    assert liver[0] > liver[1] > liver[3] and liver[2] < liver[0] and liver[0] - liver[3] > 30
    assert mean_hu(plain, "liver") > mean_hu(plain, "spleen")  # unenhanced, a normal liver is brighter
    assert mean_hu(plain, "right_kidney") < mean_hu(plain, "liver") < 90
    assert mean_hu(arterial, "pancreas") > mean_hu(arterial, "liver")  # the pancreatic phase
    assert mean_hu(arterial, "inferior_vena_cava") < mean_hu(venous, "inferior_vena_cava")
    for phantom in (plain, arterial, venous, delayed):
        assert mean_hu(phantom, "gallbladder") < 40


def test_kidney_cortex_medulla_and_collecting_system_by_phase(phantoms):
    """Corticomedullary (arterial): a bright rim over a darker inside; portal-venous: nearly homogeneous;
    delayed: contrast in the collecting system, far brighter than the parenchyma."""

    def rim_minus_inside(phantom) -> float:
        kidneys = np.isin(phantom.label, (ID["right_kidney"], ID["left_kidney"]))
        area = kidneys.sum(axis=(1, 2))
        middle = (area > 0.6 * area.max())[:, None, None]  # the slices through the hila: no tangential cortex
        rim = inner(phantom.label, (2, 13), 1) & ~inner(phantom.label, (2, 13), 3) & middle
        inside = inner(phantom.label, (2, 13), 6) & middle
        return float(phantom.image[rim].mean() - phantom.image[inside].mean())

    for seed in (1, 2):
        arterial, venous = phantoms("arterial_sharp", seed), phantoms("portal_venous", seed)
        assert rim_minus_inside(arterial) > 30  # measured 40 and 74 (seeds 1, 2), 39-74 over seeds 1-6
        assert rim_minus_inside(arterial) > rim_minus_inside(venous) + 15  # measured 23 and 43
        kidneys = phantoms("delayed_large", seed).image[inner(phantoms("delayed_large", seed).label, (2, 13))]
        assert np.percentile(kidneys, 99) > np.median(kidneys) + 100
        kidneys = venous.image[inner(venous.label, (2, 13))]
        assert np.percentile(kidneys, 99) < np.median(kidneys) + 100


def test_noise_level_and_kernel_follow_the_sites(phantoms):
    measured = {name: noise_and_correlation(phantoms(name).image) for name in SITES}
    for name, (std, _) in measured.items():
        low, high = SITES[name].noise_std
        assert 0.8 * low < std < 1.2 * high, name
    assert measured["non_contrast_lowdose"][0] > measured["portal_venous"][0] + 5
    assert measured["arterial_sharp"][0] > measured["portal_venous"][0] + 5
    assert measured["portal_venous_thick"][0] < measured["non_contrast_lowdose"][0]
    sharp, standard, soft = (
        [c for name, (_, c) in measured.items() if SITES[name].kernel == kernel]
        for kernel in ("sharp", "standard", "soft")
    )
    assert max(sharp) < 0.35 < min(standard) and max(standard) < 0.7 < min(soft)


@pytest.mark.parametrize("name", list(SITES))
def test_spacing_and_field_of_view_within_the_site_ranges(name):
    site = SITES[name]
    length = FIELDS_OF_VIEW[site.fov][0]
    for seed in range(8):
        geometry = phantom_geometry(seed, site=name, orientation="identity")
        (dz, dy, dx), (nz, ny, nx) = geometry.spacing, geometry.shape
        assert dy == dx and site.in_plane[0] <= dx <= site.in_plane[1]
        assert site.slice_thickness[0] <= dz <= site.slice_thickness[1]
        assert length[0] <= nz * dz < length[1] + dz
        assert site.fov_xy[0] <= nx * dx < site.fov_xy[1] + dx and ny == nx
    small = make_phantom(3, site=name, shape=(12, 40, 40), orientation="identity")
    assert small.geometry == phantom_geometry(3, site=name, shape=(12, 40, 40), orientation="identity")
    assert length[0] <= small.geometry.spacing[0] * 12 <= length[1]


def test_body_size_and_fat_follow_the_sites(phantoms):
    """The large-patient site: a wider body with thicker subcutaneous fat; its long field of view reaches up into
    the lungs and down into the pelvis (no lung there)."""

    def width_and_fat(phantom) -> tuple[float, float]:
        spacing = phantom.geometry.spacing[2]
        middle = phantom.image[:, phantom.image.shape[1] // 2, :]  # the left-right line through the body centre
        widths, fats = [], []
        for row in middle[len(middle) // 3 : 2 * len(middle) // 3]:
            body = np.flatnonzero(row > -500)
            fat = (row[body[0] : body[0] + int(80 / spacing)] < -40).sum()  # from the skin inwards
            widths.append(len(body) * spacing)
            fats.append(fat * spacing)
        return float(np.median(widths)), float(np.median(fats))

    for seed in (1, 2):
        large_width, large_fat = width_and_fat(phantoms("delayed_large", seed))
        width, fat = width_and_fat(phantoms("portal_venous", seed))
        assert large_width > 1.15 * width and large_fat > fat + 10
    image = phantoms("delayed_large").image  # identity orientation: the last slices are the most superior
    assert image.shape[0] * SPACING[0] >= 560
    inside = np.stack([ndimage.binary_fill_holes(plane > -500) for plane in image])
    air_inside = ((image < -700) & inside).sum(axis=(1, 2))
    assert air_inside[-10:].min() > 1000 and air_inside[:10].max() == 0  # lungs up to the top, none in the pelvis


def test_metal_implant_makes_streaks_across_the_body():
    """The same patient with and without its implant (the metal has its own random stream): metal above 2000 HU
    at the spine, streaks of altered HU crossing the body on the slices it spans, nothing elsewhere."""
    site = SITES["portal_venous_metal"]
    with_metal = make_phantom(4, site=site, spacing=(3.0, 1.0, 1.0), orientation="identity")
    plain = make_phantom(4, site=dataclasses.replace(site, metal=None), spacing=(3.0, 1.0, 1.0), orientation="identity")
    assert np.array_equal(with_metal.label, plain.label)
    metal = with_metal.image > 2000
    assert metal.sum() > 100 and not (plain.image > 2000).any()
    spine = (plain.image > 300).any(axis=0)  # the bone of every slice, projected
    assert spine[metal.any(axis=0)].mean() > 0.3  # the metal lies in and around the spine

    difference = with_metal.image.astype(np.float32) - plain.image
    slices = np.flatnonzero(metal.any(axis=(1, 2)))
    untouched = np.ones(len(difference), dtype=bool)
    untouched[max(slices.min() - 2, 0) : slices.max() + 3] = False
    assert not difference[untouched].any()  # slices away from the implant are the same voxels
    near_metal = ndimage.binary_dilation(metal, IN_PLANE, iterations=30)
    body = (plain.image > -500) & ~near_metal
    anterior = np.zeros_like(body)
    anterior[:, : body.shape[1] // 2] = True  # the front half of the body, far from the spine
    amount = metal.sum(axis=(1, 2))
    for index in slices:
        altered = np.abs(difference[index]) > 30
        assert altered[body[index]].mean() > 0.02  # even the rods alone: the dark band between them
        if amount[index] > 1.5 * np.median(amount[slices]):  # a slice through a pair of screws
            assert altered[body[index] & anterior[index]].mean() > 0.05  # streaks cross the body

    # The dark band along the line between the two rods (a slice through the rods alone: two blobs, no screw).
    for index in slices:
        blobs, count = ndimage.label(metal[index])
        if count == 2 and amount[index] <= np.median(amount[slices]):
            (y0, x0), (y1, x1) = ndimage.center_of_mass(metal[index], blobs, [1, 2])
            t = np.linspace(0.25, 0.75, 50)
            values = difference[index][np.rint(y0 + t * (y1 - y0)).astype(int), np.rint(x0 + t * (x1 - x0)).astype(int)]
            assert values.mean() < -50
            break
    else:
        pytest.fail("no slice with the rods alone")


def test_truncated_field_of_view_cuts_the_body_at_the_border(phantoms):
    truncated, whole = phantoms("portal_venous_metal"), phantoms("portal_venous")
    for image, cut in ((truncated.image, True), (whole.image, False)):
        middle_rows = image[:, image.shape[1] // 2 - 5 : image.shape[1] // 2 + 5, :]
        borders = np.concatenate([middle_rows[..., 0].ravel(), middle_rows[..., -1].ravel()])
        assert ((borders > -500).mean() > 0.9) == cut
    # The cut body brightens towards the border (the rim): the fat next to the border is above the fat further in.
    image = truncated.image.astype(np.float32)
    row = image[:, image.shape[1] // 2 - 20 : image.shape[1] // 2 + 20, :]
    fat = (row > -200) & (row < 0)
    edge, further = fat[..., :3], fat[..., 20:40]
    assert row[..., :3][edge].mean() > row[..., 20:40][further].mean() + 20


def test_same_seed_same_phantom_and_sites_differ():
    a = make_phantom(7, site="arterial_sharp", shape=(20, 48, 48))
    b = make_phantom(7, site=SITES["arterial_sharp"], shape=(20, 48, 48))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) and a.geometry == b.geometry
    others = [make_phantom(7, site=name, shape=(20, 48, 48)).image for name in ("portal_venous", "delayed_large")]
    reference = make_phantom(7, shape=(20, 48, 48)).image
    assert all(not np.array_equal(a.image, image) for image in [*others, reference])


def test_interior_texture_and_vessels_keep_the_labels(monkeypatch):
    """Texture and vessels change the image only: with the interior switched off the labels are identical, and
    the liver's HU spread falls back to the noise alone (the same noise realisation)."""
    shape_kw = dict(spacing=(4.0, 1.2, 1.2), orientation="identity")
    full = make_phantom(5, site="portal_venous", **shape_kw)
    monkeypatch.setattr(phantom_module, "paint_interior", lambda *args: None)
    flat = make_phantom(5, site="portal_venous", **shape_kw)
    assert np.array_equal(full.label, flat.label)
    liver = inner(full.label, ID["liver"], 2)
    assert full.image[liver].std() > flat.image[liver].std() + 1
    interior = full.image[liver].astype(np.float32) - flat.image[liver]  # texture and vessels alone
    assert interior.std() > 5
    vessels = interior > 20  # portal-venous: the portal and hepatic veins are brighter than the parenchyma
    assert 0.01 < vessels.mean() < 0.2 and (interior < -20).mean() < 0.002  # measured 0.025 and 0
    for value in range(1, 14):  # each organ still one region (but specks a later organ cut off)
        components, count = ndimage.label(full.label == value)
        sizes = np.bincount(components.ravel())[1:]
        assert count >= 1 and sizes.max() >= 0.98 * sizes.sum(), FLARE_ORGANS[value - 1]


def test_write_phantom_dataset_with_sites(tmp_path):
    shape = (16, 32, 32)
    ids = write_phantom_dataset(tmp_path, 2, seed=3, shape=shape, unlabeled=1, site="arterial_sharp", partial=True)
    assert ids == ["arterial_sharp_000", "arterial_sharp_001"]
    assert write_phantom_dataset(tmp_path, 0, seed=3, shape=shape, unlabeled=1, site="delayed_large") == []
    assert write_phantom_dataset(tmp_path, 1, seed=3, shape=shape, site="portal_venous", partial=True) == [
        "portal_venous_000"
    ]
    recorded = json.loads((tmp_path / "sites.json").read_text())
    assert recorded == {
        "arterial_sharp_000": "arterial_sharp",
        "arterial_sharp_001": "arterial_sharp",
        "arterial_sharp_002": "arterial_sharp",
        "delayed_large_000": "delayed_large",
        "portal_venous_000": "portal_venous",
    }
    annotated = json.loads((tmp_path / "labelsTr" / "annotated.json").read_text())
    assert sorted(annotated) == ["arterial_sharp_000", "arterial_sharp_001", "portal_venous_000"]
    image, geometry = read_image(tmp_path / "imagesTr" / "arterial_sharp_001_0000.nii.gz")
    label, _ = read_image(tmp_path / "labelsTr" / "arterial_sharp_001.nii.gz")
    expected = make_phantom(phantom_case_seed(3, 1, "arterial_sharp"), shape=shape, site="arterial_sharp", partial=True)
    assert np.array_equal(image, expected.image) and np.array_equal(label, expected.label)
    assert annotated["arterial_sharp_001"] == list(expected.annotated)
    assert geometry.same_grid(expected.geometry)
    assert (tmp_path / "unlabeled" / "arterial_sharp_002_0000.nii.gz").exists()
    assert (tmp_path / "unlabeled" / "delayed_large_000_0000.nii.gz").exists()
    # Each site's cases are other patients than the reference's and the other sites' with the same seed.
    assert (
        len(
            {
                phantom_case_seed(3, 0),
                phantom_case_seed(3, 0, "arterial_sharp"),
                phantom_case_seed(3, 0, "delayed_large"),
            }
        )
        == 3
    )

    plain = tmp_path / "plain"
    assert write_phantom_dataset(plain, 1, seed=3, shape=shape) == ["phantom_000"]
    assert not (plain / "sites.json").exists()


def test_command_line_site_and_listing(tmp_path, capsys):
    assert main(["phantoms", "--list-sites"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table, notes = lines[: lines.index("")], lines[lines.index("") + 1 :]
    assert "phase" in table[0] and "kernel" in table[0] and "artefacts" in table[0]
    assert [line.split("|")[1].strip() for line in table[2:]] == list(SITES)
    assert "metal (spine), truncated" in table[2 + list(SITES).index("portal_venous_metal")]
    assert [line.split(":")[0] for line in notes] == list(SITES)

    out = tmp_path / "data"
    assert (
        main(["phantoms", "-o", str(out), "-n", "1", "--site", "non_contrast_lowdose", "--shape", "12", "24", "24"])
        == 0
    )
    assert "of site non_contrast_lowdose" in capsys.readouterr().out
    assert (out / "imagesTr" / "non_contrast_lowdose_000_0000.nii.gz").exists()
    assert json.loads((out / "sites.json").read_text()) == {"non_contrast_lowdose_000": "non_contrast_lowdose"}

    with pytest.raises(SystemExit) as exit_info:
        main(["phantoms", "-o", str(out), "--site", "venous"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "invalid choice: 'venous'" in error and all(name in error for name in SITES)
    assert main(["phantoms", "-n", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "flareseg phantoms: the following arguments are required: -o/--out (or --list-sites)"
    )

"""Synthetic abdominal CT phantoms with the 13 FLARE organs (and optional lesions), deterministic by seed.

The anatomy is defined in physical millimetres relative to the body centre (x towards the patient's left,
y towards posterior, z towards superior: LPS), so it is the same patient whatever the voxel spacing or the
orientation of the voxel grid. A phantom is built in a base grid whose array axes follow (z, y, x) (an
identity direction, or a small rotation of it for "oblique"), then its axes are permuted / flipped to give the
requested storage orientation; the geometry follows, so the patient stays the same in physical space.

Speed: each organ is evaluated only inside its own bounding box, in float32; in the (non-oblique) base grid
the coordinates are separable, so most in-plane terms are 2D and only a few operations per organ touch 3D.
The background, noise and blur run in slabs of slices, in parallel threads.

The package is split by topic: `grid` (field of view, spacing, orientation plans, the voxel coordinate grid),
`shapes` (smooth random fields, ellipsoids and cone segments), `body` (body outline, wall and spine: the
background), `anatomy` (the organ tables and the sampling of one random patient), `render` (painting the
background, organs and lesions into the volumes, partial labels) and `noise` (noise and blur). Sites (several
scanners, protocols and contrast phases; `site=` below) are in `sites` (the table), `site_anatomy` (a patient at
a site), `interior` (organ texture, vessels, kidney structure) and `artefacts` (metal streaks, truncation); with
no site, none of them runs and the reference generator is unchanged. Only the names below are public.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flareseg.atomic import atomic_write_text
from flareseg.config.schema import FLARE_ORGANS
from flareseg.data.phantom.anatomy import LESION_LABEL, sample_anatomy
from flareseg.data.phantom.artefacts import add_implant, add_truncation_rim, sample_spine_implant
from flareseg.data.phantom.grid import (
    ORIENTATIONS,
    REFERENCE_ACQUISITION,
    Grid,
    apply_plan,
    permuted_geometry,
    plan_grid,
    random_streams,
)
from flareseg.data.phantom.interior import paint_interior
from flareseg.data.phantom.noise import BLUR_SIGMA, add_noise_and_blur
from flareseg.data.phantom.render import (
    Regions,
    add_lesions,
    add_stomach_air,
    drop_organs,
    fill_background,
    paint,
    restore_missing_organs,
)
from flareseg.data.phantom.site_anatomy import adapt_anatomy
from flareseg.data.phantom.sites import SITES, Site, resolve_site, sites_table
from flareseg.io.geometry import Geometry
from flareseg.io.image_io import write_image

__all__ = [
    "FLARE_ORGANS",
    "LESION_LABEL",
    "ORIENTATIONS",
    "SITES",
    "Phantom",
    "Site",
    "make_phantom",
    "phantom_case_seed",
    "phantom_geometry",
    "sites_table",
    "write_phantom_dataset",
]
SITES_FILE = "sites.json"  # out_dir/sites.json of a dataset written with a site: {case id: site name}


@dataclass
class Phantom:
    """A synthetic CT case: int16 HU image and uint8 label, both [z, y, x], on `geometry`.

    annotated: the label ids annotated in `label` (all those present, unless made with partial=True).
    """

    image: np.ndarray
    label: np.ndarray
    geometry: Geometry
    annotated: tuple[int, ...]


def make_phantom(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    lesions: bool = False,
    partial: bool = False,
    orientation: str = "random",
    site: str | Site | None = None,
) -> Phantom:
    """A synthetic abdominal CT phantom; the same seed and arguments give bit-identical output.

    shape / spacing are in array order (z, y, x). spacing=None with shape=None: random spacing (in-plane 0.6-1.0
    mm, slices 1-5 mm) and the shape that covers the random field of view; shape given alone: the spacing that
    fits the field of view into it (any size still holds the whole anatomy); spacing given alone: the shape
    covering the field of view; both given: used as they are (the anatomy may be cropped).
    lesions: 1-3 lesions (label 14) inside the liver, a kidney or the pancreas.
    partial: keep only a random proper subset of the present organs annotated (the rest set to 0).
    orientation: "identity", "ras" (direction diag(-1, -1, 1)), "random" (a random signed axis permutation) or
    "oblique" (a random signed permutation and a 5-20 degree rotation). The anatomy is the same in physical
    space whatever the orientation; with the same seed, "identity", "ras" and "random" hold the same voxels.
    site: a name of SITES (or a Site): its contrast phase, kernel, noise, spacing and field of view ranges (used
    where shape / spacing are not given), body, organ interiors and artefacts, applied to the same patient as the
    reference phantom of this seed. None: the reference generator, unchanged.
    """
    site = resolve_site(site)
    streams = random_streams(seed)
    acquisition = REFERENCE_ACQUISITION if site is None else site.acquisition
    base, plan, body_centre = plan_grid(streams, shape, spacing, orientation, acquisition)
    anatomy = sample_anatomy(np.random.default_rng(streams["anatomy"]))
    interiors, implant, metal_rng = {}, None, None
    if site is not None:
        anatomy, interiors = adapt_anatomy(anatomy, site, np.random.default_rng(streams["site"]))
        if site.metal is not None:  # its own stream: the other draws do not depend on whether a site has metal
            metal_rng = np.random.default_rng(streams["metal"])
            implant = sample_spine_implant(anatomy.body, metal_rng)
    grid = Grid.of(base, body_centre)

    image = np.empty(base.shape, dtype=np.int16)
    label = np.zeros(base.shape, dtype=np.uint8)
    fill_background(grid, image, anatomy.body)
    regions = Regions(label)  # where each label id was painted, to find and drop ids without full-volume scans
    for organ in anatomy.lungs:
        paint(grid, image, label, organ, anatomy.body)
    for organ in anatomy.organs:
        painted = paint(grid, image, label, organ, anatomy.body)
        if painted is not None:
            regions.add(organ.label, painted[0])
            if organ.name in interiors:
                paint_interior(grid, image, painted, organ, interiors[organ.name])
            if organ.name == "stomach":
                add_stomach_air(grid, image, painted, anatomy.stomach_air_y)
    restore_missing_organs(grid, image, label, anatomy.organs, regions)
    if lesions:
        add_lesions(grid, image, label, anatomy, regions, np.random.default_rng(streams["lesions"]))
    if implant is not None:
        add_implant(grid, image, implant, anatomy.body, metal_rng)
    if site is not None and site.truncated:
        add_truncation_rim(grid, image, np.random.default_rng(streams["truncation"]))
    add_noise_and_blur(image, streams["noise"], anatomy.noise_std, BLUR_SIGMA if site is None else site.blur_sigma)

    annotated = regions.present()
    if partial:
        annotated = drop_organs(regions, np.random.default_rng(streams["partial"]))
    image, label, geometry = apply_plan(image, label, base, plan)
    return Phantom(image=image, label=label, geometry=geometry, annotated=annotated)


def phantom_geometry(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    orientation: str = "random",
    site: str | Site | None = None,
) -> Geometry:
    """The geometry that make_phantom gives for these arguments, without building the volume."""
    site = resolve_site(site)
    acquisition = REFERENCE_ACQUISITION if site is None else site.acquisition
    base, plan, _ = plan_grid(random_streams(seed), shape, spacing, orientation, acquisition)
    return permuted_geometry(base, *plan)


def phantom_case_seed(seed: int, index: int, site: str | None = None) -> int:
    """The make_phantom seed of case `index` of a dataset written by write_phantom_dataset with `seed` (and
    `site`, a site name: each site's cases are other patients, so that sites written with the same seed into one
    dataset share no patient)."""
    entropy = [seed, index] if site is None else [seed, index, zlib.crc32(site.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    num_cases: int,
    seed: int = 0,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    lesions: bool = False,
    partial: bool = False,
    orientation: str = "random",
    suffix: str = ".nii.gz",
    unlabeled: int = 0,
    site: str | Site | None = None,
) -> list[str]:
    """Write phantoms in the nnU-Net / FLARE layout and return the labeled case ids.

    out_dir/imagesTr/<case>_0000<suffix> and out_dir/labelsTr/<case><suffix> for `num_cases` labeled cases
    (phantom_000, phantom_001, ...), then `unlabeled` image-only cases in out_dir/unlabeled/ with the numbering
    continued. Case i uses make_phantom(phantom_case_seed(seed, i), ...). With partial=True, also
    out_dir/labelsTr/annotated.json: {case id: [annotated label ids]}.
    With a site: cases <site>_000, <site>_001, ... made with make_phantom(phantom_case_seed(seed, i, site), ...,
    site=site), and out_dir/sites.json ({case id: site name}, labeled and unlabeled cases) updated (annotated.json
    too), so that several sites written into one folder make one dataset.
    """
    if num_cases < 0 or unlabeled < 0:
        raise ValueError(f"num_cases and unlabeled must be >= 0, got {num_cases} and {unlabeled}")
    site = resolve_site(site)
    out_dir = Path(out_dir)
    options = dict(shape=shape, spacing=spacing, lesions=lesions, partial=partial, orientation=orientation, site=site)
    prefix = "phantom" if site is None else site.name
    case_ids: list[str] = []
    annotated: dict[str, list[int]] = {}
    for index in range(num_cases + unlabeled):
        case_id = f"{prefix}_{index:03d}"
        phantom = make_phantom(phantom_case_seed(seed, index, None if site is None else site.name), **options)
        if index < num_cases:
            write_image(out_dir / "imagesTr" / f"{case_id}_0000{suffix}", phantom.image, phantom.geometry)
            write_image(out_dir / "labelsTr" / f"{case_id}{suffix}", phantom.label, phantom.geometry)
            case_ids.append(case_id)
            annotated[case_id] = list(phantom.annotated)
        else:
            write_image(out_dir / "unlabeled" / f"{case_id}_0000{suffix}", phantom.image, phantom.geometry)
    if partial and num_cases and site is not None:  # other sites' cases may be recorded there already
        _update_json(out_dir / "labelsTr" / "annotated.json", annotated)
    elif partial and num_cases:
        (out_dir / "labelsTr" / "annotated.json").write_text(json.dumps(annotated, indent=1) + "\n")
    if site is not None and num_cases + unlabeled:
        _update_json(
            out_dir / SITES_FILE, {f"{prefix}_{index:03d}": site.name for index in range(num_cases + unlabeled)}
        )
    return case_ids


def _update_json(path: Path, cases: dict) -> None:
    """Add `cases` to a {case id: value} file (the cases of other sites written there before stay)."""
    recorded = json.loads(path.read_text()) if path.exists() else {}
    recorded.update(cases)
    text = json.dumps(dict(sorted(recorded.items())), indent=1) + "\n"
    atomic_write_text(path, text)

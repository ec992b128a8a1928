"""What lies inside the organs of a site phantom: a smooth texture, vessels and the kidneys' inner structure.

Every organ gets a smooth random field of a few to about 25 HU (peak) on its HU. The liver holds portal and
hepatic vein branches, the kidneys a cortex, medullary pyramids and a collecting system, and the spleen of the
arterial phase its arciform (zebra) heterogeneity. All of it is painted inside the organ's own mask after the
organ, so it keeps the organ's label: FLARE labels include the intrahepatic vessels in the liver and the renal
sinus structures in the kidney. Later organs overwrite it where they overlap, as they overwrite the organ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from flareseg.data.phantom.anatomy import Organ
from flareseg.data.phantom.grid import Grid
from flareseg.data.phantom.shapes import Ellipsoid, Field, Segment

# Texture per organ: (peak HU, wavelength mm, terms). The pancreas is lobulated (short wavelength, more terms).
_TEXTURE = {
    "liver": (20.0, 30.0, 3),
    "spleen": (15.0, 25.0, 3),
    "stomach": (20.0, 25.0, 3),
    "right_kidney": (10.0, 20.0, 3),
    "left_kidney": (10.0, 20.0, 3),
    "pancreas": (25.0, 10.0, 4),
    "duodenum": (20.0, 20.0, 3),
    "gallbladder": (4.0, 20.0, 3),
    "inferior_vena_cava": (8.0, 30.0, 3),
    "aorta": (5.0, 40.0, 3),
    "esophagus": (8.0, 20.0, 3),
    "right_adrenal_gland": (8.0, 10.0, 3),
    "left_adrenal_gland": (8.0, 10.0, 3),
}
_IVC_MIXING = 30.0  # arterial phase: enhanced renal-vein blood meets unenhanced infrarenal blood (peak HU)
_SPLEEN_ZEBRA = (90.0, 14.0, 4)  # arterial phase: arciform enhancement (peak HU, wavelength mm, terms)
# Intrahepatic veins in liver-normalised coordinates u = (p - centre) / radii (x left, y posterior, z superior):
# each branch a polyline and its radius in mm at each vertex. The portal vein enters at the hilum and divides into
# right (anterior and posterior) and left branches; the three hepatic veins converge on the IVC under the dome.
_PORTAL = (
    (((0.2, -0.1, -0.1), (-0.1, -0.02, -0.02), (-0.4, 0.05, 0.0)), (7.0, 6.0, 5.0)),
    (((-0.4, 0.05, 0.0), (-0.65, -0.35, 0.1)), (4.0, 2.5)),
    (((-0.4, 0.05, 0.0), (-0.7, 0.35, -0.1)), (4.0, 2.5)),
    (((0.2, -0.1, -0.1), (0.45, -0.3, 0.15), (0.7, -0.45, 0.3)), (5.0, 4.0, 2.5)),
)
_HEPATIC = (
    (((0.33, 0.0, 0.75), (-0.2, 0.1, 0.55), (-0.75, 0.2, 0.3)), (6.0, 4.5, 2.5)),
    (((0.33, -0.05, 0.72), (0.0, -0.35, 0.45), (-0.2, -0.6, 0.2)), (5.0, 4.0, 2.5)),
    (((0.38, -0.05, 0.72), (0.55, -0.35, 0.5), (0.75, -0.5, 0.45)), (4.5, 3.5, 2.0)),
)
# Kidney, in its own normalised frame (u = the ellipsoid's axes over its radii; u_x about body x): a pair of
# medullary pyramids (anterior and posterior of the lateral direction, a column of cortex between them) at each
# height u_z, their centres at _PYRAMID_DEPTH of the cross-section, leaving a cortex of about a quarter of the
# radius; and the collecting system (pelvis and calyces) on the medial side, (centre, radii) in u.
_PYRAMID_HEIGHTS = (-0.7, -0.42, -0.14, 0.14, 0.42, 0.7)
_PYRAMID_ANGLE = 50.0  # degrees from the lateral direction
_PYRAMID_DEPTH = 0.45
_PYRAMID_RADII = (0.32, 0.32, 0.2)
_COLLECTING = ((0.45, -0.1, 0.0), (0.38, 0.3, 0.45))


@dataclass(frozen=True)
class Insert:
    """A structure inside an organ (vessels, medulla, collecting system), painted at `hu` over the texture."""

    parts: tuple  # Ellipsoid / Segment, body-centred mm
    hu: float


@dataclass(frozen=True)
class Interior:
    """One organ's inside: a texture (HU added to the organ's HU), then inserts painted in order."""

    texture: Field
    inserts: tuple[Insert, ...] = ()


def sample_interiors(
    organs: Sequence[Organ], hu: Callable[[str], float], phase: str, rng: np.random.Generator
) -> dict[str, Interior]:
    """The interior of every organ, by name (a fixed draw order for a given phase)."""
    out = {}
    for organ in organs:
        peak, wavelength, terms = _TEXTURE[organ.name]
        texture = Field.sample(rng, peak * rng.uniform(0.7, 1.3), (wavelength,) * 3, terms)
        if phase == "arterial" and organ.name == "inferior_vena_cava":
            texture = _sum(texture, Field.sample(rng, _IVC_MIXING * rng.uniform(0.7, 1.3), (60.0, 60.0, 40.0)))
        if phase == "arterial" and organ.name == "spleen":
            peak, wavelength, terms = _SPLEEN_ZEBRA
            texture = _sum(texture, Field.sample(rng, peak * rng.uniform(0.7, 1.3), (wavelength,) * 3, terms))
        inserts: tuple[Insert, ...] = ()
        if organ.name == "liver":
            inserts = (
                Insert(_vessel_tree(organ.parts[0], _HEPATIC, rng), hu("hepatic_vein")),
                Insert(_vessel_tree(organ.parts[0], _PORTAL, rng), hu("portal_vein")),
            )
        elif organ.name in ("right_kidney", "left_kidney"):
            medulla, collecting = _kidney_structures(organ.parts[0], rng)
            inserts = (Insert(medulla, hu("renal_medulla")), Insert(collecting, hu("collecting_system")))
        out[organ.name] = Interior(texture, inserts)
    return out


def _sum(a: Field, b: Field) -> Field:
    """The field a + b (a field is a sum of terms)."""
    return Field(
        np.concatenate([a.amplitude, b.amplitude]),
        np.concatenate([a.frequency, b.frequency]),
        np.concatenate([a.phase, b.phase]),
    )


def _vessel_tree(liver: Ellipsoid, branches, rng: np.random.Generator) -> tuple[Segment, ...]:
    """Branches of the table (jittered) and 8-15 random twigs off them, as cone segments in mm."""

    def to_mm(u: np.ndarray) -> np.ndarray:
        return liver.centre + liver.rotation @ (u * liver.radii)

    def to_u(point: np.ndarray) -> np.ndarray:
        return liver.rotation.T @ (point - liver.centre) / liver.radii

    segments = []
    for vertices, radii in branches:
        points = [to_mm(np.asarray(v) + rng.uniform(-0.05, 0.05, 3)) for v in vertices]
        radii = np.asarray(radii) * rng.uniform(0.85, 1.15)
        segments += [Segment(points[k], points[k + 1], radii[k], radii[k + 1]) for k in range(len(points) - 1)]
    for _ in range(int(rng.integers(8, 16))):
        parent = segments[int(rng.integers(len(segments)))]
        start = parent.a + rng.uniform(0.3, 1.0) * (parent.b - parent.a)
        direction = rng.normal(size=3)
        end = to_mm(to_u(start) + direction / np.linalg.norm(direction) * rng.uniform(0.15, 0.3))
        radius = min(rng.uniform(2.2, 3.8), 0.8 * max(parent.ra, parent.rb))
        segments.append(Segment(start, end, radius, 0.7 * radius))
    return tuple(segments)


def _kidney_structures(kidney: Ellipsoid, rng: np.random.Generator) -> tuple[tuple, tuple]:
    """Medullary pyramids and the collecting system of one kidney, as ellipsoids in mm (a u-space ellipsoid maps
    to the ellipsoid with the kidney's axes and radii times its u radii)."""
    medial = 1.0 if kidney.centre[0] < 0 else -1.0  # the right kidney (x < 0) faces +x

    def ellipsoid(centre_u, radii_u) -> Ellipsoid:
        centre = kidney.centre + kidney.rotation @ (np.asarray(centre_u) * kidney.radii)
        return Ellipsoid(centre, np.asarray(radii_u) * kidney.radii, kidney.rotation)

    pyramids = []
    for height in _PYRAMID_HEIGHTS:
        width = math.sqrt(1.0 - height**2)  # the kidney's cross-section at this height, in u
        for side in (-1.0, 1.0):
            angle = math.radians(side * _PYRAMID_ANGLE + rng.uniform(-10, 10))
            depth = _PYRAMID_DEPTH * width
            centre = (-medial * depth * math.cos(angle), depth * math.sin(angle), height)
            pyramids.append(ellipsoid(centre, np.asarray(_PYRAMID_RADII) * width * rng.uniform(0.85, 1.05)))
    centre, radii = _COLLECTING
    collecting = ellipsoid((medial * centre[0], centre[1], centre[2]), np.asarray(radii) * rng.uniform(0.85, 1.15))
    return tuple(pyramids), (collecting,)


def paint_interior(grid: Grid, image: np.ndarray, painted, organ: Organ, interior: Interior) -> None:
    """Repaint the organ's voxels (`painted`: its box and inside mask, from render.paint) with its HU plus the
    texture, then each insert's HU where the insert lies inside the organ."""
    box, inside = painted
    lo, hi = [s.start for s in box], [s.stop for s in box]
    hu = np.empty(inside.shape, dtype=np.float32)
    hu[...] = interior.texture(*grid.coords(lo, hi))
    hu += np.float32(organ.hu)
    for insert in interior.inserts:
        for part in insert.parts:
            block = grid.index_box_within(*part.bbox(1.0), lo, hi)
            if block is not None:
                plo, phi, sub = block
                within = (part.q2(*grid.coords(plo, phi)) < 1) & inside[sub]
                np.copyto(hu[sub], np.float32(insert.hu), where=within)
    np.rint(hu, out=hu)
    np.copyto(image[box], hu, where=inside, casting="unsafe")

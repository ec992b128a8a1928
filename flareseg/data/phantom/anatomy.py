"""The anatomy of a phantom: the organ tables and the sampling of one random patient from them.

The tables give each organ's mean position, size, tilt, HU and deformation in body-centred LPS millimetres
(ellipsoids and / or tubes made of cone segments) and the order in which organs are painted. `sample_anatomy`
draws one patient (body, lungs, organs with their deformation fields, stomach gas level, noise level) from a
random generator, in a fixed draw order so that a seed always gives the same patient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flareseg.config.schema import FLARE_ORGANS
from flareseg.data.phantom.body import Body
from flareseg.data.phantom.shapes import Ellipsoid, Field, Segment

LESION_LABEL = 14

LABEL_OF = {name: index + 1 for index, name in enumerate(FLARE_ORGANS)}

# Organ table, body-centred LPS millimetres (x: patient's left +, y: posterior +, z: superior +; z = 0 is about
# the renal hila). Ellipsoids: centre, semi-axes, tilt (degrees about x, y, z), HU, deformation amplitude.
#   organ                 centre (x, y, z)    radii (x, y, z)    tilt            HU    deform
_ELLIPSOIDS = {
    "liver": ((-55, 0, 58), (86, 78, 75), (0, 0, 0), 60, 0.12),
    "spleen": ((75, 25, 55), (24, 42, 50), (-25, 0, 0), 50, 0.12),
    "stomach": ((40, -20, 70), (40, 32, 45), (0, -20, 0), 30, 0.14),  # fundus and body; antrum is a tube
    "right_kidney": ((-55, 38, -5), (27, 20, 52), (-10, 12, 0), 150, 0.08),
    "left_kidney": ((55, 38, 2), (27, 20, 52), (-10, -12, 0), 150, 0.08),
    "gallbladder": ((-50, -52, 8), (14, 14, 30), (-30, 0, 0), 10, 0.10),
    "right_adrenal_gland": ((-32, 30, 52), (4.5, 8, 13), (0, 0, 20), 30, 0.12),
    "left_adrenal_gland": ((32, 28, 45), (4.5, 8, 13), (0, 0, -20), 30, 0.12),
}
# The liver's inferior-medial surface is (softly) a plane, n . (p - centre) = fraction * radius_z, so that its
# lower edge rises towards the midline: (normal n, fraction).
_CUTS = {"liver": ((0.55, -0.2, -0.8), 0.3)}
# Tubes (chains of cone segments): centreline vertices (x, y, z) mm, radius at each vertex mm, HU, deformation.
# The stomach is the union of its ellipsoid and its tube.
#   organ       vertices                                                               radii             HU  deform
_TUBES = {
    "stomach": (((30, -35, 40), (0, -45, 15)), (17, 13), 30, 0.10),  # antrum to the pylorus
    "pancreas": (((-30, -18, -12), (0, -18, -2), (30, -8, 8), (60, 12, 18)), (17, 13, 11, 10), 40, 0.12),
    "duodenum": (
        ((0, -45, 12), (-32, -35, 8), (-50, -15, 0), (-52, -10, -35), (-25, -15, -50), (10, -12, -48), (28, -12, -28)),
        (11,) * 7,
        35,
        0.10,
    ),
    "aorta": (
        ((15, 14, 150), (14, 14, 60), (12, 13, 0), (10, 12, -60), (8, 10, -140)),
        (12, 11.5, 11, 10, 9.5),
        200,
        0.04,
    ),
    "inferior_vena_cava": (
        ((-22, 10, -140), (-22, 8, -40), (-25, 5, 40), (-22, 0, 100), (-28, -6, 120)),
        (11,) * 5,
        120,
        0.05,
    ),
    "esophagus": (((-5, 0, 150), (0, -4, 110), (22, -10, 85)), (8, 8, 8), 40, 0.08),
}
# Lung bases (label 0, HU about -850), painted first so that the liver dome and the stomach cover them.
_LUNGS = (((-80, 20, 200), (62, 70, 80)), ((80, 20, 195), (58, 70, 80)))
# Later organs overwrite earlier ones, so the small ones come last.
_PAINT_ORDER = (
    "liver",
    "spleen",
    "stomach",
    "right_kidney",
    "left_kidney",
    "pancreas",
    "duodenum",
    "gallbladder",
    "inferior_vena_cava",
    "aorta",
    "esophagus",
    "right_adrenal_gland",
    "left_adrenal_gland",
)
_VESSELS = ("aorta", "inferior_vena_cava")


def _euler(degrees: Sequence[float]) -> np.ndarray:
    """Rotation Rz @ Ry @ Rx from angles in degrees about x, y, z."""
    ax, ay, az = (math.radians(d) for d in degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Organ:
    name: str
    label: int  # 0: image only (lungs)
    hu: float
    parts: tuple
    field: Field
    anchor: np.ndarray  # a point inside the organ, for the one-voxel fallback at very coarse resolution

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        margin = 1.0 + self.field.bound
        boxes = [part.bbox(margin) for part in self.parts]
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


@dataclass(frozen=True)
class Anatomy:
    body: Body
    lungs: tuple[Organ, ...]
    organs: tuple[Organ, ...]  # in paint order
    stomach_air_y: float  # air above this y (anterior, smaller y) inside the stomach fundus
    noise_std: float


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient: body, spine, organ sizes / positions / shapes / HU, noise level (fixed draw order)."""
    body = Body(
        a=160.0 * rng.uniform(0.94, 1.06),
        b=120.0 * rng.uniform(0.94, 1.06),
        fat=rng.uniform(10.0, 25.0),
        muscle=rng.uniform(8.0, 12.0),
        hu_fat=-100.0 + rng.uniform(-10, 10),
        hu_muscle=50.0 + rng.uniform(-5, 5),
        hu_inner=-25.0 + rng.uniform(-5, 5),
        hu_cancellous=rng.uniform(400.0, 550.0),
        hu_cortex=rng.uniform(750.0, 900.0),
        hu_disc=90.0 + rng.uniform(-10, 10),
        hu_canal=20.0 + rng.uniform(-5, 5),
        disc_period=rng.uniform(28.0, 34.0),
        disc_phase=rng.uniform(0.0, 34.0),
        disc_thickness=rng.uniform(6.0, 9.0),
        texture=Field.sample(rng, 20.0, (60.0, 60.0, 80.0)),
    )
    lungs = []
    for centre, radii in _LUNGS:
        centre = np.asarray(centre, dtype=np.float64) + rng.uniform(-5, 5, 3)
        radii = np.asarray(radii, dtype=np.float64) * rng.uniform(0.9, 1.1)
        field = Field.sample(rng, 0.08, radii * 2)
        hu = -850.0 + rng.uniform(-30, 30)
        lungs.append(Organ("lung", 0, hu, (Ellipsoid(centre, radii, np.eye(3)),), field, centre))

    organs = []
    for name in _PAINT_ORDER:
        parts, hu, deform, anchor, scale_mm = [], None, 0.0, None, []
        if name in _ELLIPSOIDS:
            centre, radii, tilt, hu, deform = _ELLIPSOIDS[name]
            centre = np.asarray(centre, dtype=np.float64) + rng.uniform(-5, 5, 3)
            radii = np.asarray(radii, dtype=np.float64) * rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3)
            jitter = rng.uniform(-8, 8, 3)
            rotation = np.eye(3) if name in ("liver", "stomach") else _euler(np.asarray(tilt) + jitter)
            cut = None
            if name in _CUTS:
                normal, fraction = _CUTS[name]
                cut = (np.asarray(normal) / np.linalg.norm(normal), fraction * float(radii[2]))
            parts.append(Ellipsoid(centre, radii, rotation, cut))
            anchor, scale_mm = centre, list(radii * 2)
        if name in _TUBES:
            vertices, radii, hu, tube_deform = _TUBES[name]
            deform = max(deform, tube_deform)
            vertices = np.asarray(vertices, dtype=np.float64) + rng.uniform(-4, 4, 3)
            vertices = vertices + np.clip(rng.normal(0, 1.5, vertices.shape), -3, 3)
            radii = np.asarray(radii, dtype=np.float64) * rng.uniform(0.85, 1.15)
            for k in range(len(vertices) - 1):
                parts.append(Segment(vertices[k], vertices[k + 1], float(radii[k]), float(radii[k + 1])))
            if anchor is None:
                anchor, scale_mm = vertices[len(vertices) // 2], [4 * float(radii.mean())] * 3
        hu = float(hu) + (rng.uniform(-25, 25) if name in _VESSELS else rng.uniform(-8, 8))
        field = Field.sample(rng, deform * rng.uniform(0.8, 1.2), scale_mm)
        organs.append(Organ(name, LABEL_OF[name], hu, tuple(parts), field, anchor))
    stomach = next(o for o in organs if o.name == "stomach").parts[0]
    air_y = float(stomach.centre[1] - stomach.radii[1] * rng.uniform(0.5, 0.75))
    return Anatomy(body, tuple(lungs), tuple(organs), air_y, rng.uniform(10.0, 20.0))

"""Synthetic abdominal CT phantoms with the 13 FLARE organs (and optional lesions), deterministic by seed.

The anatomy is defined in physical millimetres relative to the body centre (x towards the patient's left,
y towards posterior, z towards superior: LPS), so it is the same patient whatever the voxel spacing or the
orientation of the voxel grid. A phantom is built in a base grid whose array axes follow (z, y, x) (an
identity direction, or a small rotation of it for "oblique"), then its axes are permuted / flipped to give the
requested storage orientation; the geometry follows, so the patient stays the same in physical space.

Speed: each organ is evaluated only inside its own bounding box, in float32; in the (non-oblique) base grid
the coordinates are separable, so most in-plane terms are 2D and only a few operations per organ touch 3D.
The background, noise and blur run in slabs of slices, in parallel threads.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flareseg.io.geometry import Geometry
from flareseg.io.image_io import write_image

FLARE_ORGANS: tuple[str, ...] = (
    "liver",
    "right_kidney",
    "spleen",
    "pancreas",
    "aorta",
    "inferior_vena_cava",
    "right_adrenal_gland",
    "left_adrenal_gland",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "left_kidney",
)
LESION_LABEL = 14
ORIENTATIONS = ("identity", "ras", "random", "oblique")

_LABEL_OF = {name: index + 1 for index, name in enumerate(FLARE_ORGANS)}

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
_CUT_SOFTNESS = 8.0  # mm
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

# Spine and back (fixed shapes, mm): vertebral body ellipse, spinal canal, neural arch, paraspinal muscles.
_VB_Y, _VB_RX, _VB_RY, _CORTEX = 45.0, 22.0, 17.0, 2.5
_CANAL_Y, _CANAL_R, _ARCH_R, _SPINOUS_HALF_WIDTH, _SPINOUS_LENGTH = 72.0, 8.0, 13.0, 4.0, 28.0
_PARASPINAL_X, _PARASPINAL_Y, _PARASPINAL_RX, _PARASPINAL_RY = 35.0, 82.0, 22.0, 15.0

_HU_MIN, _HU_MAX = -1024, 3071
_SLAB_VOXELS = 1 << 19  # voxels per slab for the background, the noise and the blur
_BLUR_SIGMA = 0.7  # voxels, in-plane


@dataclass
class Phantom:
    """A synthetic CT case: int16 HU image and uint8 label, both [z, y, x], on `geometry`.

    annotated: the label ids annotated in `label` (all those present, unless made with partial=True).
    """

    image: np.ndarray
    label: np.ndarray
    geometry: Geometry
    annotated: tuple[int, ...]


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def make_phantom(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    lesions: bool = False,
    partial: bool = False,
    orientation: str = "random",
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
    """
    streams = _streams(seed)
    base, plan, body_centre = _plan_grid(streams, shape, spacing, orientation)
    anatomy = _sample_anatomy(np.random.default_rng(streams["anatomy"]))
    grid = _Grid.of(base, body_centre)

    image = np.empty(base.shape, dtype=np.int16)
    label = np.zeros(base.shape, dtype=np.uint8)
    _fill_background(grid, image, anatomy.body)
    regions = _Regions(label)  # where each label id was painted, to find and drop ids without full-volume scans
    for organ in anatomy.lungs:
        _paint(grid, image, label, organ, anatomy.body)
    for organ in anatomy.organs:
        painted = _paint(grid, image, label, organ, anatomy.body)
        if painted is not None:
            regions.add(organ.label, painted[0])
            if organ.name == "stomach":
                _add_stomach_air(grid, image, painted, anatomy.stomach_air_y)
    _restore_missing_organs(grid, image, label, anatomy.organs, regions)
    if lesions:
        _add_lesions(grid, image, label, anatomy, regions, np.random.default_rng(streams["lesions"]))
    _add_noise_and_blur(image, streams["noise"], anatomy.noise_std)

    annotated = regions.present()
    if partial:
        annotated = _drop_organs(regions, np.random.default_rng(streams["partial"]))
    image, label, geometry = _apply_plan(image, label, base, plan)
    return Phantom(image=image, label=label, geometry=geometry, annotated=annotated)


def phantom_geometry(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    orientation: str = "random",
) -> Geometry:
    """The geometry that make_phantom gives for these arguments, without building the volume."""
    base, plan, _ = _plan_grid(_streams(seed), shape, spacing, orientation)
    return _permuted_geometry(base, *plan)


def phantom_case_seed(seed: int, index: int) -> int:
    """The make_phantom seed of case `index` of a dataset written by write_phantom_dataset with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


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
) -> list[str]:
    """Write phantoms in the nnU-Net / FLARE layout and return the labeled case ids.

    out_dir/imagesTr/<case>_0000<suffix> and out_dir/labelsTr/<case><suffix> for `num_cases` labeled cases
    (phantom_000, phantom_001, ...), then `unlabeled` image-only cases in out_dir/unlabeled/ with the numbering
    continued. Case i uses make_phantom(phantom_case_seed(seed, i), ...). With partial=True, also
    out_dir/labelsTr/annotated.json: {case id: [annotated label ids]}.
    """
    if num_cases < 0 or unlabeled < 0:
        raise ValueError(f"num_cases and unlabeled must be >= 0, got {num_cases} and {unlabeled}")
    out_dir = Path(out_dir)
    options = dict(shape=shape, spacing=spacing, lesions=lesions, partial=partial, orientation=orientation)
    case_ids: list[str] = []
    annotated: dict[str, list[int]] = {}
    for index in range(num_cases + unlabeled):
        case_id = f"phantom_{index:03d}"
        phantom = make_phantom(phantom_case_seed(seed, index), **options)
        if index < num_cases:
            write_image(out_dir / "imagesTr" / f"{case_id}_0000{suffix}", phantom.image, phantom.geometry)
            write_image(out_dir / "labelsTr" / f"{case_id}{suffix}", phantom.label, phantom.geometry)
            case_ids.append(case_id)
            annotated[case_id] = list(phantom.annotated)
        else:
            write_image(out_dir / "unlabeled" / f"{case_id}_0000{suffix}", phantom.image, phantom.geometry)
    if partial and num_cases:
        (out_dir / "labelsTr" / "annotated.json").write_text(json.dumps(annotated, indent=1) + "\n")
    return case_ids


# ----------------------------------------------------------------------------------------------------------
# Grid: field of view, spacing, orientation
# ----------------------------------------------------------------------------------------------------------


def _streams(seed: int) -> dict[str, np.random.SeedSequence]:
    """Independent random streams, so that e.g. the orientation never changes the anatomy."""
    names = ("grid", "anatomy", "orientation", "lesions", "noise", "partial")
    return dict(zip(names, np.random.SeedSequence(int(seed)).spawn(len(names)), strict=True))


def _plan_grid(streams, shape, spacing, orientation):
    """The base geometry (array axes along z, y, x, possibly rotated), the axis permutation and flips to apply to
    it, and the physical position of the body centre."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    rng = np.random.default_rng(streams["grid"])
    fov_xy, fov_z = rng.uniform(360.0, 420.0), rng.uniform(240.0, 290.0)
    in_plane, slice_spacing = rng.uniform(0.6, 1.0), rng.uniform(1.0, 5.0)
    fov_shift = np.array([rng.uniform(-5, 5), rng.uniform(-5, 5), 30.0 + rng.uniform(-8, 8)])  # x, y, z mm
    body_z = rng.uniform(-300.0, 0.0)
    fov = np.array([fov_z, fov_xy, fov_xy])
    if shape is not None:
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be 3 positive sizes (z, y, x), got {shape}")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be 3 positive sizes in mm (z, y, x), got {spacing}")
    if spacing is None and shape is None:
        spacing = (slice_spacing, in_plane, in_plane)
    if spacing is None:
        spacing = tuple(float(f / n) for f, n in zip(fov, shape, strict=True))
    if shape is None:
        shape = tuple(max(2, math.ceil(f / s - 1e-6)) for f, s in zip(fov, spacing, strict=True))

    rng = np.random.default_rng(streams["orientation"])
    rotation = np.eye(3)
    axes, flips = (0, 1, 2), (False, False, False)
    if orientation == "ras":
        flips = (False, True, True)
    elif orientation in ("random", "oblique"):
        axes = tuple(int(a) for a in rng.permutation(3))
        flips = tuple(bool(f) for f in rng.integers(0, 2, size=3))
    if orientation == "oblique":
        axis = rng.normal(size=3)
        angle = math.radians(rng.uniform(5.0, 20.0)) * rng.choice((-1.0, 1.0))
        rotation = _rotation_about(axis / np.linalg.norm(axis), angle)

    body_centre = np.array([0.0, 0.0, body_z])
    centre = body_centre + fov_shift
    spacing_xyz = np.array(spacing[::-1])
    size_xyz = np.array(shape[::-1], dtype=np.float64)
    origin = centre - rotation @ (spacing_xyz * (size_xyz - 1) / 2)
    base = Geometry(spacing, tuple(origin), tuple(rotation.ravel()), shape)
    return base, (axes, flips), body_centre


def _rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: rotation by `angle` radians about the unit vector `axis`."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _euler(degrees: Sequence[float]) -> np.ndarray:
    """Rotation Rz @ Ry @ Rx from angles in degrees about x, y, z."""
    ax, ay, az = (math.radians(d) for d in degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _permuted_geometry(geometry: Geometry, axes: Sequence[int], flips: Sequence[bool]) -> Geometry:
    """Geometry of flip(transpose(array, axes), flips): new array axis a is old axis axes[a], maybe reversed."""
    columns = geometry.direction_matrix
    new_columns = np.empty((3, 3))
    corner = np.zeros(3)
    for a in range(3):
        old = axes[a]
        new_columns[:, 2 - a] = (-1.0 if flips[a] else 1.0) * columns[:, 2 - old]
        corner[old] = geometry.shape[old] - 1 if flips[a] else 0
    origin = geometry.index_to_physical(corner)
    spacing = tuple(geometry.spacing[a] for a in axes)
    shape = tuple(geometry.shape[a] for a in axes)
    return Geometry(spacing, tuple(origin), tuple(new_columns.ravel() + 0.0), shape)


def _apply_plan(image, label, base: Geometry, plan) -> tuple[np.ndarray, np.ndarray, Geometry]:
    axes, flips = plan
    if tuple(axes) == (0, 1, 2) and not any(flips):
        return image, label, base

    return _reorder(image, axes, flips), _reorder(label, axes, flips), _permuted_geometry(base, axes, flips)


def _reorder(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool], tile: int = 16) -> np.ndarray:
    """A contiguous copy of flip(transpose(array, axes), flips), copied in tiles so that it stays in the caches."""
    view = np.transpose(array, axes)
    flip_axes = tuple(a for a in range(3) if flips[a])
    view = np.flip(view, flip_axes) if flip_axes else view
    if view.size < (1 << 20):
        return np.ascontiguousarray(view)
    out = np.empty(view.shape, dtype=array.dtype)
    for i in range(0, view.shape[0], tile):
        for k in range(0, view.shape[2], tile):
            out[i : i + tile, :, k : k + tile] = view[i : i + tile, :, k : k + tile]
    return out


@dataclass(frozen=True)
class _Grid:
    """Body-centred millimetre coordinates of the voxel centres of a geometry.

    offset: coordinates (x, y, z) of voxel [0, 0, 0]; matrix: column c = mm per step of ITK index axis c.
    """

    offset: np.ndarray
    matrix: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, geometry: Geometry, body_centre: np.ndarray) -> _Grid:
        matrix = geometry.direction_matrix * np.asarray(geometry.spacing_xyz)[None, :]
        return cls(np.asarray(geometry.origin) - body_centre, matrix, geometry.shape)

    def coords(self, lo: Sequence[int], hi: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 x, y, z of the voxel block [lo, hi) (array order), broadcastable to its shape.

        An axis-aligned grid gives 1D-like arrays ((1, 1, n), (1, n, 1), (n, 1, 1)); a rotated one gives 3D.
        """
        out = []
        for c in range(3):
            terms = []
            for a in range(3):
                step = self.matrix[c, 2 - a]
                if step != 0.0:
                    view = [1, 1, 1]
                    view[a] = hi[a] - lo[a]
                    terms.append((np.arange(lo[a], hi[a]) * step).reshape(view))
            terms[0] = (terms[0] + self.offset[c]).astype(np.float32)
            total = terms[0]
            for term in terms[1:]:
                total = total + term.astype(np.float32)
            out.append(total)
        return out[0], out[1], out[2]

    def index_box(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The array-order index block [lo, hi) holding every voxel centre inside the mm box, or None."""
        corners = np.array([[(lo_mm, hi_mm)[(k >> c) & 1][c] for c in range(3)] for k in range(8)])
        ijk = np.linalg.solve(self.matrix, (corners - self.offset).T).T  # ITK order (x, y, z)
        lo = np.ceil(ijk.min(axis=0)[::-1] - 1e-6).astype(int)
        hi = np.floor(ijk.max(axis=0)[::-1] + 1e-6).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, self.shape)
        return None if np.any(hi <= lo) else (lo, hi)

    def nearest_index(self, point: np.ndarray) -> tuple[int, int, int] | None:
        ijk = np.linalg.solve(self.matrix, np.asarray(point, dtype=np.float64) - self.offset)
        index = tuple(int(v) for v in np.rint(ijk[::-1]))
        inside = all(0 <= v < n for v, n in zip(index, self.shape, strict=True))
        return index if inside else None


# ----------------------------------------------------------------------------------------------------------
# Anatomy
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    """A smooth random field: sum of separable products of cosines of x, y and z (low frequencies)."""

    amplitude: np.ndarray  # (K,)
    frequency: np.ndarray  # (K, 3) radians per mm
    phase: np.ndarray  # (K, 3)

    @classmethod
    def sample(cls, rng: np.random.Generator, amplitude: float, wavelength: Sequence[float], terms: int = 3) -> _Field:
        weights = rng.uniform(0.5, 1.0, terms) * rng.choice((-1.0, 1.0), terms)
        amp = amplitude * weights / np.abs(weights).sum()
        freq = 2 * np.pi / (np.asarray(wavelength, dtype=np.float64) * rng.uniform(0.7, 1.5, (terms, 3)))
        return cls(amp, freq, rng.uniform(0, 2 * np.pi, (terms, 3)))

    @property
    def bound(self) -> float:
        return float(np.abs(self.amplitude).sum())

    def __call__(self, x, y, z) -> np.ndarray:
        """The field (float32) at x, y, z."""
        return self.along_z(self.in_plane(x, y), z)

    def in_plane(self, x, y, weight=None) -> list[np.ndarray]:
        """The x and y factors of each term (times `weight`), to be reused for many z."""
        terms = []
        for a, f, p in zip(self.amplitude, self.frequency, self.phase, strict=True):
            term = np.float32(a) * np.cos(x * np.float32(f[0]) + np.float32(p[0]))
            term = term * np.cos(y * np.float32(f[1]) + np.float32(p[1]))
            terms.append(term if weight is None else term * weight)
        return terms

    def along_z(self, terms: list[np.ndarray], z) -> np.ndarray:
        total = None
        for term, f, p in zip(terms, self.frequency, self.phase, strict=True):
            term = term * np.cos(z * np.float32(f[2]) + np.float32(p[2]))
            total = term if total is None else total + term
        return total


@dataclass(frozen=True)
class _Ellipsoid:
    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray  # columns: the ellipsoid's axes in (x, y, z)
    cut: tuple[np.ndarray, float] | None = None  # (unit normal n, offset mm): a soft cut beyond n . (p - c) = offset

    def bbox(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.rotation * self.radii[None, :]) ** 2).sum(axis=1)) * margin
        return self.centre - half, self.centre + half

    def q2(self, x, y, z) -> np.ndarray:
        """Squared normalised radius: < 1 inside the undeformed ellipsoid."""
        d = (x - np.float32(self.centre[0]), y - np.float32(self.centre[1]), z - np.float32(self.centre[2]))
        weights = self.rotation / self.radii[None, :]  # u_i = sum_c weights[c, i] * d_c
        total = None
        for i in range(3):
            u = None
            for c in range(3):
                if abs(weights[c, i]) > 1e-12:
                    term = d[c] * np.float32(weights[c, i])
                    u = term if u is None else u + term
            total = u * u if total is None else total + u * u
        if self.cut is not None:
            normal, offset = self.cut
            side = None
            for c in range(3):
                if normal[c] != 0.0:
                    term = d[c] * np.float32(normal[c])
                    side = term if side is None else side + term
            beyond = np.maximum(side - np.float32(offset), np.float32(0)) * np.float32(1 / _CUT_SOFTNESS)
            total = total + beyond * beyond  # q2 rises over a few mm, so the deformation field makes it wavy
        return total


@dataclass(frozen=True)
class _Segment:
    """A cone segment from a to b with radii ra, rb: one piece of a tube's centreline."""

    a: np.ndarray
    b: np.ndarray
    ra: float
    rb: float

    def bbox(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        r = max(self.ra, self.rb) * margin
        return np.minimum(self.a, self.b) - r, np.maximum(self.a, self.b) + r

    def q2(self, x, y, z) -> np.ndarray:
        axis = self.b - self.a
        inv_len2 = 1.0 / float(axis @ axis)
        d = (x - np.float32(self.a[0]), y - np.float32(self.a[1]), z - np.float32(self.a[2]))
        t = d[0] * np.float32(axis[0] * inv_len2) + d[1] * np.float32(axis[1] * inv_len2)
        t = t + d[2] * np.float32(axis[2] * inv_len2)
        np.clip(t, 0, 1, out=t)
        dist2 = None
        for c in range(3):
            e = d[c] - t * np.float32(axis[c])
            dist2 = e * e if dist2 is None else dist2 + e * e
        radius = t * np.float32(self.rb - self.ra) + np.float32(self.ra)
        return dist2 / (radius * radius)


@dataclass(frozen=True)
class _Organ:
    name: str
    label: int  # 0: image only (lungs)
    hu: float
    parts: tuple
    field: _Field
    anchor: np.ndarray  # a point inside the organ, for the one-voxel fallback at very coarse resolution

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        margin = 1.0 + self.field.bound
        boxes = [part.bbox(margin) for part in self.parts]
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


@dataclass(frozen=True)
class _Body:
    """Body outline (ellipse a x b semi-axes), wall layers, spine and background HU values."""

    a: float
    b: float
    fat: float
    muscle: float
    hu_fat: float
    hu_muscle: float
    hu_inner: float
    hu_cancellous: float
    hu_cortex: float
    hu_disc: float
    hu_canal: float
    disc_period: float
    disc_phase: float
    disc_thickness: float
    texture: _Field

    def _masks(self, x, y):
        """In-plane masks: body, muscle wall and inside, cavity, vertebral body, cortex-free core, arch, canal,
        spinous process, paraspinal muscles."""
        ex, ey = x * np.float32(1 / self.a), y * np.float32(1 / self.b)
        body = ex * ex + ey * ey < 1
        a_in, b_in = self.a - self.fat, self.b - self.fat
        mx, my = x * np.float32(1 / a_in), y * np.float32(1 / b_in)
        wall = mx * mx + my * my < 1
        a_c, b_c = a_in - self.muscle, b_in - self.muscle
        cx, cy = x * np.float32(1 / a_c), y * np.float32(1 / b_c)
        cavity = cx * cx + cy * cy < 1
        vx, vy = x * np.float32(1 / _VB_RX), (y - np.float32(_VB_Y)) * np.float32(1 / _VB_RY)
        vb = vx * vx + vy * vy < 1
        ix, iy = x * np.float32(1 / (_VB_RX - _CORTEX)), (y - np.float32(_VB_Y)) * np.float32(1 / (_VB_RY - _CORTEX))
        core = ix * ix + iy * iy < 1
        dy = y - np.float32(_CANAL_Y)
        r2 = x * x + dy * dy
        arch = r2 < _ARCH_R**2
        canal = r2 < _CANAL_R**2
        spinous = (np.abs(x) < _SPINOUS_HALF_WIDTH) & (dy > 0) & (dy < _SPINOUS_LENGTH) & body
        px = (np.abs(x) - np.float32(_PARASPINAL_X)) * np.float32(1 / _PARASPINAL_RX)
        py = (y - np.float32(_PARASPINAL_Y)) * np.float32(1 / _PARASPINAL_RY)
        para = (px * px + py * py < 1) & body
        return body, wall, cavity, vb, core, arch, canal, spinous, para

    def allowed(self, x, y) -> np.ndarray:
        """Where organs may be: the abdominal cavity minus the spine and the paraspinal muscles."""
        _, _, cavity, vb, _, arch, _, spinous, para = self._masks(x, y)
        return cavity & ~(vb | arch | spinous | para)

    def plane(self, x, y) -> tuple:
        """The parts of the background that depend on x and y only (see `hu`)."""
        body, wall, cavity, vb, core, arch, canal, spinous, para = self._masks(x, y)
        base = np.where(body, np.float32(self.hu_fat), np.float32(-1000.0))
        base = np.where(wall, np.float32(self.hu_muscle), base)
        base = np.where(cavity, np.float32(self.hu_inner), base)
        base = np.where(para, np.float32(self.hu_muscle), base)
        bone = np.float32(self.hu_cortex - 100)
        base = np.where(arch | spinous, bone, base)
        base = np.where(canal, np.float32(self.hu_canal), base)
        base = np.where(vb, np.float32(self.hu_cortex), base)
        base = np.where(core, np.float32(self.hu_cancellous), base)
        soft = (cavity & ~(vb | arch | spinous | para)).astype(np.float32)
        return base, vb, self.texture.in_plane(x, y, weight=soft)

    def hu(self, plane: tuple, z) -> np.ndarray:
        """Background HU (float32) at body-centred z, given `plane(x, y)`: air, wall, fat / bowel texture, spine."""
        base, vb, texture = plane
        out = base + self.texture.along_z(texture, z)
        disc = np.mod(z - np.float32(self.disc_phase), np.float32(self.disc_period)) < self.disc_thickness
        return np.where(vb & disc, np.float32(self.hu_disc), out)


@dataclass(frozen=True)
class _Anatomy:
    body: _Body
    lungs: tuple[_Organ, ...]
    organs: tuple[_Organ, ...]  # in paint order
    stomach_air_y: float  # air above this y (anterior, smaller y) inside the stomach fundus
    noise_std: float


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw one patient: body, spine, organ sizes / positions / shapes / HU, noise level (fixed draw order)."""
    body = _Body(
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
        texture=_Field.sample(rng, 20.0, (60.0, 60.0, 80.0)),
    )
    lungs = []
    for centre, radii in _LUNGS:
        centre = np.asarray(centre, dtype=np.float64) + rng.uniform(-5, 5, 3)
        radii = np.asarray(radii, dtype=np.float64) * rng.uniform(0.9, 1.1)
        field = _Field.sample(rng, 0.08, radii * 2)
        hu = -850.0 + rng.uniform(-30, 30)
        lungs.append(_Organ("lung", 0, hu, (_Ellipsoid(centre, radii, np.eye(3)),), field, centre))

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
            parts.append(_Ellipsoid(centre, radii, rotation, cut))
            anchor, scale_mm = centre, list(radii * 2)
        if name in _TUBES:
            vertices, radii, hu, tube_deform = _TUBES[name]
            deform = max(deform, tube_deform)
            vertices = np.asarray(vertices, dtype=np.float64) + rng.uniform(-4, 4, 3)
            vertices = vertices + np.clip(rng.normal(0, 1.5, vertices.shape), -3, 3)
            radii = np.asarray(radii, dtype=np.float64) * rng.uniform(0.85, 1.15)
            for k in range(len(vertices) - 1):
                parts.append(_Segment(vertices[k], vertices[k + 1], float(radii[k]), float(radii[k + 1])))
            if anchor is None:
                anchor, scale_mm = vertices[len(vertices) // 2], [4 * float(radii.mean())] * 3
        hu = float(hu) + (rng.uniform(-25, 25) if name in _VESSELS else rng.uniform(-8, 8))
        field = _Field.sample(rng, deform * rng.uniform(0.8, 1.2), scale_mm)
        organs.append(_Organ(name, _LABEL_OF[name], hu, tuple(parts), field, anchor))
    stomach = next(o for o in organs if o.name == "stomach").parts[0]
    air_y = float(stomach.centre[1] - stomach.radii[1] * rng.uniform(0.5, 0.75))
    return _Anatomy(body, tuple(lungs), tuple(organs), air_y, rng.uniform(10.0, 20.0))


# ----------------------------------------------------------------------------------------------------------
# Painting
# ----------------------------------------------------------------------------------------------------------


def _slab_size(shape: Sequence[int]) -> int:
    """Slices per slab: about half a million voxels, so that a slab's float32 arrays stay in the CPU caches."""
    return max(1, min(shape[0], _SLAB_VOXELS // (shape[1] * shape[2])))


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _fill_background(grid: _Grid, image: np.ndarray, body: _Body) -> None:
    """Air, body wall, inner fat / bowel texture and spine, slab by slab.

    When array axis 0 runs along z only (every grid but an oblique one), the in-plane part is computed once.
    """
    slab, (depth, height, width) = _slab_size(grid.shape), grid.shape
    axial = not np.any(grid.matrix[:2, 2]) and not np.any(grid.matrix[2, :2])
    shared = body.plane(*grid.coords((0, 0, 0), (1, height, width))[:2]) if axial else None

    def fill(z0: int) -> None:
        z1 = min(z0 + slab, depth)
        x, y, z = grid.coords((z0, 0, 0), (z1, 1, 1) if axial else (z1, height, width))
        hu = body.hu(shared if axial else body.plane(x, y), z)
        np.rint(np.broadcast_to(hu, (z1 - z0, height, width)), out=image[z0:z1], casting="unsafe")

    with ThreadPoolExecutor(_threads()) as pool:
        list(pool.map(fill, range(0, grid.shape[0], slab)))


def _paint(grid: _Grid, image: np.ndarray, label: np.ndarray, organ: _Organ, body: _Body):
    """Paint one organ inside its bounding box; returns (the box as slices, its inside mask), or None."""
    box = grid.index_box(*organ.bbox())
    if box is None:
        return None
    lo, hi = box
    margin = 1.0 + organ.field.bound
    if len(organ.parts) == 1:
        q2 = organ.parts[0].q2(*grid.coords(lo, hi))
    else:
        q2 = np.full(tuple(hi - lo), np.inf, dtype=np.float32)
        for part in organ.parts:
            part_box = grid.index_box(*part.bbox(margin))
            if part_box is None:
                continue
            plo, phi = np.maximum(part_box[0], lo), np.minimum(part_box[1], hi)
            if np.any(phi <= plo):
                continue
            sub = tuple(slice(plo[a] - lo[a], phi[a] - lo[a]) for a in range(3))
            np.minimum(q2[sub], part.q2(*grid.coords(plo, phi)), out=q2[sub])
    x, y, z = grid.coords(lo, hi)
    limit = organ.field(x, y, z) + np.float32(1.0)
    inside = q2 < limit * limit
    inside &= body.allowed(x, y)
    box_slices = tuple(slice(lo[a], hi[a]) for a in range(3))
    np.copyto(image[box_slices], np.int16(round(organ.hu)), where=inside)
    if organ.label:
        np.copyto(label[box_slices], np.uint8(organ.label), where=inside)
    return box_slices, inside


def _add_stomach_air(grid: _Grid, image: np.ndarray, painted, air_y: float) -> None:
    """Gas in the non-dependent (anterior) part of the stomach of a supine patient."""
    box, inside = painted
    lo = [s.start for s in box]
    hi = [s.stop for s in box]
    _, y, _ = grid.coords(lo, hi)
    np.copyto(image[box], np.int16(-900), where=inside & (y < np.float32(air_y)))


class _Regions:
    """The blocks of the label volume where each label id was painted (an id never lies outside its blocks)."""

    def __init__(self, label: np.ndarray):
        self.label = label
        self.blocks: dict[int, list[tuple[slice, ...]]] = {}

    def add(self, value: int, block: tuple[slice, ...]) -> None:
        self.blocks.setdefault(value, []).append(block)

    def voxels(self, value: int) -> int:
        return sum(int(np.count_nonzero(self.label[block] == value)) for block in self.blocks.get(value, ()))

    def present(self) -> tuple[int, ...]:
        return tuple(v for v in sorted(self.blocks) if v and self.voxels(v))

    def erase(self, value: int) -> None:
        for block in self.blocks.pop(value, ()):
            view = self.label[block]
            view[view == value] = 0


def _restore_missing_organs(grid: _Grid, image, label, organs: Sequence[_Organ], regions: _Regions) -> None:
    """An organ that no voxel centre hit (very coarse grid) gets the voxel nearest its anchor, if in the grid."""
    for organ in organs:
        if regions.voxels(organ.label):
            continue
        index = grid.nearest_index(organ.anchor)
        if index is not None:
            label[index] = organ.label
            image[index] = round(organ.hu)
            regions.add(organ.label, tuple(slice(i, i + 1) for i in index))


def _add_lesions(grid, image, label, anatomy: _Anatomy, regions: _Regions, rng: np.random.Generator) -> None:
    """1-3 roughly spherical lesions (label 14), 5-30 mm across, darker than their host organ, inside it."""
    hosts = (_LABEL_OF["liver"], _LABEL_OF["right_kidney"], _LABEL_OF["left_kidney"], _LABEL_OF["pancreas"])
    host_hu = {organ.label: organ.hu for organ in anatomy.organs}
    for _ in range(int(rng.integers(1, 4))):
        host = int(rng.choice(hosts, p=(0.55, 0.15, 0.15, 0.15)))
        diameter = rng.uniform(5.0, 30.0 if host == hosts[0] else 20.0)
        contrast = rng.uniform(30.0, 60.0)
        pick, field = rng.random(), _Field.sample(rng, 0.1, (diameter * 2,) * 3)
        if host not in regions.blocks:
            continue
        box = regions.blocks[host][0]
        candidates = np.flatnonzero(label[box] == host)
        if candidates.size == 0:
            continue
        local = np.unravel_index(candidates[min(int(pick * candidates.size), candidates.size - 1)], label[box].shape)
        index = [s.start + i for s, i in zip(box, local, strict=True)]
        cx, cy, cz = (float(v.ravel()[0]) for v in grid.coords(index, [i + 1 for i in index]))
        radius = diameter / 2
        reach = radius * (1 + field.bound)
        lesion_box = grid.index_box(np.array([cx, cy, cz]) - reach, np.array([cx, cy, cz]) + reach)
        lo, hi = lesion_box
        x, y, z = grid.coords(lo, hi)
        dx, dy, dz = x - np.float32(cx), y - np.float32(cy), z - np.float32(cz)
        q2 = (dx * dx + dy * dy + dz * dz) * np.float32(1 / radius**2)
        limit = field(dx, dy, dz) + np.float32(1.0)
        sub = tuple(slice(lo[a], hi[a]) for a in range(3))
        inside = (q2 < limit * limit) & (label[sub] == host)
        np.copyto(label[sub], np.uint8(LESION_LABEL), where=inside)
        regions.add(LESION_LABEL, sub)
        np.copyto(image[sub], np.int16(round(host_hu[host] - contrast)), where=inside)


def _add_noise_and_blur(image: np.ndarray, noise_seed: np.random.SeedSequence, noise_std: float) -> None:
    """Noise then an in-plane Gaussian blur (so the noise is correlated like reconstructed CT noise), by slabs.

    The noise is the difference of two uniform variables (several times faster to draw than normal ones);
    blurred over about 6 effective voxels it is Gaussian for all practical purposes. It is scaled so that its
    standard deviation after the blur is `noise_std`. Slabs are small (cache-sized) and run in threads, each
    with its own scratch buffers and its own random stream, so the result does not depend on the scheduling.
    """
    kernel = np.exp(-0.5 * (np.arange(-2, 3) / _BLUR_SIGMA) ** 2)  # the taps at +-3 would weigh 1e-4
    kernel /= kernel.sum()
    uniform_pair_std = math.sqrt(2 / 12)
    scale = np.float32(noise_std / float((kernel**2).sum()) / uniform_pair_std)  # 2D separable: gain sum(k^2)
    slab = _slab_size(image.shape)
    starts = range(0, image.shape[0], slab)
    seeds = noise_seed.spawn(len(starts))
    scratch = threading.local()

    def process(job: tuple[int, np.random.SeedSequence]) -> None:
        z0, seed = job
        z1 = min(z0 + slab, image.shape[0])
        shape = (z1 - z0, *image.shape[1:])
        if getattr(scratch, "shape", None) != shape:
            scratch.shape, scratch.buffers = shape, [np.empty(shape, dtype=np.float32) for _ in range(3)]
        block, noise, tmp = scratch.buffers
        np.copyto(block, image[z0:z1])
        rng = np.random.default_rng(seed)
        rng.random(dtype=np.float32, out=noise)
        rng.random(dtype=np.float32, out=tmp)
        noise -= tmp
        noise *= scale
        block += noise
        _blur(block, noise, tmp, axis=1, kernel=kernel)
        _blur(noise, block, tmp, axis=2, kernel=kernel)
        np.rint(block, out=block)
        np.clip(block, _HU_MIN, _HU_MAX, out=block)
        image[z0:z1] = block

    with ThreadPoolExecutor(_threads()) as pool:
        list(pool.map(process, zip(starts, seeds, strict=True)))


def _blur(src: np.ndarray, dst: np.ndarray, tmp: np.ndarray, axis: int, kernel: np.ndarray) -> None:
    """dst = src correlated with a short symmetric kernel along `axis`, edge voxels extended; tmp is scratch."""

    def part(start: int, stop: int) -> tuple[slice, ...]:
        index = [slice(None)] * src.ndim
        index[axis] = slice(start, stop)
        return tuple(index)

    n, radius = src.shape[axis], len(kernel) // 2
    np.multiply(src, np.float32(kernel[radius]), out=dst)
    for shift in range(1, radius + 1):
        weight = np.float32(kernel[radius + shift])  # symmetric: the same weight on both sides
        if n - shift > shift:  # the interior: both neighbours exist
            pair = tmp[part(shift, n - shift)]
            np.add(src[part(0, n - 2 * shift)], src[part(2 * shift, n)], out=pair)
            pair *= weight
            dst[part(shift, n - shift)] += pair
        for i in sorted(set(range(min(shift, n))) | set(range(max(n - shift, 0), n))):  # edges: clamp
            left, right = max(i - shift, 0), min(i + shift, n - 1)
            dst[part(i, i + 1)] += weight * (src[part(left, left + 1)] + src[part(right, right + 1)])


def _drop_organs(regions: _Regions, rng: np.random.Generator) -> tuple[int, ...]:
    """Keep a random non-empty proper subset of the present organs, erase the others from the label; returns the
    kept ids (the lesion label, when present, is always kept)."""
    present = regions.present()
    organs = [v for v in present if v != LESION_LABEL]
    if len(organs) < 2:
        return present
    keep = {int(v) for v in rng.choice(organs, size=int(rng.integers(1, len(organs))), replace=False)}
    for value in organs:
        if value not in keep:
            regions.erase(value)
    return tuple(v for v in present if v in keep or v == LESION_LABEL)

"""Acquisition artefacts of site phantoms: a lumbar spinal implant with its metal streaks, a truncated field of view.

Metal streaks are made as a scanner makes them, in a simplified way: the metal's projections p (path length
through metal, per angle and detector position) give a beam-hardening error proportional to p^2 and a
photon-starvation noise where p is large; filtered back-projection of that error gives the dark bands between
metal objects, the bright flanks beside them and the fine radial streaks. It runs on a coarse in-plane grid over
the body (1.5 mm) for the two cross-sections an implant has (rods only; rods and a pair of screws), then the
patterns are interpolated onto the slices the implant crosses. The metal itself is painted at the top of the HU
range; the label is unchanged (the implant lies in the spine and the back muscles, label 0).

A truncated field of view (narrower than the body) cuts the body at the image border; its reconstruction
brightens the body next to that border (a rim of tens to 150 HU fading over about a centimetre).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from flareseg.data.phantom.body import Body
from flareseg.data.phantom.grid import Grid
from flareseg.data.phantom.shapes import Segment

_METAL_HU = 3071  # titanium is beyond the int16 CT scale: saturated
_SCREW_RADIUS, _ROD_RADIUS = 3.25, 3.0  # mm: 6.5 mm pedicle screws, 6 mm rods
_ANGLES = 180  # projections over 180 degrees
_PATTERN_PIXEL = 1.5  # mm, the grid of the streak patterns
_METAL_PIXEL = 0.5  # mm, the raster of the metal cross-section for its projections
_NEAR = 6.0  # mm from the metal: left out when the streak strength is measured
_RIM_REACH = 12.0  # mm: the truncation rim fades as exp(-distance / reach)


@dataclass(frozen=True)
class Implant:
    """Pedicle screws (a pair per instrumented vertebra) and two rods joining their heads; streak strengths."""

    screws: tuple[Segment, ...]
    rods: tuple[Segment, ...]
    levels: tuple[float, ...]  # z (mm) of each pair of screws
    band_hu: float  # how dark the band between metal objects gets
    starvation_hu: float  # standard deviation of the fine radial streaks near the metal


def sample_spine_implant(body: Body, rng: np.random.Generator) -> Implant:
    """A fusion of 2-3 lumbar vertebrae (about L1-L4) between the renal hila and the iliac crests."""
    period = body.disc_period
    first_centre = body.disc_phase + body.disc_thickness + (period - body.disc_thickness) / 2  # a vertebra's middle
    lowest = rng.uniform(-90.0, -40.0)
    z0 = first_centre + math.ceil((lowest - first_centre) / period) * period
    levels = tuple(float(z0 + k * period) for k in range(int(rng.integers(2, 4))))
    screws = []
    for z in levels:
        for side in (-1.0, 1.0):  # from the entry point on the posterior elements, converging into the body
            entry = np.array([side * rng.uniform(20.0, 24.0), rng.uniform(88.0, 92.0), z])
            tip = np.array([side * rng.uniform(5.0, 9.0), rng.uniform(38.0, 44.0), z + rng.uniform(-2.0, 2.0)])
            screws.append(Segment(entry, tip, _SCREW_RADIUS, _SCREW_RADIUS * 0.85))
    rods = tuple(
        Segment(
            np.array([side * 23.0, 94.0, levels[0] - 12.0]),
            np.array([side * 23.0, 94.0, levels[-1] + 12.0]),
            _ROD_RADIUS,
            _ROD_RADIUS,
        )
        for side in (-1.0, 1.0)
    )
    return Implant(tuple(screws), rods, levels, rng.uniform(150.0, 350.0), rng.uniform(20.0, 50.0))


def add_implant(grid: Grid, image: np.ndarray, implant: Implant, body: Body, rng: np.random.Generator) -> None:
    """Streaks on every slice the implant crosses, then the metal itself (the label is left as it is)."""
    top = implant.rods[0].b[2] + _ROD_RADIUS
    bottom = implant.rods[0].a[2] - _ROD_RADIUS
    box = grid.index_box(np.array([-1e4, -1e4, bottom]), np.array([1e4, 1e4, top]))
    if box is None:
        return
    extent = (-body.a - 10.0, body.a + 10.0, -body.b - 10.0, body.b + 10.0)  # x0, x1, y0, y1 mm
    level = implant.levels[0]
    rods_only = _streak_pattern(implant.rods, (level + implant.rods[0].a[2]) / 2, extent, implant, rng)
    with_screws = _streak_pattern(implant.rods + implant.screws[:2], level, extent, implant, rng)

    lo, hi = box
    x, y, z = grid.coords(lo, hi)
    rods = _sample(rods_only, extent, x, y)
    screws = _sample(with_screws, extent, x, y)
    on_rods = ((z >= bottom) & (z <= top)).astype(np.float32)
    on_screws = np.zeros(z.shape, dtype=np.float32)
    for middle in implant.levels:
        on_screws = np.maximum(on_screws, (np.abs(z - np.float32(middle)) <= _SCREW_RADIUS).astype(np.float32))
    artefact = rods * on_rods + (screws - rods) * on_screws
    block = tuple(slice(lo[a], hi[a]) for a in range(3))
    values = image[block].astype(np.float32) + artefact
    np.clip(np.rint(values), -1024, 3071, out=values)
    image[block] = values.astype(np.int16)

    for part in implant.screws + implant.rods:
        part_box = grid.index_box(*part.bbox(1.0))
        if part_box is not None:
            plo, phi = part_box
            sub = tuple(slice(plo[a], phi[a]) for a in range(3))
            np.copyto(image[sub], np.int16(_METAL_HU), where=part.q2(*grid.coords(plo, phi)) < 1)


def _streak_pattern(metal, z: float, extent, implant: Implant, rng: np.random.Generator) -> np.ndarray:
    """The streaks (HU, float32, [y, x] on the pattern grid over `extent`) of the metal's cross-section at z."""
    # The metal's cross-section, rasterised finely around the implant.
    lo = np.min([np.minimum(s.a, s.b) for s in metal], axis=0) - 5.0
    hi = np.max([np.maximum(s.a, s.b) for s in metal], axis=0) + 5.0
    fx = np.arange(lo[0], hi[0], _METAL_PIXEL, dtype=np.float32)[None, :]
    fy = np.arange(lo[1], hi[1], _METAL_PIXEL, dtype=np.float32)[:, None]
    fz = np.full((1, 1), z, dtype=np.float32)
    inside = np.zeros((fy.size, fx.size), dtype=bool)
    for part in metal:
        inside |= part.q2(fx, fy, fz) < 1
    my, mx = np.nonzero(inside)
    px, py = fx[0, mx].astype(np.float64), fy[my, 0].astype(np.float64)

    # Projections: path length (mm) through metal per angle and detector bin (linear splatting of the raster).
    x0, x1, y0, y1 = extent
    reach = math.hypot(max(abs(x0), abs(x1)), max(abs(y0), abs(y1)))
    dt = _PATTERN_PIXEL / 2
    bins = int(math.ceil(2 * reach / dt)) + 2
    theta = np.arange(_ANGLES) * (math.pi / _ANGLES)
    position = (np.outer(np.cos(theta), px) + np.outer(np.sin(theta), py) + reach) / dt
    index = np.floor(position).astype(np.int64)
    frac = position - index
    rows = (np.arange(_ANGLES)[:, None] * bins + index).ravel()
    area = _METAL_PIXEL**2 / dt
    path = np.bincount(rows, (1 - frac).ravel() * area, _ANGLES * bins)
    path += np.bincount(rows + 1, frac.ravel() * area, _ANGLES * bins)
    path = path.reshape(_ANGLES, bins)

    hardening = -(path**2)
    starvation = rng.standard_normal(path.shape) * path**2

    nx = int(math.ceil((x1 - x0) / _PATTERN_PIXEL))
    ny = int(math.ceil((y1 - y0) / _PATTERN_PIXEL))
    gx = (x0 + _PATTERN_PIXEL * np.arange(nx))[None, :]
    gy = (y0 + _PATTERN_PIXEL * np.arange(ny))[:, None]
    near_metal = np.zeros((ny, nx), dtype=bool)
    cx = np.clip(np.rint((px - x0) / _PATTERN_PIXEL).astype(int), 0, nx - 1)
    cy = np.clip(np.rint((py - y0) / _PATTERN_PIXEL).astype(int), 0, ny - 1)
    near_metal[cy, cx] = True
    distance = ndimage.distance_transform_edt(~near_metal) * _PATTERN_PIXEL
    far, ring = distance > _NEAR, (distance > _NEAR) & (distance < 60.0)

    band = _back_project(_ramp_filter(hardening), theta, gx, gy, reach, dt)
    band *= implant.band_hu / max(-float(np.percentile(band[far], 0.2)), 1e-6)
    streaks = _back_project(_ramp_filter(starvation), theta, gx, gy, reach, dt)
    streaks *= implant.starvation_hu / max(float(streaks[ring].std()), 1e-6)
    return np.clip(band + streaks, -1000.0, 1000.0).astype(np.float32)


def _ramp_filter(sinogram: np.ndarray) -> np.ndarray:
    """Each projection filtered with a Hann-windowed ramp (zero-padded, so no wrap-around)."""
    bins = sinogram.shape[1]
    size = 1 << int(math.ceil(math.log2(2 * bins)))
    frequency = np.fft.rfftfreq(size)
    ramp = frequency * (0.5 + 0.5 * np.cos(np.pi * frequency / frequency[-1]))
    return np.fft.irfft(np.fft.rfft(sinogram, size, axis=1) * ramp, size, axis=1)[:, :bins]


def _back_project(filtered: np.ndarray, theta: np.ndarray, gx, gy, reach: float, dt: float) -> np.ndarray:
    detector = np.arange(filtered.shape[1]) * dt - reach
    out = np.zeros(np.broadcast_shapes(gx.shape, gy.shape))
    for angle, projection in zip(theta, filtered):
        out += np.interp(gx * math.cos(angle) + gy * math.sin(angle), detector, projection)
    return out * (math.pi / len(theta))


def _sample(pattern: np.ndarray, extent, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The pattern (bilinear, 0 outside its grid) at body-centred x, y (broadcastable arrays)."""
    shape = np.broadcast_shapes(x.shape, y.shape)
    columns = (np.broadcast_to(x, shape) - np.float32(extent[0])) / np.float32(_PATTERN_PIXEL)
    rows = (np.broadcast_to(y, shape) - np.float32(extent[2])) / np.float32(_PATTERN_PIXEL)
    values = ndimage.map_coordinates(pattern, [rows.ravel(), columns.ravel()], order=1, mode="constant", cval=0.0)
    return values.reshape(shape).astype(np.float32)


def add_truncation_rim(grid: Grid, image: np.ndarray, rng: np.random.Generator) -> None:
    """Brighten the body near the in-plane image border (array axes 1 and 2) by up to 60-150 HU."""
    amount = rng.uniform(60.0, 150.0)
    spacing_x, spacing_y = (float(np.linalg.norm(grid.matrix[:, c])) for c in (0, 1))
    height, width = grid.shape[1], grid.shape[2]
    rows, columns = np.arange(height), np.arange(width)
    to_edge_y = np.minimum(rows, height - 1 - rows) * spacing_y
    to_edge_x = np.minimum(columns, width - 1 - columns) * spacing_x
    rim = amount * np.exp(-np.minimum(to_edge_y[:, None], to_edge_x[None, :]) / _RIM_REACH)
    reach = _RIM_REACH * math.log(2 * amount)  # mm where the rim falls below 0.5 HU
    ky = min(height // 2, int(math.ceil(reach / spacing_y)))
    kx = min(width // 2, int(math.ceil(reach / spacing_x)))
    bands = (  # the border strips, without overlap
        (slice(None), slice(0, kx)),
        (slice(None), slice(width - kx, width)),
        (slice(0, ky), slice(kx, width - kx)),
        (slice(height - ky, height), slice(kx, width - kx)),
    )
    for rows_band, columns_band in bands:
        view = image[:, rows_band, columns_band]
        add = np.rint(rim[rows_band, columns_band]).astype(np.int16)
        np.add(view, add, out=view, where=view > -500)  # the body only, not the air beside it

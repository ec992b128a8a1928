"""The body outside the organs: outline, fat and muscle wall, abdominal cavity, spine and paraspinal muscles.

`Body` holds one patient's sizes and HU values; it computes the background HU (air, wall, fat / bowel texture,
vertebrae with their discs) and the in-plane mask of where organs may lie. The masks depend on x and y only, so
in an axial grid they are computed once per volume and reused for every slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flareseg.data.phantom.shapes import Field

# Spine and back (fixed shapes, mm): vertebral body ellipse, spinal canal, neural arch, paraspinal muscles.
_VB_Y, _VB_RX, _VB_RY, _CORTEX = 45.0, 22.0, 17.0, 2.5
_CANAL_Y, _CANAL_R, _ARCH_R, _SPINOUS_HALF_WIDTH, _SPINOUS_LENGTH = 72.0, 8.0, 13.0, 4.0, 28.0
_PARASPINAL_X, _PARASPINAL_Y, _PARASPINAL_RX, _PARASPINAL_RY = 35.0, 82.0, 22.0, 15.0


@dataclass(frozen=True)
class Body:
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
    texture: Field

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

"""Training augmentations of one sample (image and label together), in torch, inside DataLoader workers.

Inputs are a raw-HU image (float [z, y, x]) and its uint8 label map (0 = background); windowing and z-score
come after augmentation, elsewhere. `Augmenter` runs, in this order:

1. per-organ HU shift (needs raw HU and the labels);
2. flips, then rotation, zoom and elastic deformation composed into ONE sampling grid and ONE
   `grid_sample`, so that a sample is interpolated at most once however many of them are drawn;
3. additive Gaussian noise (HU).

Each transform is a small class whose `sample(generator)` draws its parameters (None or empty = not drawn)
and whose deterministic `apply(image, label, params)` uses them. Every call of the augmenter draws one seed per
transform from the caller's generator and gives each transform a generator of its own, so a transform's draws do
not depend on which other transforms are enabled; nothing touches the global torch or numpy generators.

Resampling: images are interpolated trilinearly and padded with the sample's minimum HU (air); label maps by
nearest neighbour, padded with 0, so the output holds only ids of the input (and background) and never mixes
them. Rotations turn about the volume centre in voxel-index space, or in millimetres when the sample's voxel
`spacing` is given (then a rotation of an anisotropic volume stays a rigid rotation of the anatomy).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from flareseg.config.loader import ConfigError
from flareseg.config.schema import AugmentConfig

_SEED_BOUND = 2**62


class OrganHUShift:
    """Add one uniform HU shift in [-max_shift, max_shift] to all voxels of each organ, each with probability p."""

    name = "organ_hu_shift"

    def __init__(self, p: float, max_shift: float):
        self.p = p
        self.max_shift = max_shift

    @property
    def active(self) -> bool:
        return self.p > 0

    def sample(self, generator: torch.Generator, label_ids: Sequence[int]) -> dict[int, float]:
        """Shift in HU of each label id drawn (ids not drawn are left out)."""
        draws = torch.rand(len(label_ids), 2, generator=generator, dtype=torch.float64).tolist()
        return {
            label_id: (2.0 * u_shift - 1.0) * self.max_shift
            for label_id, (u_apply, u_shift) in zip(label_ids, draws)
            if u_apply < self.p
        }

    @staticmethod
    def apply(image: torch.Tensor, label: torch.Tensor, shifts: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor]:
        if not shifts:
            return image, label
        # One lookup table over the uint8 ids: a single pass over the volume however many organs are shifted.
        table = torch.zeros(256, dtype=image.dtype, device=image.device)
        for label_id, shift in shifts.items():
            table[label_id] = shift
        shifted = table.index_select(0, label.reshape(-1).int()).view(label.shape)
        return shifted.add_(image), label


class Flip:
    """Mirror image and label along each of `axes` independently with probability p."""

    name = "flip"

    def __init__(self, p: float, axes: Sequence[int]):
        self.p = p
        self.axes = tuple(axes)

    @property
    def active(self) -> bool:
        return self.p > 0 and len(self.axes) > 0

    def sample(self, generator: torch.Generator) -> tuple[int, ...]:
        """The axes to mirror."""
        draws = torch.rand(len(self.axes), generator=generator, dtype=torch.float64).tolist()
        return tuple(axis for axis, u in zip(self.axes, draws) if u < self.p)

    @staticmethod
    def apply(image: torch.Tensor, label: torch.Tensor, axes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if not axes:
            return image, label
        return torch.flip(image, axes), torch.flip(label, axes)


class Rotate:
    """Rotate about each array axis with probability p, by an angle uniform in [-degrees, degrees]."""

    name = "rotate"

    def __init__(self, p: float, degrees: float):
        self.p = p
        self.degrees = degrees

    @property
    def active(self) -> bool:
        return self.p > 0

    def sample(self, generator: torch.Generator) -> tuple[float, float, float] | None:
        """Angles in degrees about axes (z, y, x); None when no axis is drawn."""
        draws = torch.rand(3, 2, generator=generator, dtype=torch.float64).tolist()
        if all(u_apply >= self.p for u_apply, _ in draws):
            return None
        return tuple((2.0 * u_angle - 1.0) * self.degrees if u_apply < self.p else 0.0 for u_apply, u_angle in draws)

    @staticmethod
    def matrix(angles: Sequence[float], spacing: Sequence[float] | None = None) -> torch.Tensor:
        """3x3 float64 map from output to input voxel offsets from the centre, in (z, y, x) order.

        The rotation acts in millimetres when `spacing` [z, y, x] is given, in voxel indices otherwise.
        """
        rotation = torch.eye(3, dtype=torch.float64)
        for axis, angle in enumerate(angles):
            i, j = (a for a in range(3) if a != axis)
            c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            step = torch.eye(3, dtype=torch.float64)
            step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
            rotation = rotation @ step
        if spacing is None:
            return rotation
        scale = torch.tensor([float(s) for s in spacing], dtype=torch.float64)
        return rotation * scale[None, :] / scale[:, None]  # diag(1/s) @ R @ diag(s)

    def apply(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        angles: tuple[float, float, float] | None,
        spacing: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if angles is None:
            return image, label
        return warp(image, label, matrix=self.matrix(angles, spacing))


class Zoom:
    """Isotropic zoom about the centre with probability p, by a scale uniform in `scale_range` (>1 enlarges)."""

    name = "zoom"

    def __init__(self, p: float, scale_range: tuple[float, float]):
        self.p = p
        self.scale_range = tuple(scale_range)

    @property
    def active(self) -> bool:
        return self.p > 0

    def sample(self, generator: torch.Generator) -> float | None:
        """The scale; None when not drawn."""
        u_apply, u_scale = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        if u_apply >= self.p:
            return None
        low, high = self.scale_range
        return low + (high - low) * u_scale

    @staticmethod
    def matrix(scale: float) -> torch.Tensor:
        """3x3 float64 map from output to input voxel offsets from the centre."""
        return torch.eye(3, dtype=torch.float64) / scale

    def apply(self, image: torch.Tensor, label: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        if scale is None:
            return image, label
        return warp(image, label, matrix=self.matrix(scale))


class Elastic:
    """With probability p, displace the sampling grid by a smooth random field.

    The field has `grid`^3 control points spanning the volume (corners included), each displacement component
    uniform in [-magnitude, magnitude] voxels, interpolated trilinearly to every voxel.
    """

    name = "elastic"

    def __init__(self, p: float, magnitude: float, grid: int):
        self.p = p
        self.magnitude = magnitude
        self.grid = grid

    @property
    def active(self) -> bool:
        return self.p > 0

    def sample(self, generator: torch.Generator) -> torch.Tensor | None:
        """Control-point displacements [grid, grid, grid, 3] in voxels, (z, y, x) components; None if not drawn."""
        if torch.rand(1, generator=generator, dtype=torch.float64).item() >= self.p:
            return None
        shape = (self.grid, self.grid, self.grid, 3)
        return (2.0 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1.0) * self.magnitude

    @staticmethod
    def apply(
        image: torch.Tensor, label: torch.Tensor, control: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if control is None:
            return image, label
        return warp(image, label, control=control)


class GaussianNoise:
    """With probability p, add Gaussian noise of standard deviation `std` HU to the image (never the label)."""

    name = "noise"

    def __init__(self, p: float, std: float):
        self.p = p
        self.std = std

    @property
    def active(self) -> bool:
        return self.p > 0

    def sample(self, generator: torch.Generator) -> int | None:
        """Seed of the noise field; None when not drawn."""
        u_apply = torch.rand(1, generator=generator, dtype=torch.float64).item()
        seed = int(torch.randint(_SEED_BOUND, (1,), generator=generator).item())
        return seed if u_apply < self.p else None

    def apply(self, image: torch.Tensor, label: torch.Tensor, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if seed is None:
            return image, label
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        return image + (noise * self.std).to(device=image.device, dtype=image.dtype), label


def warp(
    image: torch.Tensor,
    label: torch.Tensor,
    matrix: torch.Tensor | None = None,
    control: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample image and label once, on the grid `matrix` (and, if given, the displacement `control`) define.

    Output voxel o samples input position centre + matrix @ (o - centre) + displacement(o), all in voxel
    indices (z, y, x); `control` [gz, gy, gx, 3] holds displacements at control points spanning the volume,
    interpolated trilinearly. Image: trilinear, padded with its minimum; label: nearest neighbour, padded with 0.
    """
    grid = _sampling_grid(tuple(image.shape), matrix, control).to(image.device)
    # grid_sample pads with zeros: shift the image so that zero is its minimum, i.e. pad with the minimum HU.
    low = image.min()
    moved = F.grid_sample(
        (image - low)[None, None], grid.to(image.dtype), mode="bilinear", padding_mode="zeros", align_corners=True
    )[0, 0]
    # Label ids are small integers, exact in float32; nearest neighbour picks one of them (or the 0 padding).
    moved_label = F.grid_sample(
        label[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=True
    )[0, 0]
    return moved + low, moved_label.to(label.dtype)


def _sampling_grid(
    shape: tuple[int, int, int], matrix: torch.Tensor | None, control: torch.Tensor | None
) -> torch.Tensor:
    """The grid_sample grid [1, z, y, x, 3] (x, y, z order, corner-aligned [-1, 1]) of `warp`.

    The sampled position is affine plus trilinearly interpolated displacement, and trilinear interpolation
    reproduces an affine map exactly, so both are evaluated at the control points only (the 8 corners without
    a displacement) and interpolated together, one axis at a time: far cheaper than affine_grid plus a
    full-size interpolate of the displacement.
    """
    points_per_axis = tuple(control.shape[:3]) if control is not None else (2, 2, 2)
    centre = [(n - 1) / 2 for n in shape]
    axes = [torch.linspace(0, n - 1, k, dtype=torch.float64) - c for n, k, c in zip(shape, points_per_axis, centre)]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    points = offsets @ matrix.T if matrix is not None else offsets
    if control is not None:
        points = points + control.to(torch.float64)
    # Corner-aligned normalisation; an axis of one voxel maps every coordinate to index 0, so any scale works.
    half = torch.tensor([c if c > 0 else 1.0 for c in centre], dtype=torch.float64)
    values = (points / half).flip(-1).float()
    weights_z, weights_y, weights_x = (_linear_weights(n, k) for n, k in zip(shape, points_per_axis))
    values = torch.einsum("xk,abkc->abxc", weights_x, values)
    values = torch.einsum("yj,ajxc->ayxc", weights_y, values)
    grid = weights_z @ values.reshape(points_per_axis[0], -1)
    return grid.reshape(1, *shape, 3)


def _linear_weights(n: int, points: int) -> torch.Tensor:
    """[n, points] corner-aligned linear interpolation from `points` evenly spaced samples to n positions."""
    position = torch.arange(n, dtype=torch.float64) * ((points - 1) / (n - 1) if n > 1 else 0.0)
    below = position.floor().long().clamp(max=points - 2)
    fraction = position - below
    weights = torch.zeros(n, points, dtype=torch.float64)
    rows = torch.arange(n)
    weights[rows, below] = 1.0 - fraction
    weights[rows, below + 1] = fraction
    return weights.float()


@contextmanager
def _named(name: str) -> Iterator[None]:
    """Re-raise any failure inside as a RuntimeError naming the augmentation."""
    try:
        yield
    except Exception as error:
        raise RuntimeError(f"augmentation '{name}' failed: {error}") from error


class Augmenter:
    """All training augmentations of `AugmentConfig`, applied to one (image, label) sample.

    `augmenter(image, label, generator)` takes a float raw-HU image [z, y, x] and its uint8 label map, and
    returns new tensors of the same shapes and dtypes (the inputs are never modified; when nothing is drawn
    they are returned as they are). All randomness comes from `generator`: the same generator state gives
    bit-identical outputs. Pass the sample's voxel `spacing` [z, y, x] in mm to rotate in millimetres.
    """

    def __init__(self, config: AugmentConfig):
        config.validate()
        prefix = "train.augment."
        for key in ("organ_hu_shift", "rotate_degrees", "elastic_magnitude", "noise_std"):
            if getattr(config, key) < 0:
                raise ConfigError(f"'{prefix}{key}' must be >= 0, got {getattr(config, key)}")
        if len(set(config.flip_axes)) != len(config.flip_axes):
            raise ConfigError(f"'{prefix}flip_axes' lists an axis twice: {config.flip_axes}")
        self.config = config
        self.organ_hu_shift = OrganHUShift(config.organ_hu_shift_p, config.organ_hu_shift)
        self.flip = Flip(config.flip_p, config.flip_axes)
        self.rotate = Rotate(config.rotate_p, config.rotate_degrees)
        self.zoom = Zoom(config.zoom_p, config.zoom_range)
        self.elastic = Elastic(config.elastic_p, config.elastic_magnitude, config.elastic_grid)
        self.noise = GaussianNoise(config.noise_p, config.noise_std)
        self.transforms = (self.organ_hu_shift, self.flip, self.rotate, self.zoom, self.elastic, self.noise)

    @property
    def enabled(self) -> bool:
        """False when no transform can ever be drawn (every probability 0): the caller may skip the call."""
        return any(transform.active for transform in self.transforms)

    def __call__(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        generator: torch.Generator,
        *,
        spacing: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_sample(image, label, spacing)
        if not self.enabled:
            return image, label
        # One seed per transform, always all of them, in a fixed order: each transform owns its generator.
        seeds = torch.randint(_SEED_BOUND, (len(self.transforms),), generator=generator).tolist()
        own = dict(zip((t.name for t in self.transforms), (torch.Generator().manual_seed(s) for s in seeds)))

        if self.organ_hu_shift.active:
            with _named(self.organ_hu_shift.name):
                shifts = self.organ_hu_shift.sample(own[self.organ_hu_shift.name], _label_ids(label))
                image, label = self.organ_hu_shift.apply(image, label, shifts)
        if self.flip.active:
            with _named(self.flip.name):
                image, label = self.flip.apply(image, label, self.flip.sample(own[self.flip.name]))
        image, label = self._warp(image, label, own, spacing)
        if self.noise.active:
            with _named(self.noise.name):
                image, label = self.noise.apply(image, label, self.noise.sample(own[self.noise.name]))
        return image, label

    def _warp(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        own: dict[str, torch.Generator],
        spacing: Sequence[float] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation, zoom and elastic deformation, whichever are drawn, in a single resampling."""
        params = {}
        for transform in (self.rotate, self.zoom, self.elastic):
            if transform.active:
                with _named(transform.name):
                    drawn = transform.sample(own[transform.name])
                if drawn is not None:
                    params[transform.name] = drawn
        if not params:
            return image, label
        with _named("+".join(params)):
            matrix = None
            if self.rotate.name in params:
                matrix = self.rotate.matrix(params[self.rotate.name], spacing)
            if self.zoom.name in params:
                zoom = self.zoom.matrix(params[self.zoom.name])
                matrix = zoom if matrix is None else matrix @ zoom
            return warp(image, label, matrix=matrix, control=params.get(self.elastic.name))


def _label_ids(label: torch.Tensor) -> list[int]:
    """Non-zero ids present in a uint8 label map, ascending."""
    counts = torch.bincount(label.reshape(-1), minlength=256)
    return (torch.nonzero(counts[1:]).flatten() + 1).tolist()


def _check_sample(image: torch.Tensor, label: torch.Tensor, spacing: Sequence[float] | None) -> None:
    if image.dim() != 3 or tuple(image.shape) != tuple(label.shape):
        raise ValueError(
            f"expected an image and a label map of the same [z, y, x] shape, got {tuple(image.shape)} and "
            f"{tuple(label.shape)}"
        )
    if not image.is_floating_point():
        raise TypeError(f"the image must be a float tensor of HU, got {image.dtype}")
    if label.dtype != torch.uint8:
        raise TypeError(f"the label map must be a uint8 tensor, got {label.dtype}")
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ValueError(f"spacing must be 3 positive values [z, y, x] in mm, got {spacing}")

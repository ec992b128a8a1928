"""Training augmentations on tiny seeded synthetic volumes: determinism, semantics, label safety, errors."""

from __future__ import annotations

import pytest
import torch

from flareseg.config.loader import ConfigError
from flareseg.config.schema import AugmentConfig
from flareseg.data.augment import Augmenter, Flip, Rotate

SHAPE = (24, 32, 28)
ALL_OFF = dict(organ_hu_shift_p=0.0, flip_p=0.0, rotate_p=0.0, elastic_p=0.0, noise_p=0.0, zoom_p=0.0)
ALL_ON = dict(organ_hu_shift_p=1.0, flip_p=1.0, rotate_p=1.0, elastic_p=1.0, noise_p=1.0, zoom_p=1.0)


def _config(**overrides) -> AugmentConfig:
    """Every transform off except the ones named."""
    return AugmentConfig(**{**ALL_OFF, **overrides})


def _blocks() -> torch.Tensor:
    """Three separated boxes with ids 1, 2, 3 (background between them)."""
    label = torch.zeros(SHAPE, dtype=torch.uint8)
    label[4:12, 5:14, 6:15] = 1
    label[13:21, 8:18, 14:23] = 2
    label[5:11, 19:28, 4:12] = 3
    return label


def _sphere(radius: float, shape=SHAPE, spacing=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """A centred ball of `radius` mm as a uint8 label (id 1)."""
    axes = [(torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return ((z**2 + y**2 + x**2) <= radius**2).to(torch.uint8)


def _hu_image(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(SHAPE, generator=generator) * 1400 - 1000


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_label_follows_image(image: torch.Tensor, label: torch.Tensor, ids=(1, 2, 3)) -> None:
    """With image = 100 * label before the transform, voxels labelled k must still hold ~100 k HU."""
    for k in ids:
        inside = label == k
        assert inside.sum() > 0, f"label {k} vanished"
        ratio = image[inside].mean().item() / (100.0 * k)
        assert abs(ratio - 1.0) < 0.15, f"label {k}: mean image {ratio:.3f} x 100k, label and image misaligned"


def test_same_seed_same_output_different_seed_differs():
    augmenter = Augmenter(AugmentConfig(**ALL_ON))
    label = _blocks()
    image = _hu_image()
    first = augmenter(image, label, _seeded(3))
    again = augmenter(image, label, _seeded(3))
    other = augmenter(image, label, _seeded(4))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[1], other[1])


def test_global_generators_untouched():
    augmenter = Augmenter(AugmentConfig(**ALL_ON))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    augmenter(_hu_image(), _blocks(), _seeded(0))
    assert torch.equal(torch.rand(4), expected)


def test_all_probabilities_zero_is_identity_and_disabled():
    augmenter = Augmenter(_config())
    assert augmenter.enabled is False
    image, label = _hu_image(), _blocks()
    out_image, out_label = augmenter(image, label, _seeded(0))
    assert torch.equal(out_image, image) and torch.equal(out_label, label)
    assert Augmenter(AugmentConfig()).enabled is True  # the default shifts organ HU


def test_shapes_dtypes_kept_and_inputs_not_modified():
    augmenter = Augmenter(AugmentConfig(**ALL_ON))
    image, label = _hu_image(), _blocks()
    image_copy, label_copy = image.clone(), label.clone()
    out_image, out_label = augmenter(image, label, _seeded(1))
    assert out_image.shape == SHAPE and out_label.shape == SHAPE
    assert out_image.dtype == torch.float32 and out_label.dtype == torch.uint8
    assert torch.equal(image, image_copy) and torch.equal(label, label_copy)
    assert set(out_label.unique().tolist()) <= {0, 1, 2, 3}


def test_organ_hu_shift_is_one_constant_per_organ_and_spares_background():
    augmenter = Augmenter(_config(organ_hu_shift_p=1.0, organ_hu_shift=200.0))
    image, label = _hu_image(), _blocks()
    out_image, out_label = augmenter(image, label, _seeded(5))
    assert torch.equal(out_label, label)
    difference = out_image - image
    assert torch.equal(out_image[label == 0], image[label == 0])
    shifts = []
    for k in (1, 2, 3):
        organ = difference[label == k]
        assert (organ.max() - organ.min()).item() < 1e-3, f"organ {k} shifted by more than one value"
        shifts.append(organ.mean().item())
    assert all(0 < abs(shift) <= 200.0 for shift in shifts)
    assert len({round(shift, 3) for shift in shifts}) == 3  # independent draws


def test_organ_hu_shift_probability_is_per_organ():
    augmenter = Augmenter(_config(organ_hu_shift_p=0.5))
    image, label = _hu_image(), _blocks()
    generator = _seeded(0)
    shifted = []
    for _ in range(100):
        out_image, _ = augmenter(image, label, generator)
        shifted += [not torch.equal(out_image[label == k], image[label == k]) for k in (1, 2, 3)]
    assert 0.35 < sum(shifted) / len(shifted) < 0.65


def test_flip_axis_zero():
    augmenter = Augmenter(_config(flip_p=1.0, flip_axes=[0]))
    image, label = _hu_image(), _blocks()
    out_image, out_label = augmenter(image, label, _seeded(0))
    assert torch.equal(out_image, torch.flip(image, (0,)))
    assert torch.equal(out_label, torch.flip(label, (0,)))


def test_flip_probability_per_axis():
    flip = Flip(0.5, [0, 1, 2])
    generator = _seeded(0)
    counts = torch.zeros(3)
    for _ in range(300):
        for axis in flip.sample(generator):
            counts[axis] += 1
    assert all(100 < count < 200 for count in counts.tolist())


def test_rotation_keeps_ids_volumes_and_alignment():
    augmenter = Augmenter(_config(rotate_p=1.0, rotate_degrees=20.0))
    label = _blocks()
    image = label.float() * 100
    for seed in range(3):
        out_image, out_label = augmenter(image, label, _seeded(seed))
        assert not torch.equal(out_label, label)
        assert set(out_label.unique().tolist()) <= {0, 1, 2, 3}
        for k in (1, 2, 3):
            ratio = (out_label == k).sum().item() / (label == k).sum().item()
            assert abs(ratio - 1.0) < 0.15, f"label {k} volume changed by {ratio:.3f}"
        _assert_label_follows_image(out_image, out_label)


def test_rotation_by_90_degrees_matches_rot90():
    generator = _seeded(0)
    image = torch.rand(10, 16, 16, generator=generator)
    label = torch.randint(0, 4, (10, 16, 16), generator=generator, dtype=torch.uint8)
    out_image, out_label = Rotate(1.0, 90.0).apply(image, label, (90.0, 0.0, 0.0))
    assert torch.allclose(out_image, torch.rot90(image, -1, (1, 2)), atol=1e-4)
    assert torch.equal(out_label, torch.rot90(label, -1, (1, 2)))


def test_rotation_with_spacing_is_rigid_in_millimetres():
    spacing = (1.0, 2.0, 1.0)
    matrix = Rotate.matrix((25.0, -10.0, 15.0), spacing)
    scale = torch.tensor(spacing, dtype=torch.float64)
    physical = matrix * scale[:, None] / scale[None, :]  # diag(s) @ M @ diag(1/s)
    assert torch.allclose(physical @ physical.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    # A ball in millimetres is an ellipsoid in voxels; rotating it in millimetres leaves it (nearly) in place.
    ball = _sphere(9.0, shape=(24, 20, 28), spacing=spacing)
    image = ball.float()
    in_mm = Rotate(1.0, 0.0).apply(image, ball, (45.0, 0.0, 0.0), spacing=spacing)[1]
    in_voxels = Rotate(1.0, 0.0).apply(image, ball, (45.0, 0.0, 0.0))[1]

    def dice(a, b):
        return 2 * ((a == 1) & (b == 1)).sum().item() / ((a == 1).sum() + (b == 1).sum()).item()

    assert dice(in_mm, ball) > 0.9  # nearest-neighbour staircase on a small ball
    assert dice(in_voxels, ball) < 0.8  # rotated in voxels, the ellipsoid turns away from itself


def test_zoom_enlarges_a_centred_ball_by_scale_cubed():
    scale = 1.15
    augmenter = Augmenter(_config(zoom_p=1.0, zoom_range=(scale, scale)))
    ball = _sphere(7.0)
    out_image, out_label = augmenter(ball.float() * 100, ball, _seeded(0))
    ratio = out_label.sum().item() / ball.sum().item()
    assert abs(ratio / scale**3 - 1.0) < 0.08, f"volume ratio {ratio:.3f}, expected {scale**3:.3f}"
    _assert_label_follows_image(out_image, out_label, ids=(1,))


def test_warp_pads_image_with_its_minimum_and_label_with_background():
    augmenter = Augmenter(_config(zoom_p=1.0, zoom_range=(0.6, 0.6)))
    image = _hu_image() + 2000.0  # minimum well above 0: zero padding would show up
    label = torch.ones(SHAPE, dtype=torch.uint8)
    out_image, out_label = augmenter(image, label, _seeded(0))
    corner = (0, 0, 0)
    assert out_label[corner] == 0 and out_label[12, 16, 14] == 1
    assert out_image[corner].item() == pytest.approx(image.min().item())


def test_elastic_keeps_ids_and_alignment_and_changes_labels():
    augmenter = Augmenter(_config(elastic_p=1.0, elastic_magnitude=3.0, elastic_grid=4))
    label = _blocks()
    image = label.float() * 100
    out_image, out_label = augmenter(image, label, _seeded(2))
    assert set(out_label.unique().tolist()) <= {0, 1, 2, 3}
    assert (out_label != label).float().mean().item() > 0.01
    _assert_label_follows_image(out_image, out_label)


def test_all_spatial_transforms_together_keep_alignment():
    augmenter = Augmenter(_config(rotate_p=1.0, zoom_p=1.0, elastic_p=1.0, flip_p=1.0, elastic_magnitude=2.0))
    label = _blocks()
    out_image, out_label = augmenter(label.float() * 100, label, _seeded(7))
    assert set(out_label.unique().tolist()) <= {0, 1, 2, 3}
    _assert_label_follows_image(out_image, out_label)


def test_noise_has_the_configured_std_and_spares_the_label():
    augmenter = Augmenter(_config(noise_p=1.0, noise_std=20.0))
    image, label = _hu_image(), _blocks()
    out_image, out_label = augmenter(image, label, _seeded(0))
    assert torch.equal(out_label, label)
    std, mean = torch.std_mean(out_image - image)
    assert abs(std.item() - 20.0) < 1.0 and abs(mean.item()) < 1.0


def test_failing_transform_is_named(monkeypatch):
    def boom(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(Flip, "apply", boom)
    with pytest.raises(RuntimeError, match="augmentation 'flip' failed: boom"):
        Augmenter(_config(flip_p=1.0))(_hu_image(), _blocks(), _seeded(0))
    monkeypatch.setattr(Rotate, "matrix", boom)
    with pytest.raises(RuntimeError, match="augmentation 'rotate' failed: boom"):
        Augmenter(_config(rotate_p=1.0))(_hu_image(), _blocks(), _seeded(0))


@pytest.mark.parametrize(
    "overrides",
    [
        {"flip_p": 1.5},
        {"noise_std": -1.0},
        {"rotate_degrees": -5.0},
        {"flip_axes": [0, 0]},
        {"flip_axes": [3]},
        {"elastic_grid": 1},
        {"zoom_range": (1.2, 0.8)},
    ],
)
def test_bad_config_rejected_up_front(overrides):
    with pytest.raises(ConfigError):
        Augmenter(_config(**overrides))


def test_bad_inputs_rejected():
    augmenter = Augmenter(AugmentConfig())
    with pytest.raises(TypeError, match="uint8"):
        augmenter(_hu_image(), _blocks().long(), _seeded(0))
    with pytest.raises(TypeError, match="float"):
        augmenter(_hu_image().to(torch.int16), _blocks(), _seeded(0))
    with pytest.raises(ValueError, match="same"):
        augmenter(_hu_image()[:-1], _blocks(), _seeded(0))

"""Losses: Dice values, focal / BCE / TopK terms against naive formulas, partial labels, weights, precisions."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from flareseg.config.schema import LossConfig
from flareseg.losses import (
    LOSSES,
    bce_term,
    build_loss,
    dice_per_channel,
    focal_map,
    focal_term,
    hard_dice,
    topk_term,
)

NAMES = sorted(LOSSES)


def _batch(seed: int = 0, shape: tuple[int, ...] = (2, 3, 4, 5, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and a multi-hot target in which every (sample, label) pair has some foreground."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(shape, generator=generator)
    target = torch.rand(shape, generator=generator) < 0.3
    target[..., 0, 0, 0] = True
    return logits, target


def _naive_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits.double())
    g = target.double()
    return -(g * torch.log(p) + (1 - g) * torch.log(1 - p))


def test_dice_is_zero_for_perfect_logits_and_one_for_wrong_ones():
    _, target = _batch()
    sign = 2 * target.float() - 1
    loss = build_loss(LossConfig())
    assert loss(20 * sign, target).item() < 1e-6
    assert loss(-20 * sign, target).item() > 1 - 1e-6


def test_dice_matches_a_hand_computed_example():
    logits = torch.tensor([0.0, math.log(3), -math.log(3), 0.0]).reshape(1, 1, 2, 1, 2)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 1, 2)
    # p = [1/2, 3/4, 1/4, 1/2]: sum pg = 5/4, sum p^2 = 9/8, sum g^2 = 2; smooth 1 in both
    expected = 1 - (2 * 5 / 4 + 1) / (9 / 8 + 2 + 1)
    loss = build_loss(LossConfig(smooth=1.0))(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.5, 2.0), (0.25, 1.5), (0.9, 0.0)])
def test_focal_term_matches_the_naive_formula(alpha, gamma):
    logits, target = _batch(seed=1)
    p = torch.sigmoid(logits.double())
    g = target.double()
    p_t = torch.where(target, p, 1 - p)
    alpha_t = torch.where(target, alpha, 1 - alpha)
    naive = (-alpha_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()
    config = LossConfig(name="dice_focal", focal_alpha=alpha, focal_gamma=gamma, second_weight=0.7)
    total = build_loss(config)(logits, target)
    dice = build_loss(LossConfig())(logits, target)
    assert total.item() == pytest.approx(dice.item() + 0.7 * naive.item(), rel=1e-5)
    assert focal_map(logits.double(), g, alpha, gamma).allclose(-alpha_t * (1 - p_t) ** gamma * torch.log(p_t))


def test_focal_down_weights_easy_voxels_only():
    target = torch.tensor([1.0, 0.0, 1.0, 0.0])
    logits = torch.tensor([4.0, -4.0, -2.0, 2.0])  # two easy voxels, then two hard ones
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    ratio = focal_map(logits, target, alpha=0.5, gamma=2.0) / (0.5 * bce)
    assert (ratio[:2] < 1e-3).all()
    assert (ratio[2:] > 0.75).all()
    assert focal_map(logits, target, alpha=0.5, gamma=0.0).allclose(0.5 * bce)


def test_focal_alpha_weights_positives_and_negatives():
    target = torch.tensor([1.0, 0.0])
    logits = torch.tensor([0.3, 0.3])
    high, low = focal_map(logits, target, 0.75, 2.0), focal_map(logits, target, 0.25, 2.0)
    assert high[0].item() == pytest.approx(3 * low[0].item())
    assert high[1].item() == pytest.approx(low[1].item() / 3)
    p = torch.sigmoid(torch.tensor(0.3)).item()
    assert high[0].item() == pytest.approx(-0.75 * (1 - p) ** 2 * math.log(p))


def test_bce_term_is_the_mean_bce():
    logits, target = _batch(seed=2)
    total = build_loss(LossConfig(name="dice_bce", second_weight=0.5))(logits, target)
    dice = build_loss(LossConfig())(logits, target)
    assert total.item() == pytest.approx(dice.item() + 0.5 * _naive_bce(logits, target).mean().item(), rel=1e-5)


@pytest.mark.parametrize("percent", [10.0, 37.0, 100.0])
def test_topk_term_matches_a_sort_based_implementation(percent):
    logits, target = _batch(seed=3, shape=(3, 4, 3, 4, 5))
    annotated = torch.tensor([[True, False, True, True], [False, False, False, False], [False, True, False, False]])
    bce = _naive_bce(logits, target)
    per_sample = []
    for sample_bce, sample_annotated in zip(bce, annotated):
        if sample_annotated.any():
            pool = sample_bce[sample_annotated].flatten().sort(descending=True).values
            k = max(1, round(pool.numel() * percent / 100))
            per_sample.append(pool[:k].mean())
    naive = torch.stack(per_sample).mean()
    config = LossConfig(name="dice_topk", topk_percent=percent, second_weight=2.0)
    total = build_loss(config)(logits, target, annotated)
    dice = build_loss(LossConfig())(logits, target, annotated)
    assert total.item() == pytest.approx(dice.item() + 2.0 * naive.item(), rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_unannotated_labels_add_no_loss_and_no_gradient(name):
    logits, target = _batch(seed=4)
    annotated = torch.tensor([[True, False, True], [False, False, True]])
    loss = build_loss(LossConfig(name=name, second_weight=0.8))
    logits.requires_grad_(True)
    value = loss(logits, target, annotated)
    value.backward()
    missing = ~annotated
    assert torch.count_nonzero(logits.grad[missing]) == 0
    assert torch.count_nonzero(logits.grad[annotated]) > 0
    flipped = target.clone()
    flipped[missing] = ~flipped[missing]
    assert torch.equal(loss(logits, flipped, annotated), value)


@pytest.mark.parametrize("name", NAMES)
def test_masking_a_label_equals_dropping_it(name):
    logits, target = _batch(seed=5)
    loss = build_loss(LossConfig(name=name, second_weight=0.8))
    masked = loss(logits, target, torch.tensor([[True, False, True], [True, False, True]]))
    sliced = loss(logits[:, [0, 2]], target[:, [0, 2]])
    assert masked.item() == pytest.approx(sliced.item(), rel=1e-6)
    assert masked.item() != pytest.approx(loss(logits, target).item(), rel=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_nothing_annotated_gives_zero_with_a_gradient_path(name):
    logits, target = _batch(seed=6)
    logits.requires_grad_(True)
    value = build_loss(LossConfig(name=name))(logits, target, torch.zeros(2, 3, dtype=torch.bool))
    assert value.item() == 0.0
    assert value.requires_grad
    value.backward()
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize(
    "term", [bce_term, partial(focal_term, alpha=0.5, gamma=2.0), partial(topk_term, percent=10.0)]
)
def test_second_terms_alone_stay_attached_when_nothing_is_annotated(term):
    logits, target = _batch(seed=6)
    logits.requires_grad_(True)
    value = term(logits.flatten(2), target.float().flatten(2), torch.zeros(2, 3))
    assert value.item() == 0.0
    assert value.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_zero_label_weight_equals_dropping_the_label(name):
    logits, target = _batch(seed=7)
    weighted = build_loss(LossConfig(name=name, label_weights=[1.0, 0.0, 2.0]))(logits, target)
    dropped = build_loss(LossConfig(name=name, label_weights=[1.0, 2.0]))(logits[:, [0, 2]], target[:, [0, 2]])
    assert weighted.item() == pytest.approx(dropped.item(), rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_label_weights_give_a_weighted_mean_over_labels(name):
    logits, target = _batch(seed=8, shape=(1, 2, 4, 5, 6))
    loss = build_loss(LossConfig(name=name, topk_percent=100.0))  # TopK of every voxel: linear in the labels
    first, second = loss(logits[:, :1], target[:, :1]), loss(logits[:, 1:], target[:, 1:])
    weighted = build_loss(LossConfig(name=name, topk_percent=100.0, label_weights=[1.0, 3.0]))(logits, target)
    assert weighted.item() == pytest.approx((first.item() + 3 * second.item()) / 4, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_logits_give_a_close_float32_loss(name, dtype):
    logits, target = _batch(seed=9)
    loss = build_loss(LossConfig(name=name))
    half = loss(logits.to(dtype), target)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(loss(logits.to(dtype).float(), target).item(), rel=1e-6)
    assert half.item() == pytest.approx(loss(logits, target).item(), rel=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss(logits.to(dtype), target).dtype == torch.float32


def test_unknown_loss_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="did you mean 'dice_focal'") as error:
        build_loss(LossConfig(name="dice_focall"))
    assert all(name in str(error.value) for name in ("dice", "dice_bce", "dice_focal", "dice_topk"))


def test_a_registered_loss_can_be_chosen_from_the_config(tmp_path):
    """The registry, not a fixed list in the config schema, decides which loss names are valid."""
    from flareseg.config import load_config
    from flareseg.losses import LOSSES, register_loss

    @register_loss("dice_half_bce")
    def _half_bce(cfg):
        return lambda logits, target, weights: 0.5 * bce_term(logits, target, weights)

    try:
        (tmp_path / "loss.yaml").write_text("train:\n  loss:\n    name: dice_half_bce\n")
        config = load_config(tmp_path / "loss.yaml", [])
        loss = build_loss(config.train.loss)
        logits, target = torch.randn(1, 2, 4, 4, 4), torch.rand(1, 2, 4, 4, 4) > 0.5
        dice, dice_bce = (build_loss(LossConfig(name=n))(logits, target) for n in ("dice", "dice_bce"))
        assert loss(logits, target).item() == pytest.approx(0.5 * (dice + dice_bce).item(), rel=1e-5)
    finally:
        del LOSSES["dice_half_bce"]


def test_hard_dice_follows_the_flare_conventions():
    prediction = torch.zeros(1, 4, 2, 3, dtype=torch.bool)
    target = torch.zeros(1, 4, 2, 3, dtype=torch.bool)
    prediction[0, 1, 0, 0] = True  # label 1: predicted, not in the target
    target[0, 2, 0, 0] = True  # label 2: in the target, not predicted
    prediction[0, 3, 0, :3] = True  # label 3: |P| = 3, |G| = 2, overlap 1 -> 2 / 5
    target[0, 3, 0, 2] = target[0, 3, 1, 0] = True
    dice = hard_dice(prediction, target)
    assert dice.shape == (1, 4)
    assert dice[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.4])


def test_dice_per_channel_thresholds_the_sigmoid():
    logits, target = _batch(seed=10)
    assert torch.equal(dice_per_channel(logits, target), hard_dice(logits > 0, target))
    assert torch.equal(dice_per_channel(logits, target, threshold=0.9), hard_dice(logits > math.log(9), target))


def _dynamic(momentum: float = 0.9, **kwargs) -> torch.nn.Module:
    return build_loss(LossConfig(dynamic_weights=True, dynamic_momentum=momentum, **kwargs))


def _good_and_bad(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that segment label 0 almost perfectly and label 1 badly (inverted), label 2 in between."""
    logits, target = _batch(seed=seed)
    sign = 2 * target.float() - 1
    logits[:, 0], logits[:, 1] = 3 * sign[:, 0], -2 * sign[:, 1]
    return logits, target


def test_dynamic_weights_favour_the_poorly_segmented_label():
    loss = _dynamic()
    logits, target = _good_and_bad(seed=11)
    value = loss(logits, target)
    weights = loss.class_weights(3, logits.device)
    assert weights[1] > weights[2] > weights[0] and weights[1] > 10 * weights[0]
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-6)
    # The loss is the statically weighted loss with those weights.
    static = build_loss(LossConfig(label_weights=weights.tolist()))(logits, target)
    assert value.item() == pytest.approx(static.item(), rel=1e-6)
    assert value.item() > build_loss(LossConfig())(logits, target).item()  # the bad label counts more


def test_dynamic_weights_scale_the_static_weights_and_average_one():
    loss = _dynamic(label_weights=[1.0, 4.0, 0.0])
    logits, target = _good_and_bad(seed=12)
    loss(logits, target)
    weights = loss.class_weights(3, logits.device)
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-6) and weights[2].item() == 0.0
    factors = 1 - loss.running_dice
    assert (weights[1] / weights[0]).item() == pytest.approx(4 * (factors[1] / factors[0]).item(), rel=1e-5)


def test_running_dice_is_the_first_batch_then_an_exponential_average():
    loss = _dynamic(momentum=0.75)
    (first, target_1), (second, target_2) = _batch(seed=13), _batch(seed=14)
    loss(first, target_1)
    loss(second, target_2)
    dice_1 = 1 - torch.stack([build_loss(LossConfig())(first[:, k : k + 1], target_1[:, k : k + 1]) for k in range(3)])
    dice_2 = 1 - torch.stack([build_loss(LossConfig())(second[:, k : k + 1], target_2[:, k : k + 1]) for k in range(3)])
    assert torch.allclose(loss.running_dice, 0.75 * dice_1 + 0.25 * dice_2, atol=1e-6)
    assert loss.dice_updates.tolist() == [2, 2, 2]


def test_dynamic_weights_disabled_or_in_eval_mode_change_nothing():
    logits, target = _batch(seed=15)
    annotated = torch.tensor([[True, False, True], [True, True, False]])
    plain = build_loss(LossConfig(name="dice_bce", label_weights=[1.0, 2.0, 3.0]))
    before = plain(logits, target, annotated)
    assert torch.equal(plain(logits, target, annotated), before)
    assert plain.running_dice.numel() == 0 and plain.dice_updates.numel() == 0
    dynamic = _dynamic(name="dice_bce", label_weights=[1.0, 2.0, 3.0]).eval()
    assert torch.equal(dynamic(logits, target, annotated), before)  # eval: no update, no running values yet
    assert dynamic.running_dice.numel() == 0
    dynamic.train()(logits, target, annotated)
    frozen = dynamic.running_dice.clone()
    dynamic.eval()(*_batch(seed=16))
    assert torch.equal(dynamic.running_dice, frozen)


def test_unannotated_pairs_do_not_move_the_running_dice():
    logits, target = _batch(seed=17)
    annotated = torch.tensor([[True, False, False], [True, True, False]])
    loss, other = _dynamic(), _dynamic()
    loss(logits, target, annotated)
    scrambled = logits.clone()
    scrambled[~annotated] = -scrambled[~annotated]  # change only the unannotated pairs
    other(scrambled, target, annotated)
    assert torch.equal(loss.running_dice, other.running_dice)
    assert loss.dice_updates.tolist() == [1, 1, 0] and loss.running_dice[2].item() == 0.0
    only_second = 1 - build_loss(LossConfig())(logits[1:, 1:2], target[1:, 1:2])
    assert loss.running_dice[1].item() == pytest.approx(only_second.item(), rel=1e-6)


def test_running_dice_survives_a_state_dict_round_trip(tmp_path):
    loss = _dynamic(name="dice_focal")
    loss(*_batch(seed=18))
    torch.save(loss.state_dict(), tmp_path / "loss.pt")
    restored = _dynamic(name="dice_focal")
    restored.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    assert torch.equal(restored.running_dice, loss.running_dice)
    assert torch.equal(restored.dice_updates, loss.dice_updates)
    logits, target = _batch(seed=19)
    assert torch.equal(restored(logits, target), loss(logits, target))
    assert torch.equal(restored.running_dice, loss.running_dice)
    fresh = _dynamic(name="dice_focal")
    fresh.load_state_dict(build_loss(LossConfig()).state_dict())  # a run without dynamic weights: empty state
    assert fresh.running_dice.numel() == 0

"""Segmentation losses on per-label sigmoids (no background channel), with partial-label masks.

Shapes: `logits` and `target` are [B, C, *spatial] (C labels, one sigmoid each; target multi-hot, any dtype);
`annotated` is [B, C] bool, False where a case does not annotate a label: that (sample, label) pair adds no
loss and gets no gradient. Losses are computed in float32 whatever the dtype of the logits (autocast).

`build_loss(config.train.loss)` gives soft Dice (squared denominator) plus the second term that
`LossConfig.name` picks: "dice" (none), "dice_focal", "dice_bce" or "dice_topk", optionally with dynamic
per-label weights (`LossConfig.dynamic_weights`). `hard_dice` is the validation metric (FLARE convention: both
masks empty = 1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flareseg.config.schema import LossConfig
from flareseg.registry import Registry

SecondTerm = Callable[[Tensor, Tensor, Tensor], Tensor]  # (logits, target [B, C, N], pair weights [B, C]) -> scalar
LossBuilder = Callable[[LossConfig], SecondTerm | None]  # the term a loss name adds to Dice (None = Dice only)
LOSSES: Registry[LossBuilder] = Registry("loss", "train.loss.name")
_MIN_DYNAMIC_FACTOR = 1e-3  # dynamic weights: smallest (1 - running Dice) factor


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """sum(w * v) / sum(w) over pairs with w > 0: values, weights [B, C] -> scalar.

    Pairs with w == 0 get exactly zero gradient (even where a value is not finite); with no positive weight
    the result is 0, still attached to `values` so that `backward()` works.
    """
    total = (torch.where(weights > 0, values, 0.0) * weights).sum()
    norm = weights.sum()
    return total / torch.where(norm > 0, norm, torch.ones_like(norm))


def soft_dice(probs: Tensor, target: Tensor, smooth: float) -> Tensor:
    """Soft Dice with squared denominator, (2 sum pg + s) / (sum p^2 + sum g^2 + s): [B, C, N] -> [B, C]."""
    intersection = (probs * target).sum(-1)
    denominator = probs.square().sum(-1) + target.square().sum(-1)
    return (2 * intersection + smooth) / (denominator + smooth)


def focal_map(logits: Tensor, target: Tensor, alpha: float, gamma: float) -> Tensor:
    """Per-voxel binary focal loss -alpha_t (1 - p_t)^gamma log(p_t): [B, C, ...] -> same shape.

    p_t = p where g = 1 else 1 - p, alpha_t = alpha where g = 1 else 1 - alpha. Stable for large |logits|:
    -log(p_t) is BCE-with-logits, so 1 - p_t = -expm1(-BCE).
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return alpha_t * (-torch.expm1(-bce)).pow(gamma) * bce


def focal_term(logits: Tensor, target: Tensor, weights: Tensor, *, alpha: float, gamma: float) -> Tensor:
    """Focal loss averaged over the voxels of the weighted (sample, label) pairs: [B, C, N] -> scalar."""
    return weighted_mean(focal_map(logits, target, alpha, gamma).mean(-1), weights)


def bce_term(logits: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """BCE-with-logits averaged over the voxels of the weighted (sample, label) pairs: [B, C, N] -> scalar."""
    return weighted_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1), weights)


def topk_term(logits: Tensor, target: Tensor, weights: Tensor, *, percent: float) -> Tensor:
    """Mean of the largest `percent`% per-voxel BCE values of each sample, averaged over samples: -> scalar.

    A sample's pool is the voxels of its labels with weight > 0; at least one voxel is kept. The kept
    voxels are averaged with their label's weight (plain mean when the weights are equal). Samples with
    an empty pool are left out; 0 (attached to `logits`) when every pool is empty.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    voxels = bce.shape[-1]
    per_sample = []
    for sample_bce, sample_weights in zip(bce, weights):
        keep = sample_weights > 0
        if not keep.any():
            continue
        pool = sample_bce[keep].flatten()
        k = max(1, round(pool.numel() * percent / 100))
        top, index = pool.topk(k)
        top_weights = sample_weights[keep][index // voxels]
        per_sample.append((top * top_weights).sum() / top_weights.sum())
    if not per_sample:
        return logits.sum() * 0
    return torch.stack(per_sample).mean()


class SegmentationLoss(nn.Module):
    """Soft Dice + `second_weight` x an optional second term, over the annotated (sample, label) pairs.

    Dice is the weighted mean of 1 - Dice over pairs; `label_weights` (length C, None = all 1) weigh the
    labels in every term. forward(logits, target, annotated=None) -> float32 scalar.

    With `dynamic_momentum` set (dynamic weights), the module keeps a running soft Dice per label (buffer
    `running_dice`, [C]) and multiplies each label's weight by (1 - running Dice), renormalised to mean 1 over
    the labels, so the labels the network segments worst (small lesions) get a larger share of the loss.
    Each forward in training mode first updates the running values, without gradient, from the annotated pairs
    of the batch only: d_k <- m d_k + (1 - m) mean over annotated samples of soft Dice_k. A label's first
    measurement sets its value directly (`dice_updates`, [C], counts the measurements); a label not yet
    measured counts as Dice 0.5 in the renormalisation, where it changes nothing (a label only gets weight
    where it is annotated, and by then it has been measured). Deterministic; under DDP each process keeps its
    own running values from its own batches. The buffers are sized at the first training forward and are in
    `state_dict()`, so a resumed run continues with them.
    """

    def __init__(
        self,
        smooth: float = 1e-5,
        second_term: SecondTerm | None = None,
        second_weight: float = 1.0,
        label_weights: Sequence[float] | None = None,
        dynamic_momentum: float | None = None,
    ) -> None:
        super().__init__()
        if dynamic_momentum is not None and not 0.0 <= dynamic_momentum < 1.0:
            raise ValueError(f"dynamic_momentum must be in [0, 1) (or None), got {dynamic_momentum}")
        self.smooth = smooth
        self.second_term = second_term
        self.second_weight = second_weight
        self.dynamic_momentum = dynamic_momentum
        weights = None if label_weights is None else torch.as_tensor(label_weights, dtype=torch.float32)
        self.register_buffer("label_weights", weights, persistent=False)  # from the config, not training state
        self.register_buffer("running_dice", torch.zeros(0))
        self.register_buffer("dice_updates", torch.zeros(0, dtype=torch.long))

    def forward(self, logits: Tensor, target: Tensor, annotated: Tensor | None = None) -> Tensor:
        """logits, target [B, C, *spatial]; annotated [B, C] bool or None (all annotated) -> scalar."""
        if logits.shape != target.shape or logits.dim() < 3:
            raise ValueError(f"logits and target must both be [B, C, *spatial], got {logits.shape} and {target.shape}")
        with torch.autocast(logits.device.type, enabled=False):
            flat_logits = logits.float().flatten(2)
            flat_target = target.float().flatten(2)
            dice = soft_dice(torch.sigmoid(flat_logits), flat_target, self.smooth)
            if self.dynamic_momentum is not None and self.training:
                self._update_running_dice(dice.detach(), annotated)
            weights = self.pair_weights(annotated, logits.shape[0], logits.shape[1], logits.device)
            loss = weighted_mean(1 - dice, weights)
            if self.second_term is not None:
                loss = loss + self.second_weight * self.second_term(flat_logits, flat_target, weights)
        return loss

    def pair_weights(self, annotated: Tensor | None, batch: int, labels: int, device: torch.device) -> Tensor:
        """Weight of each (sample, label) pair, [B, C] float32: the label's weight if annotated, else 0."""
        weights = self.class_weights(labels, device).expand(batch, labels)
        if annotated is None:
            return weights
        if annotated.shape != (batch, labels):
            raise ValueError(f"annotated must be [B, C] = {[batch, labels]}, got {list(annotated.shape)}")
        return torch.where(annotated.to(device).bool(), weights, 0.0)

    def class_weights(self, labels: int, device: torch.device) -> Tensor:
        """Each label's weight, [C] float32: `label_weights` (or 1), times the dynamic factor when enabled."""
        if self.label_weights is None:
            weights = torch.ones(labels, device=device)
        elif self.label_weights.numel() != labels:
            raise ValueError(f"label_weights has {self.label_weights.numel()} entries for {labels} labels")
        else:
            weights = self.label_weights.to(device)
        if self.dynamic_momentum is None or self.running_dice.numel() == 0:
            return weights
        self._check_running_size(labels)
        dice = torch.where(self.dice_updates > 0, self.running_dice, 0.5).to(device)
        # The floor keeps a perfectly segmented label from dropping out of the loss altogether.
        weights = weights * (1 - dice).clamp_min(_MIN_DYNAMIC_FACTOR)
        mean = weights.mean()
        return weights / torch.where(mean > 0, mean, torch.ones_like(mean))

    @torch.no_grad()
    def _update_running_dice(self, dice: Tensor, annotated: Tensor | None) -> None:
        """Exponential moving average of each label's soft Dice over the batch's annotated samples."""
        batch, labels = dice.shape
        if self.running_dice.numel() == 0:
            self.running_dice = torch.zeros(labels, device=dice.device)
            self.dice_updates = torch.zeros(labels, dtype=torch.long, device=dice.device)
        self._check_running_size(labels)
        if annotated is None:
            mask = torch.ones_like(dice)
        elif annotated.shape != (batch, labels):
            raise ValueError(f"annotated must be [B, C] = {[batch, labels]}, got {list(annotated.shape)}")
        else:
            mask = annotated.to(dice.device).float()
        count = mask.sum(0)
        batch_dice = (dice * mask).sum(0) / count.clamp_min(1)
        seen = count > 0
        momentum = torch.where(self.dice_updates > 0, self.dynamic_momentum, 0.0)  # first measurement: no prior
        updated = momentum * self.running_dice + (1 - momentum) * batch_dice
        self.running_dice.copy_(torch.where(seen, updated, self.running_dice))
        self.dice_updates.add_(seen.long())

    def _check_running_size(self, labels: int) -> None:
        if self.running_dice.numel() != labels:
            raise ValueError(f"the running Dice holds {self.running_dice.numel()} labels, the logits {labels}")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # The running buffers are sized lazily: take the stored size (also empty) before copying the values.
        for name in ("running_dice", "dice_updates"):
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def register_loss(name: str) -> Callable[[LossBuilder], LossBuilder]:
    """Add the builder of the term that loss `name` adds to Dice (names are unique)."""
    return LOSSES.register(name)


@register_loss("dice")
def _dice(cfg: LossConfig) -> SecondTerm | None:
    return None


@register_loss("dice_focal")
def _dice_focal(cfg: LossConfig) -> SecondTerm | None:
    return functools.partial(focal_term, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)


@register_loss("dice_bce")
def _dice_bce(cfg: LossConfig) -> SecondTerm | None:
    return bce_term


@register_loss("dice_topk")
def _dice_topk(cfg: LossConfig) -> SecondTerm | None:
    return functools.partial(topk_term, percent=cfg.topk_percent)


def build_loss(config: LossConfig) -> SegmentationLoss:
    """The loss that `config` (train.loss) describes; an unknown name is a ConfigError (a ValueError)."""
    second_term = LOSSES.lookup(config.name)(config)
    momentum = config.dynamic_momentum if config.dynamic_weights else None
    return SegmentationLoss(config.smooth, second_term, config.second_weight, config.label_weights, momentum)


def hard_dice(prediction: Tensor, target: Tensor) -> Tensor:
    """Dice 2|P & G| / (|P| + |G|) per (sample, label): bool [B, C, *spatial] -> float32 [B, C].

    FLARE convention: both masks empty = 1.0, exactly one empty = 0.0.
    """
    prediction, target = prediction.bool().flatten(2), target.bool().flatten(2)
    intersection = (prediction & target).sum(-1).float()
    sizes = (prediction.sum(-1) + target.sum(-1)).float()
    return torch.where(sizes > 0, 2 * intersection / sizes.clamp_min(1), 1.0)


def dice_per_channel(logits: Tensor, target: Tensor, threshold: float = 0.5) -> Tensor:
    """`hard_dice` of sigmoid(logits) > threshold against target: [B, C, *spatial] -> float32 [B, C]."""
    return hard_dice(torch.sigmoid(logits.float()) > threshold, target)

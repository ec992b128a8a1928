"""Cross pseudo supervision (FLARE22 SemiSeg-CSSN): two networks of the same architecture, independently
initialised, each with its own optimizer, teach each other on labeled and unlabeled cases.

Each step, for net k and the other net o:
    loss_k = SegLoss(k on labeled, labels) + lambda * SegLoss(k on labeled + unlabeled, pseudo_o)
where pseudo_o = sigmoid(o's logits) > 0.5 per label, detached (the same activation as the targets; the reference's
off-by-one channel shift is not reproduced). lambda may ramp up as exp(-5 (1 - t)^2). Net A is validated and
checkpointed as usual; net B is also written (checkpoint_latest_b.pt, checkpoint_best_b.pt), usable for inference.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import torch
from torch.utils.data import DistributedSampler

from flareseg.checkpoint import BEST, LATEST, CheckpointError, load_weights, save_checkpoint, unwrap
from flareseg.data.training_sets import UnlabeledSamples
from flareseg.engine.distributed import wrap_for_processes
from flareseg.engine.optim import build_optimizer, set_learning_rate
from flareseg.engine.resume import FRESH_START, load_optimizer_state
from flareseg.engine.trainer import Trainer
from flareseg.losses import build_loss
from flareseg.models import build_model
from flareseg.models.runtime import autocast

LATEST_B = LATEST.replace(".pt", "_b.pt")
BEST_B = BEST.replace(".pt", "_b.pt")


class CrossPseudoSupervisionTrainer(Trainer):
    def _build_extra(self) -> None:
        settings = self.config.semi_supervised
        torch.manual_seed(self.settings.seed + 7919)  # net B: its own, independent initialisation
        self.model_b = build_model(self.config).to(self.device)
        self.network_b = wrap_for_processes(self.model_b, self.context)
        torch.manual_seed(self.settings.seed + self.context.rank)
        self.optimizer_b = build_optimizer(self.settings, self.model_b)
        unlabeled = self.data.unlabeled_ids()
        if settings.unlabeled_cases is not None:
            chosen = json.loads(settings.unlabeled_cases.read_text())
            chosen = chosen["selected"] if isinstance(chosen, dict) else chosen  # select-unlabeled's JSON or a list
            unlabeled = [case for case in chosen if case in set(unlabeled)]
        steps = math.ceil(len(self.train_set) / (self.settings.batch_size * self.context.world_size))
        length = steps * settings.unlabeled_batch_size * self.context.world_size
        self.unlabeled_set = UnlabeledSamples(self.data, unlabeled, self.config, self.settings.stage, length)
        self.unlabeled_sampler = DistributedSampler(
            self.unlabeled_set,
            num_replicas=self.context.world_size,
            rank=self.context.rank,
            shuffle=True,
            seed=self.settings.seed + 1,
        )
        # the pseudo-label term: the same loss, but its own instance, so that pseudo-labels never move the running
        # per-label Dice of dynamic weights (train.loss.dynamic_weights), which reflects the true labels only
        self.pseudo_loss = build_loss(replace(self.settings.loss, dynamic_weights=False)).to(self.device)

    def _start_epoch(self) -> None:
        set_learning_rate(self.optimizer_b, self.settings, self.epoch)
        self.network_b.train()
        self.unlabeled_set.set_epoch(self.epoch)
        self.unlabeled_sampler.set_epoch(self.epoch)
        loader = self._loader(
            self.unlabeled_set, self.unlabeled_sampler, self.config.semi_supervised.unlabeled_batch_size
        )
        self._unlabeled = iter(loader)

    def cps_weight(self) -> float:
        settings = self.config.semi_supervised
        length = settings.rampup_length(self.settings.epochs)
        if length == 0:
            return settings.weight
        t = min(1.0, self.epoch / length)
        return settings.weight * math.exp(-5.0 * (1.0 - t) ** 2)

    def train_step(self, batch: dict) -> float:
        image, target, annotated = self._inputs(batch)
        unlabeled = next(self._unlabeled)["image"].to(self.device, non_blocking=True)
        both = torch.cat([image, unlabeled])
        with autocast(self.device, self.precision):
            logits_a, logits_b = self.network(both), self.network_b(both)
        labeled = image.shape[0]
        everything = torch.ones(both.shape[0], target.shape[1], dtype=torch.bool, device=self.device)
        pseudo_a, pseudo_b = logits_a.detach() > 0, logits_b.detach() > 0  # sigmoid > 0.5 per label
        weight = self.cps_weight()
        cross_a = self.pseudo_loss(logits_a, pseudo_b, everything)
        cross_b = self.pseudo_loss(logits_b, pseudo_a, everything)
        loss_a = self.loss(logits_a[:labeled], target, annotated) + weight * cross_a
        loss_b = self.loss(logits_b[:labeled], target, annotated) + weight * cross_b
        loss = loss_a + loss_b
        self._check_loss(loss, batch)
        self._optimize(loss, [(self.model, self.optimizer), (self.model_b, self.optimizer_b)])
        return float(loss_a.detach())

    def validate(self) -> dict:
        record = super().validate()
        if record:
            with torch.no_grad():
                record["val_dice_mean_b"] = self._validate_model(self.model_b)["val_dice_mean"]
        return record

    def _state(self) -> dict:
        return {
            **super()._state(),
            "model_b": unwrap(self.model_b).state_dict(),
            "optimizer_b": self.optimizer_b.state_dict(),
        }

    def _restore_extra(self, state: dict) -> None:
        what = f"'train.resume': {self.out_dir / LATEST}"
        if "model_b" not in state or "optimizer_b" not in state:
            raise CheckpointError(f"{what} was written by a run with another train.method than cps: {FRESH_START}")
        load_weights(self.model_b, state["model_b"], f"{what} (net B)")
        load_optimizer_state(self.optimizer_b, state["optimizer_b"], f"{what} (net B)")

    def _save(self, record: dict, last: bool) -> None:
        best_before = self.best_dice
        super()._save(record, last)
        state_b = {**self._state(), "model": unwrap(self.model_b).state_dict()}  # net B as an inference checkpoint
        save_checkpoint(self.out_dir / LATEST_B, state_b)
        if self.best_dice > best_before:
            save_checkpoint(self.out_dir / BEST_B, state_b)

"""The trainer: one stage (a named prepared grid) on prepared data, with torch.amp and DDP, resumable and observable.

fit():
    for each epoch:  set lr -> _start_epoch -> train_epoch (train_step per batch) -> validate -> checkpoint -> log
                     -> _end_epoch

Variants (cross pseudo supervision, distillation) are subclasses, the one extension mechanism; they override
_build_extra, _start_epoch, train_step, _end_epoch (the "extension point" methods) and, to checkpoint what they add,
_state, _restore_extra and _save.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from flareseg.checkpoint import BEST, LATEST, load_pretrained, save_checkpoint, unwrap
from flareseg.config import Config, ConfigError, save_config, to_plain
from flareseg.data.patches import sliding_window
from flareseg.data.prepared import PreparedData
from flareseg.data.training_sets import TrainingSamples, ValidationSamples
from flareseg.engine.distributed import (
    DistributedContext,
    any_process,
    barrier,
    mean_over_processes,
    wrap_for_processes,
)
from flareseg.engine.loaders import data_loader
from flareseg.engine.optim import build_optimizer, set_learning_rate
from flareseg.engine.resume import (
    check_same_split,
    load_optimizer_state,
    load_scaler_state,
    read_training_state,
    resume_what,
)
from flareseg.engine.runlog import RunLog
from flareseg.losses import build_loss, hard_dice
from flareseg.models import build_model
from flareseg.models.runtime import autocast, resolve_precision

log = logging.getLogger(__name__)


class Trainer:
    """Trains `config.model` on `config.train.stage` arrays of the prepared data in `config.train.data`."""

    def __init__(self, config: Config, context: DistributedContext):
        self.out_dir = run_folder(config)
        self.data_dir = _required(config.train.data or config.prepare.out, "train.data (or prepare.out)")
        self.data = PreparedData(self.data_dir)
        prepared = self.data.settings
        # The prepared folder decides the stage grids: the trainer's config (and so every checkpoint) takes them.
        config = config if prepared is None else prepared.adopted_by(config, self.data.folder)
        _check_input_size(config, self.data_dir)
        self.config, self.context, self.settings = config, context, config.train
        self.device = context.device
        self.precision = resolve_precision(self.settings.precision, self.device)

        torch.manual_seed(self.settings.seed)  # the same initial weights in every process
        self.model = build_model(config).to(self.device)
        if self.settings.pretrained is not None:
            report = load_pretrained(self.model, self.settings.pretrained)
            self._info(f"pretrained weights from {self.settings.pretrained}: {report.summary()}")
        self.network = wrap_for_processes(self.model, context)
        torch.manual_seed(self.settings.seed + context.rank)  # dropout and loader seeds differ between ranks
        self.optimizer = build_optimizer(self.settings, self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.loss = build_loss(self.settings.loss).to(self.device)
        self.label_ids = torch.arange(1, config.num_classes + 1, device=self.device).view(1, -1, 1, 1, 1)

        train_ids, val_ids = self.data.fold(self.settings.fold)
        self.split = {"train": train_ids, "val": val_ids}  # checked on resume: the fold's cases must not move
        length = None
        if self.settings.iterations_per_epoch is not None:
            length = self.settings.iterations_per_epoch * self.settings.batch_size * context.world_size
        self.train_set = TrainingSamples(self.data, train_ids, config, self.settings.stage, length)
        self.val_set = ValidationSamples(self.data, val_ids, config, self.settings.stage) if val_ids else None
        self.sampler = DistributedSampler(
            self.train_set,
            num_replicas=context.world_size,
            rank=context.rank,
            shuffle=True,
            seed=self.settings.seed,
            drop_last=False,
        )

        self._build_extra()
        self.epoch = 0  # the next epoch to run
        self.best_dice = -1.0
        self.elapsed_seconds = 0.0  # training time so far, over interruptions (for train.time_budget_minutes)
        history = []
        if self.settings.resume and (self.out_dir / LATEST).is_file():
            history = self._resume(self.out_dir / LATEST)
        self.runlog = RunLog(self.out_dir, history, self.settings.tensorboard) if context.is_main else None

    # ---------------------------------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train to `train.epochs`; returns the per-epoch records."""
        if self.context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.out_dir)
        while self.epoch < self.settings.epochs:
            lr = set_learning_rate(self.optimizer, self.settings, self.epoch)
            start = time.perf_counter()
            train_loss, samples = self.train_epoch()
            seconds = time.perf_counter() - start
            self.elapsed_seconds += seconds
            last = self.epoch + 1 == self.settings.epochs or self._out_of_time()
            record = {
                "epoch": self.epoch,
                "lr": lr,
                "train_loss": train_loss,
                "seconds": seconds,
                "processes": self.context.world_size,
                "samples_per_second": samples * self.context.world_size / seconds,
            }
            if self.val_set is not None and (last or (self.epoch + 1) % self.settings.val_every == 0):
                record.update(self.validate())
            self.epoch += 1
            if self.context.is_main:
                self._save(record, last)
            barrier(self.context)
            self._end_epoch()
            if last:
                break
        if self.runlog is not None:
            self.runlog.close()
        return self.runlog.history if self.runlog is not None else []

    def train_epoch(self) -> tuple[float, int]:
        """One pass over this epoch's samples; returns the mean loss (over all processes) and the sample count."""
        self.network.train()
        self.train_set.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        loader = self._loader(self.train_set, self.sampler)
        self._start_epoch()
        total, steps, samples = 0.0, 0, 0
        bar = tqdm(
            loader,
            desc=f"epoch {self.epoch + 1}/{self.settings.epochs}",
            unit="batch",
            leave=False,
            disable=not (self.settings.progress and self.context.is_main),
            dynamic_ncols=True,
        )
        for batch in bar:
            loss = self.train_step(batch)
            total, steps, samples = total + loss, steps + 1, samples + len(batch["case_id"])
            bar.set_postfix(loss=f"{loss:.4f}")
        return mean_over_processes(total / max(steps, 1), self.context), samples

    def train_step(self, batch: dict) -> float:
        """autocast forward -> loss -> scaled backward -> unscale -> clip -> step -> zero_grad."""
        image, target, annotated = self._inputs(batch)
        with autocast(self.device, self.precision):
            logits = self.network(image)
        loss = self.loss(logits, target, annotated)
        self._check_loss(loss, batch)
        self._optimize(loss, [(self.model, self.optimizer)])
        return float(loss.detach())

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image, multi-hot target (B, C, D, H, W) and annotated mask (B, C) of a batch, on the device."""
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        annotated = batch["annotated"].to(self.device, non_blocking=True)
        return image, label.unsqueeze(1) == self.label_ids, annotated

    def _check_loss(self, loss: torch.Tensor, batch: dict) -> None:
        if not torch.isfinite(loss):
            cases = ", ".join(batch["case_id"])
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at epoch {self.epoch + 1} (cases {cases}, precision "
                f"{self.precision}); lower train.lr, set train.grad_clip, or use train.precision=fp32"
            )

    def _optimize(self, loss: torch.Tensor, pairs: list[tuple[nn.Module, torch.optim.Optimizer]]) -> None:
        """Scaled backward of `loss`, then for each (model, optimizer): unscale, clip, step, zero_grad."""
        self.scaler.scale(loss).backward()
        max_norm = self.settings.grad_clip if self.settings.grad_clip is not None else float("inf")
        for model, optimizer in pairs:
            self.scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if not torch.isfinite(grad_norm) and self.precision != "fp16":  # fp16: the scaler skips such steps
                raise FloatingPointError(
                    f"non-finite gradients at epoch {self.epoch + 1} (precision {self.precision}); "
                    "lower train.lr or use train.precision=fp32"
                )
            self.scaler.step(optimizer)
        self.scaler.update()
        for _, optimizer in pairs:
            optimizer.zero_grad(set_to_none=True)

    def _loader(self, dataset, sampler, batch_size: int | None = None) -> DataLoader:
        batch_size = batch_size or self.settings.batch_size
        return data_loader(dataset, batch_size, self.settings.workers, sampler, pin_memory=self.device.type == "cuda")

    def _build_extra(self) -> None:
        """Extension point: build what a subclass adds (before a resume restores it)."""

    def _start_epoch(self) -> None:
        """Extension point: called at the start of each training epoch."""

    def _end_epoch(self) -> None:
        """Extension point: called after each epoch's checkpoint and log line are written (self.epoch is the
        number of epochs done)."""

    def _restore_extra(self, state: dict) -> None:
        """Extension point: restore what a subclass added to the checkpoint state."""

    @torch.no_grad()
    def validate(self) -> dict:
        """Dice per organ at threshold 0.5 on the fixed validation data (rank 0; the others wait)."""
        if not self.context.is_main:
            return {}
        return self._validate_model(self.model)

    def _validate_model(self, model: nn.Module) -> dict:
        model = model.eval()
        per_label_sum = torch.zeros(self.config.num_classes, dtype=torch.float64)
        per_label_count = torch.zeros(self.config.num_classes, dtype=torch.float64)
        for item in data_loader(self.val_set, 1, min(self.settings.workers, 2)):
            image = item["image"].to(self.device)
            target = item["label"].to(self.device).unsqueeze(1) == self.label_ids
            with autocast(self.device, self.precision):
                if self.config.uses_patches(self.settings.stage):  # fixed spacing: tile the volume as inference does
                    logits = sliding_window(model, image, self.config.model.input_size, 0.25, float(image.min()))
                else:
                    logits = model(image)
            dice = hard_dice(logits.float() > 0, target)[0].cpu().double()  # sigmoid > 0.5 <=> logit > 0
            annotated = item["annotated"][0].double()
            per_label_sum += dice * annotated
            per_label_count += annotated
        means = (per_label_sum / per_label_count.clamp_min(1)).tolist()
        names = self.config.class_names
        organs = {name: means[i] for i, name in enumerate(names) if per_label_count[i] > 0}
        return {"val_dice_mean": sum(organs.values()) / max(len(organs), 1), "val_dice": organs}

    # ---------------------------------------------------------------------------------------------------------
    def _out_of_time(self) -> bool:
        """Whether train.time_budget_minutes is used up (the same answer in every process)."""
        budget = self.settings.time_budget_minutes
        if budget is None:
            return False
        return any_process(self.elapsed_seconds >= 60.0 * budget, self.context)

    def _save(self, record: dict, last: bool) -> None:
        improved = record.get("val_dice_mean") is not None and record["val_dice_mean"] > self.best_dice
        if improved:
            self.best_dice = record["val_dice_mean"]
        record["best_val_dice_mean"] = self.best_dice if self.best_dice >= 0 else None
        self.runlog.add(record, plot=last or record.get("val_dice_mean") is not None)
        state = self._state()
        save_checkpoint(self.out_dir / LATEST, state)
        if improved:
            save_checkpoint(self.out_dir / BEST, state)
        if self.settings.keep_every is not None and self.epoch % self.settings.keep_every == 0:
            save_checkpoint(self.out_dir / f"checkpoint_epoch_{self.epoch:04d}.pt", state)
        dice = f", val Dice {record['val_dice_mean']:.4f}" if record.get("val_dice_mean") is not None else ""
        self._info(
            f"epoch {record['epoch'] + 1}/{self.settings.epochs}: loss {record['train_loss']:.4f}{dice}, "
            f"{record['samples_per_second']:.2f} samples/s"
        )

    def _state(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss": self.loss.state_dict(),  # running per-label Dice of dynamic loss weights (else empty)
            "epoch": self.epoch,
            "best_val_dice_mean": self.best_dice,
            "elapsed_seconds": self.elapsed_seconds,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": self.runlog.history,
            "config": to_plain(self.config),
            "split": self.split,
        }

    def _resume(self, path: Path) -> list[dict]:
        state = read_training_state(path, self.config, self.model)  # one line naming what differs, not a traceback
        check_same_split(state, self.split, path)
        unwrap(self.model).load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"], resume_what(path))
        load_scaler_state(self.scaler, state["scaler"])
        if "loss" in state:  # older checkpoints have no loss state
            self.loss.load_state_dict(state["loss"])
        self.epoch, self.best_dice = state["epoch"], state["best_val_dice_mean"]
        self.elapsed_seconds = state["elapsed_seconds"]
        self._restore_extra(state)
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self._info(f"resumed from {path} at epoch {self.epoch + 1}")
        return state["history"]

    def _info(self, message: str) -> None:
        if self.context.is_main:
            log.info(message)


def _check_input_size(config: Config, data_dir: Path) -> None:
    """A fixed-size stage trains on its whole prepared arrays, so the network input must be their size: arrays of
    another size would be resized on every step, training at a resolution and memory nobody chose (a 160^3 network
    on a 32^3 index took 9.5 GB). Fixed-spacing stages take model.input_size patches of any size."""
    stage = config.train.stage
    try:
        size = config.grid(stage).size
    except ConfigError:
        raise ConfigError(
            f"'train.stage' is {stage!r}, but {data_dir} holds the stage grids {', '.join(config.prepare.grids)} "
            "(prepare.grids): train one of those, or prepare that grid"
        ) from None
    if size is not None and tuple(config.model.input_size) != tuple(size):
        wanted, prepared = _listed(config.model.input_size), _listed(size)
        raise ConfigError(
            f"'model.input_size' is {wanted}, but {data_dir} holds the {stage} stage at the fixed size {prepared} "
            f"(prepare.grids.{stage}.size): set model.input_size={prepared}, or prepare the data at {wanted}"
        )


def _listed(values) -> str:
    """[32,32,32]: the form --set takes."""
    return "[" + ",".join(str(v) for v in values) + "]"


def run_folder(config: Config) -> Path:
    """The run folder (train.out), or a ConfigError when it is not set."""
    return _required(config.train.out, "train.out")


def _required(path: Path | None, key: str) -> Path:
    if path is None:
        raise ConfigError(f"'{key}' is not set: give it in the config or with --set")
    return Path(path)

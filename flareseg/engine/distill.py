"""Knowledge distillation: a trained, frozen teacher's soft outputs train this (usually smaller) student.

Each step, on the same batch:
    loss = (1 - alpha) * SegLoss(student, labels, annotated) + alpha * T^2 * BCE(student / T, sigmoid(teacher / T))
The distillation term is averaged over every voxel and label, annotated or not: the teacher's soft targets cover
the labels a partially labeled case lacks. The teacher (any architecture with the student's classes) comes from
`distill.teacher`, runs without gradient in the trainer's precision, and is not part of the student's checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flareseg.config import Config, ConfigError
from flareseg.engine.trainer import Trainer
from flareseg.models.runtime import autocast, prepare_for_inference
from flareseg.stage import TrainedStage

log = logging.getLogger(__name__)


def distillation_term(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 x the mean BCE-with-logits of student / T against sigmoid(teacher / T), over every voxel and label.

    [B, C, *spatial] logits of both networks -> float32 scalar; no gradient reaches the teacher. T^2 keeps the
    gradient's scale independent of T (Hinton et al. 2015).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {list(student_logits.shape)} and {list(teacher_logits.shape)}"
        )
    with torch.autocast(student_logits.device.type, enabled=False):
        soft_targets = torch.sigmoid(teacher_logits.detach().float() / temperature)
        bce = F.binary_cross_entropy_with_logits(student_logits.float() / temperature, soft_targets)
    return temperature**2 * bce


def load_teacher(path: Path, student: Config, device: torch.device) -> tuple[nn.Module, Config]:
    """The network of checkpoint `path`, frozen, in eval mode on `device`, and its config.

    Its number of classes must equal the student's (a ConfigError naming the file otherwise).
    """
    trained = TrainedStage.load(path, "'distill.teacher': checkpoint")
    config = trained.config
    if config.num_classes != student.num_classes:
        raise ConfigError(
            f"'distill.teacher': {path} predicts {config.num_classes} classes ({', '.join(config.class_names)}), "
            f"the student {student.num_classes} ({', '.join(student.class_names)}); the teacher needs the same classes"
        )
    teacher = trained.network()  # (leaves the student's random stream as it was)
    teacher.requires_grad_(False)
    return prepare_for_inference(teacher, device, trained.channels_last), config


class DistillationTrainer(Trainer):
    """The supervised trainer plus a distillation term towards a frozen teacher's soft outputs (`distill`)."""

    def _build_extra(self) -> None:
        settings = self.config.distill
        self.teacher, teacher_config = load_teacher(settings.teacher, self.config, self.device)
        if self.context.is_main:
            if teacher_config.class_names != self.config.class_names:
                log.warning(
                    "the teacher %s names its classes %s, the student %s: class k of one is taken as class k of the "
                    "other",
                    settings.teacher,
                    teacher_config.class_names,
                    self.config.class_names,
                )
            if list(teacher_config.data.hu_window) != list(self.config.data.hu_window):
                log.warning(
                    "the teacher %s was trained with data.hu_window %s and now sees inputs windowed to %s",
                    settings.teacher,
                    teacher_config.data.hu_window,
                    self.config.data.hu_window,
                )
        self._info(f"distilling from {settings.teacher} (alpha {settings.weight}, T {settings.temperature})")

    def train_step(self, batch: dict) -> float:
        """Teacher forward without gradient, then the supervised step on the mixed loss."""
        settings = self.config.distill
        image, target, annotated = self._inputs(batch)
        with torch.no_grad(), autocast(self.device, self.precision):
            teacher_logits = self.teacher(image)
        with autocast(self.device, self.precision):
            logits = self.network(image)
        supervised = self.loss(logits, target, annotated)
        distilled = distillation_term(logits, teacher_logits, settings.temperature)
        loss = (1 - settings.weight) * supervised + settings.weight * distilled
        self._check_loss(loss, batch)
        self._optimize(loss, [(self.model, self.optimizer)])
        return float(loss.detach())

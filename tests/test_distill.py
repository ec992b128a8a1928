"""Knowledge distillation: the term matches its formula, it pulls a student towards a frozen teacher (more than
the labels alone do), a teacher with other classes is a clear error, and `flareseg train` runs it end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flareseg.checkpoint import BEST, LATEST, load_checkpoint, save_checkpoint
from flareseg.cli import main
from flareseg.config import ConfigError, load_config, to_plain
from flareseg.data.phantom import write_phantom_dataset
from flareseg.engine.distill import DistillationTrainer, distillation_term
from flareseg.losses import hard_dice
from flareseg.models import build_model
from tests.tiny import CPU, LABELS, LIVER_KIDNEY_SPLEEN, prepare_tiny, train_tiny

# The student: a smaller network than the tiny coarse teacher ([4, 8, 8, 16]), as distillation is meant for.
STUDENT = ["model.name=base_unet", "model.channels=[4,8,8]", "model.input_size=[24,24,24]", "train.stage=coarse"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """Prepared data (3 phantoms, 3 folds) and a briefly trained coarse teacher: imperfect, unlike the labels."""
    root = tmp_path_factory.mktemp("distill")
    write_phantom_dataset(root / "raw", 3, seed=9, shape=(32, 48, 48))
    data = prepare_tiny(root / "raw", root / "data", *LIVER_KIDNEY_SPLEEN, "prepare.folds=3")
    return data, train_tiny(data, root / "teacher", "coarse", LABELS)


def _overrides(data: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        LABELS,
        *STUDENT,
        f"train.data={data}",
        f"train.out={out}",
        "train.workers=0",
        "train.progress=false",
        "train.batch_size=1",
        "train.epochs=1",
        "model.dropout=0",
        "train.method=distill",
        f"distill.teacher={teacher}",
        *extra,
    ]


def test_distillation_term_is_the_scaled_soft_target_bce():
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(2, 3, 4, 5, 6, generator=generator)).requires_grad_(True)
    teacher = (3 * torch.randn(2, 3, 4, 5, 6, generator=generator)).requires_grad_(True)
    p, q = torch.sigmoid(student.double() / 2), torch.sigmoid(teacher.double() / 2)
    naive = 4 * -(q * torch.log(p) + (1 - q) * torch.log(1 - p)).mean()
    value = distillation_term(student, teacher, temperature=2.0)
    assert value.item() == pytest.approx(naive.item(), rel=1e-5)
    value.backward()
    assert teacher.grad is None and torch.count_nonzero(student.grad) == student.numel()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = distillation_term(student.bfloat16(), teacher.bfloat16(), temperature=2.0)
    assert half.dtype == torch.float32
    assert F.binary_cross_entropy_with_logits(student, torch.sigmoid(student)).item() < value.item() / 4


def _agreement(trainer: DistillationTrainer, image: torch.Tensor) -> float:
    """Mean Dice over labels between the student's and the teacher's masks (sigmoid > 0.5)."""
    with torch.no_grad():
        student = trainer.model.eval()(image)
        teacher = trainer.teacher(image)
    trainer.model.train()
    return hard_dice(student > 0, teacher > 0).mean().item()


def test_distillation_pulls_the_student_towards_the_teacher(setup, tmp_path):
    data, teacher = setup
    agreement, start = {}, {}
    for alpha in (0.0, 1.0):  # labels only, teacher only; the same initial weights and batch
        overrides = _overrides(data, tmp_path, teacher, f"distill.weight={alpha}", "train.lr=0.03")
        trainer = DistillationTrainer(load_config(None, overrides), CPU)
        assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
        batch = next(iter(trainer._loader(trainer.train_set, trainer.sampler)))
        start[alpha] = _agreement(trainer, batch["image"])
        for _ in range(8):
            trainer.train_step(batch)
        agreement[alpha] = _agreement(trainer, batch["image"])
        frozen = load_checkpoint(teacher)["model"]
        assert all(torch.equal(frozen[name], value) for name, value in trainer.teacher.state_dict().items())
    assert start[0.0] == start[1.0]
    assert agreement[1.0] > start[1.0] + 0.1, (start, agreement)
    assert agreement[1.0] > agreement[0.0] + 0.1, (start, agreement)


def test_a_teacher_with_other_classes_is_a_clear_error(setup, tmp_path):
    data, _ = setup
    other = load_config(None, ["data.labels=[liver, kidney]", "model.name=base_unet", "model.channels=[4,8]"])
    path = save_checkpoint(
        tmp_path / "two_labels.pt", {"model": build_model(other).state_dict(), "config": to_plain(other)}
    )
    with pytest.raises(ConfigError, match=r"two_labels\.pt predicts 2 classes .* the student 3"):
        DistillationTrainer(load_config(None, _overrides(data, tmp_path / "run", path)), CPU)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        DistillationTrainer(load_config(None, _overrides(data, tmp_path / "run", tmp_path / "missing.pt")), CPU)


def test_flareseg_train_distils_end_to_end_and_resumes(setup, tmp_path):
    data, teacher = setup
    overrides = _overrides(data, tmp_path, teacher, "train.fold=0", "train.iterations_per_epoch=1")
    overrides += ["train.loss.dynamic_weights=true"]  # both new features at once: the running Dice is checkpointed
    args = ["train", "--device", "cpu", *[item for key in overrides for item in ("--set", key)]]
    assert main(args) == 0
    state = load_checkpoint(tmp_path / LATEST)
    assert (tmp_path / BEST).is_file() and state["epoch"] == 1 and state["history"][0]["val_dice_mean"] is not None
    assert state["loss"]["dice_updates"].tolist() == [1, 1, 1]
    assert load_config(tmp_path / "config.yaml").distill.teacher == teacher
    assert main([*args, "--set", "train.epochs=2"]) == 0  # resumes from checkpoint_latest.pt, running Dice included
    state = load_checkpoint(tmp_path / LATEST)
    assert state["epoch"] == 2 and state["loss"]["dice_updates"].tolist() == [2, 2, 2]


def test_each_training_method_has_its_trainer_and_one_switch():
    from typing import get_args, get_type_hints

    from flareseg.config.schema import TrainConfig
    from flareseg.engine.run import trainer_class

    methods = get_args(get_type_hints(TrainConfig)["method"])
    assert {method: trainer_class(method).__name__ for method in methods} == {
        "supervised": "Trainer",
        "cps": "CrossPseudoSupervisionTrainer",
        "distill": "DistillationTrainer",
    }
    with pytest.raises(ConfigError, match="'train.method' is distill but 'distill.teacher' names no checkpoint"):
        load_config(None, ["train.method=distill"])
    with pytest.raises(ConfigError, match=r"'semi_supervised.enabled'; it is now train.method \(cps\)"):
        load_config(None, ["semi_supervised.enabled=true"])

"""Cross pseudo supervision: both networks train and are checkpointed, pseudo-labels are the other net's sigmoid
> 0.5, resume restores both networks, and either network predicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flareseg.checkpoint import LATEST, load_checkpoint
from flareseg.cli import main
from flareseg.config import load_config
from flareseg.data.phantom import make_phantom, write_phantom_dataset
from flareseg.engine.cps import BEST_B, LATEST_B, CrossPseudoSupervisionTrainer
from flareseg.io import write_image
from tests.tiny import CPU, LABELS, LIVER_KIDNEY_SPLEEN, prepare_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cps")
    write_phantom_dataset(root / "raw", 3, seed=9, shape=(32, 48, 48), unlabeled=3)
    prepare_tiny(root / "raw", root / "data", *LIVER_KIDNEY_SPLEEN, "prepare.folds=3")
    return root / "data"


def _config(data: Path, out: Path, *extra: str):
    return load_config(
        None,
        [
            LABELS,
            f"train.data={data}",
            f"train.out={out}",
            "train.workers=0",
            "train.progress=false",
            "train.batch_size=1",
            "train.epochs=2",
            "model.dropout=0",
            "model.channels=[4,8,8,16,16]",
            "model.input_size=[32,32,32]",
            "train.method=cps",
            "semi_supervised.unlabeled_batch_size=1",
            *extra,
        ],
    )


def test_both_networks_train_and_are_checkpointed(data, tmp_path):
    trainer = CrossPseudoSupervisionTrainer(_config(data, tmp_path), CPU)
    start_a = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    start_b = {k: v.clone() for k, v in trainer.model_b.state_dict().items()}
    assert not torch.equal(start_a["head.weight"], start_b["head.weight"])  # independent initialisations
    history = trainer.fit()
    assert [r["epoch"] for r in history] == [0, 1] and "val_dice_mean_b" in history[-1]
    state = load_checkpoint(tmp_path / LATEST)
    assert not torch.equal(state["model"]["head.weight"], start_a["head.weight"])
    assert not torch.equal(state["model_b"]["head.weight"], start_b["head.weight"])
    net_b = load_checkpoint(tmp_path / LATEST_B)
    assert torch.equal(net_b["model"]["head.weight"], state["model_b"]["head.weight"])
    assert (tmp_path / BEST_B).is_file()


def test_pseudo_labels_come_from_the_other_network(data, tmp_path, monkeypatch):
    trainer = CrossPseudoSupervisionTrainer(_config(data, tmp_path, "train.epochs=1"), CPU)
    supervised, pseudo = [], []
    for loss, seen in ((trainer.loss, supervised), (trainer.pseudo_loss, pseudo)):

        def record(logits, target, annotated=None, seen=seen, original=loss.forward):
            seen.append((logits.detach().clone(), target.clone(), None if annotated is None else annotated.clone()))
            return original(logits, target, annotated)

        monkeypatch.setattr(loss, "forward", record)
    trainer._start_epoch()
    batch = next(iter(trainer._loader(trainer.train_set, trainer.sampler)))
    trainer.train_step(batch)
    # The pseudo-label term (its own loss instance): A against B > 0, then B against A > 0.
    (logits_a, pseudo_b, all_a), (logits_b, pseudo_a, all_b) = pseudo
    assert torch.equal(pseudo_a, logits_a > 0) and torch.equal(pseudo_b, logits_b > 0)
    assert all_a.all() and all_b.all() and logits_a.shape[0] == 2  # one labeled + one unlabeled sample
    assert len(supervised) == 2 and all(logits.shape[0] == 1 for logits, _, _ in supervised)  # labeled only


def test_ramp_up(data, tmp_path):
    trainer = CrossPseudoSupervisionTrainer(
        _config(data, tmp_path, "semi_supervised.rampup_epochs=10", "semi_supervised.weight=2.0"), CPU
    )
    weights = []
    for epoch in (0, 5, 10, 20):
        trainer.epoch = epoch
        weights.append(trainer.cps_weight())
    assert weights[0] < 0.02 and weights[0] < weights[1] < weights[2] == 2.0 == weights[3]


def test_default_lambda_is_the_benchmarked_one_rising_over_half_the_epochs(data, tmp_path):
    """The defaults are what bench/compare_semi.py measured (lambda 0.3 over half the epochs), not the reference's
    lambda 1 from the first step, which made both networks collapse there."""
    config = _config(data, tmp_path, "train.epochs=40")
    assert config.semi_supervised.weight == 0.3 and config.semi_supervised.rampup_epochs is None
    trainer = CrossPseudoSupervisionTrainer(config, CPU)
    weights = {}
    for epoch in (0, 10, 19, 20, 39):
        trainer.epoch = epoch
        weights[epoch] = trainer.cps_weight()
    assert weights[0] < 0.01 and weights[0] < weights[10] < weights[19] < weights[20]
    assert weights[20] == weights[39] == 0.3
    constant = _config(data, tmp_path, "semi_supervised.rampup_epochs=0", "semi_supervised.weight=1.0")
    trainer = CrossPseudoSupervisionTrainer(constant, CPU)
    assert trainer.cps_weight() == 1.0  # the reference's settings, as configs can still ask


def test_resume_restores_both_networks(data, tmp_path):
    CrossPseudoSupervisionTrainer(_config(data, tmp_path / "a", "train.epochs=2"), CPU).fit()

    class StoppedAfterOneEpoch(CrossPseudoSupervisionTrainer):
        def _end_epoch(self):
            if self.epoch == 1:
                raise KeyboardInterrupt

    first = StoppedAfterOneEpoch(_config(data, tmp_path / "b", "train.epochs=2"), CPU)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    CrossPseudoSupervisionTrainer(_config(data, tmp_path / "b", "train.epochs=2"), CPU).fit()
    a, b = load_checkpoint(tmp_path / "a" / LATEST), load_checkpoint(tmp_path / "b" / LATEST)
    for key in ("model", "model_b"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])


def test_selected_unlabeled_cases_and_inference_with_net_b(data, tmp_path):
    selection = tmp_path / "selected.json"
    selection.write_text(json.dumps({"selected": ["phantom_004"]}))
    trainer = CrossPseudoSupervisionTrainer(
        _config(data, tmp_path / "run", "train.epochs=1", f"semi_supervised.unlabeled_cases={selection}"), CPU
    )
    assert set(trainer.unlabeled_set.plan) == {"phantom_004"}
    trainer.fit()
    phantom = make_phantom(1, shape=(24, 32, 32))
    write_image(tmp_path / "in" / "case_0000.nii.gz", phantom.image, phantom.geometry)
    args = [
        "predict",
        "-i",
        str(tmp_path / "in"),
        "-o",
        str(tmp_path / "out"),
        "-q",
        "--stages",  # net B alone segments the whole volume (a fine stage is no ROI stage)
        str(tmp_path / "run" / LATEST_B),
        "--set",  # PyTorch spares an OpenVINO export (~6 s); the default backend is tested in test_backends.py
        "predict.backend=torch",
    ]
    assert main(args) == 0 and (tmp_path / "out" / "case.nii.gz").is_file()

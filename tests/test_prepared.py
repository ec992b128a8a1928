"""The prepared-folder contract (flareseg.data.prepared): typed settings, labeled ids, folds, and a trainer that
takes the prepared grids without touching its caller's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from flareseg.checkpoint import LATEST, load_checkpoint
from flareseg.config import ConfigError, load_config
from flareseg.config.schema import GridConfig
from flareseg.data.index import INDEX_DIR, META_SPLITS, CaseIndex
from flareseg.data.phantom import write_phantom_dataset
from flareseg.data.prepared import PreparedArrays, PreparedData
from flareseg.engine.trainer import Trainer
from tests.tiny import CPU, LIVER_KIDNEY_SPLEEN, STAGE_MODELS, prepare_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    write_phantom_dataset(root / "raw", 4, seed=5, shape=(24, 40, 40), unlabeled=2)
    return prepare_tiny(
        root / "raw", root / "data", *LIVER_KIDNEY_SPLEEN, "prepare.folds=2", "prepare.grids.fine.margin_mm=12"
    )


def test_settings_are_typed_from_what_prepare_stored(data):
    settings = PreparedData(data).settings
    assert settings.labels == ("liver", "kidney", "spleen")
    assert settings.grids == {
        "coarse": GridConfig(region="volume", size=(24, 24, 24), spacing=None, margin_mm=20.0),
        "fine": GridConfig(region="labels", size=(32, 32, 32), spacing=None, margin_mm=12.0),
    }
    assert settings.label_resampling == "per_label"


def test_labeled_and_unlabeled_ids_and_folds(data):
    prepared = PreparedData(data)
    index = CaseIndex(data / INDEX_DIR)
    labeled = [c for c in index.case_ids() if index.get(c)["labeled"]]
    assert prepared.labeled_ids() == labeled and len(labeled) == 4
    assert prepared.unlabeled_ids() == [c for c in index.case_ids() if c not in labeled] and prepared.unlabeled_ids()
    stored = index.meta(META_SPLITS)["splits"]
    assert prepared.folds() == 2
    assert [prepared.fold(k) for k in range(2)] == [(s["train"], s["val"]) for s in stored]
    assert prepared.fold(-1) == (labeled, [])
    with pytest.raises(ConfigError, match="'train.fold' is 2, but the index .* holds 2 folds"):
        prepared.fold(2)


def test_raw_arrays_of_a_stage(data):
    prepared = PreparedData(data)
    item = PreparedArrays(prepared, "coarse", prepared.labeled_ids()[:1])[0]
    assert tuple(item["image"].shape) == (1, 24, 24, 24) and tuple(item["label"].shape) == (24, 24, 24)
    with pytest.raises(ValueError, match="holds the stage grids coarse, fine, not 'middle'"):
        PreparedArrays(prepared, "middle")


def test_adopting_the_grids_copies_the_config_and_checks_the_labels(data):
    settings = PreparedData(data).settings
    config = load_config(None, [*LIVER_KIDNEY_SPLEEN, "prepare.grids.fine.size=[64,64,64]"])
    adopted = settings.adopted_by(config, data)
    fine = adopted.prepare.grids["fine"]
    assert tuple(fine.size) == (32, 32, 32) and fine.margin_mm == 12.0
    assert tuple(config.prepare.grids["fine"].size) == (64, 64, 64)  # the caller's config is untouched
    extra = load_config(None, ["data.labels=[liver, kidney, spleen, pancreas]"])
    assert settings.adopted_by(extra, data).data.labels == extra.data.labels  # extra labels at the end are fine
    renamed = load_config(None, ["data.labels=[liver, spleen, kidney]"])
    with pytest.raises(ConfigError, match="was prepared with data.labels"):
        settings.adopted_by(renamed, data)


def test_the_trainer_trains_and_checkpoints_the_prepared_grid_not_its_callers(data, tmp_path):
    config = load_config(
        None,
        [
            *LIVER_KIDNEY_SPLEEN,
            *STAGE_MODELS["fine"],
            "prepare.grids.fine.size=[48,48,48]",  # what the caller's config says; the folder holds 32^3
            f"train.data={data}",
            f"train.out={tmp_path}",
            "train.epochs=1",
            "train.iterations_per_epoch=1",
            "train.workers=0",
            "train.progress=false",
        ],
    )
    Trainer(config, CPU).fit()
    assert tuple(config.prepare.grids["fine"].size) == (48, 48, 48)
    stored = load_checkpoint(tmp_path / LATEST)["config"]["prepare"]["grids"]["fine"]
    assert stored["size"] == [32, 32, 32] and stored["margin_mm"] == 12.0

"""A prepared folder: the hand-off from `prepare` to training. This module owns what a reader may know of it.

    OUT/
      index.lmdb/   case records and metadata (flareseg.data.index: its keys and format)
      arrays/       the .npy arrays of every case and stage grid (paths in the records, relative to OUT)
      config.yaml   the config prepare ran with
      failures.csv  the cases that failed, and why

`prepare` writes the folder (through flareseg.data.index.IndexWriter, holding the folder's lock); everything that
reads it (the trainers, CPS, the demo, the benches, your own scripts) goes through PreparedData: its typed settings
(the labels and each stage's grid), which cases are labeled, the folds and the records. PreparedData pickles into
DataLoader workers (each process opens its own read-only index handle).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from flareseg.config import Config, ConfigError
from flareseg.config.loader import build_config
from flareseg.config.schema import GridConfig
from flareseg.data.index import INDEX_DIR, META_SETTINGS, META_SPLITS, CaseIndex


@dataclass(frozen=True)
class PreparedSettings:
    """The settings every array of a prepared folder was made with (a folder never mixes settings)."""

    labels: tuple[str, ...]  # data.labels: label id k + 1 is labels[k]
    grids: dict[str, GridConfig]  # prepare.grids: per stage name
    label_resampling: str  # prepare.label_resampling

    @classmethod
    def from_meta(cls, settings: dict) -> PreparedSettings:
        """From the index's META_SETTINGS record (as prepare stores it: dotted keys, JSON values)."""
        grids = {
            name: build_config(GridConfig, stored, Path("."), f"prepare.grids.{name}.")
            for name, stored in settings["prepare.grids"].items()
        }
        return cls(tuple(settings["data.labels"]), grids, settings["prepare.label_resampling"])

    def adopted_by(self, config: Config, where: Path) -> Config:
        """A copy of `config` whose stage grids and label resampling are these (the caller's config is unchanged).
        The grids replace the config's own: a trainer learns the stage train.stage names on the grid it was
        prepared with, whatever the config says.

        A trainer trains with it and its checkpoints store it, so inference resamples exactly as the training data
        was. Labels that the prepared data numbers differently would silently be renamed, so that is an error
        (extra labels at the end are fine: no prepared case annotates them)."""
        own = list(config.data.labels)
        if any(a != b for a, b in zip(self.labels, own)):
            raise ConfigError(
                f"{where} was prepared with data.labels {list(self.labels)}, but this config has {own}: the same id "
                "would name different labels; use the prepared labels (extra labels at the end are allowed) or "
                "prepare again"
            )
        adopted = copy.deepcopy(config)
        adopted.prepare.grids = copy.deepcopy(self.grids)
        adopted.prepare.label_resampling = self.label_resampling
        return adopted


class _Records(Protocol):
    def case_ids(self) -> list[str]: ...
    def get(self, case_id: str) -> dict | None: ...


def labeled_case_ids(index: _Records) -> list[str]:
    """The ids of the cases with a label map, sorted (the one definition: prepare's folds and the readers use it)."""
    return [case_id for case_id in index.case_ids() if index.get(case_id)["labeled"]]


class PreparedData:
    """Read-only view of a prepared folder: settings, cases, folds, records and array paths."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.index = CaseIndex(self.folder / INDEX_DIR)  # FileNotFoundError naming the folder when not prepared

    @property
    def settings(self) -> PreparedSettings | None:
        """The typed settings, or None for an index written without them (by hand, in tests)."""
        stored = self.index.meta(META_SETTINGS)
        return None if stored is None else PreparedSettings.from_meta(stored)

    def case_ids(self) -> list[str]:
        return self.index.case_ids()

    def labeled_ids(self) -> list[str]:
        return labeled_case_ids(self.index)

    def unlabeled_ids(self) -> list[str]:
        labeled = set(self.labeled_ids())
        return [case_id for case_id in self.case_ids() if case_id not in labeled]

    def record(self, case_id: str) -> dict:
        """A case's record; KeyError naming the index when absent."""
        return self.index.get(case_id)

    def __contains__(self, case_id: str) -> bool:
        return case_id in self.index

    def missing(self, case_ids: list[str]) -> list[str]:
        """Those of `case_ids` the folder does not hold."""
        return [case_id for case_id in case_ids if case_id not in self.index]

    def array_path(self, record: dict, name: str) -> Path:
        """Absolute path of one of a record's arrays ("coarse_image", "fine_label", ...)."""
        return self.folder / record["arrays"][name]

    def load_array(self, record: dict, name: str) -> np.ndarray:
        """One of a record's arrays, memory-mapped (read-only)."""
        return np.load(self.array_path(record, name), mmap_mode="r")

    def folds(self) -> int:
        """How many folds the split has (0 when the folder holds no labeled case)."""
        splits = self.index.meta(META_SPLITS)
        return 0 if splits is None else len(splits["splits"])

    def fold(self, fold: int) -> tuple[list[str], list[str]]:
        """(training ids, validation ids) of `fold`; a negative fold trains on every labeled case."""
        if fold < 0:
            return self.labeled_ids(), []
        if fold >= self.folds():
            raise ConfigError(f"'train.fold' is {fold}, but the index {self.index.path} holds {self.folds()} folds")
        split = self.index.meta(META_SPLITS)["splits"][fold]
        return split["train"], split["val"]


class PreparedArrays(Dataset):
    """The raw stored arrays of one stage (no normalisation, no augmentation: the training sets add those).

    Item i: {"case_id", "image": int16 [1, z, y, x], "annotated": bool [num_labels], "label": uint8 [z, y, x]};
    "annotated"[k] tells whether label id k + 1 is annotated in this case (all False for unlabeled cases, which have
    no "label").
    """

    def __init__(self, data: PreparedData, stage: str, case_ids: list[str] | None = None):
        settings = data.settings
        if settings is not None and stage not in settings.grids:
            raise ValueError(f"{data.folder} holds the stage grids {', '.join(settings.grids)}, not {stage!r}")
        self.data, self.stage = data, stage
        self.num_labels = 0 if settings is None else len(settings.labels)
        self.case_ids = list(case_ids) if case_ids is not None else data.case_ids()
        missing = data.missing(self.case_ids)
        if missing:
            raise KeyError(f"cases not in the index {data.index.path}: {', '.join(missing[:10])}")

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, i: int) -> dict:
        record = self.data.record(self.case_ids[i])
        item = {
            "case_id": record["case_id"],
            "image": torch.from_numpy(self._load(record, "image"))[None],
            "annotated": torch.zeros(self.num_labels, dtype=torch.bool),
        }
        item["annotated"][[label_id - 1 for label_id in record["annotated"]]] = True
        if record["labeled"]:
            item["label"] = torch.from_numpy(self._load(record, "label"))
        return item

    def _load(self, record: dict, kind: str) -> np.ndarray:
        # A copy out of the memory map: the tensor owns its memory and the file can be closed.
        return np.array(self.data.load_array(record, f"{self.stage}_{kind}"))

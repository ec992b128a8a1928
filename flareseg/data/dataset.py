"""A torch Dataset over prepared arrays, read through the LMDB index.

It returns raw stored arrays (HU as int16, label ids as uint8) of one stage; the training datasets compose
normalisation and augmentation on top. Arrays are memory-mapped, never re-read from the raw images.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from flareseg.data.index import META_SETTINGS, CaseIndex

Stage = Literal["coarse", "fine"]


class PreparedArrays(Dataset):
    """Item i: {"case_id", "image": int16 [1, z, y, x], "annotated": bool [num_labels], "label": uint8 [z, y, x]}.

    "annotated"[k] tells whether label id k + 1 is annotated in this case (all False for unlabeled cases,
    which have no "label").
    """

    def __init__(self, index_path: str | os.PathLike, stage: Stage, case_ids: list[str] | None = None):
        if stage not in ("coarse", "fine"):
            raise ValueError(f"stage must be 'coarse' or 'fine', got {stage!r}")
        self.index = CaseIndex(index_path)
        self.stage = stage
        self.num_labels = len(self.index.meta(META_SETTINGS)["data.labels"])
        self.case_ids = list(case_ids) if case_ids is not None else self.index.case_ids()
        missing = [case_id for case_id in self.case_ids if case_id not in self.index]
        if missing:
            raise KeyError(f"cases not in the index {self.index.path}: {', '.join(missing[:10])}")

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, i: int) -> dict:
        record = self.index.get(self.case_ids[i])
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
        return np.array(np.load(self.index.array_path(record, f"{self.stage}_{kind}"), mmap_mode="r"))

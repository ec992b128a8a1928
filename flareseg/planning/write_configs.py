"""Write a plan as a config folder like configs/flare21/: data_prepare.yaml, coarse.yaml, fine.yaml, predict.yaml.

Each planned value has a comment line above it saying the rule and the fingerprint figure it came from; the files
are ordinary configs that `sh data_prepare/run.sh`, `sh coarse_seg/run.sh`, `sh fine_seg/run.sh` and
`sh predict.sh` take as they are. Paths are written relative to the config folder (a YAML file's relative paths
are relative to that file), so the folder can be moved together with the data and work folders.
"""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

from flareseg.atomic import atomic_write_text
from flareseg.planning.decide import Plan, StageNetwork

FILES = ("data_prepare.yaml", "coarse.yaml", "fine.yaml", "predict.yaml")
COMMENT_WIDTH = 116


@dataclass(frozen=True)
class Sources:
    """Where the cases come from and where the pipeline writes: absolute paths, written relative to the configs."""

    images: Path | None  # image folder (with labels), or None with a dataset layout
    labels: Path | None
    unlabeled: Path | None
    dataset: Path | None  # a dataset root read by flareseg.data.layouts (nnU-Net v2, MSD)
    work: Path  # prepared/, coarse/, fine/ go here
    workers: int
    label_map: dict[int, int] | None  # dataset ids -> 1..N where the dataset's ids are not already 1..N


class _Entry:
    """A value with the comment line(s) above it."""

    def __init__(self, value: object, why: str | None = None):
        self.value, self.why = value, why


def write_configs(plan: Plan, networks: dict[str, StageNetwork], sources: Sources, out: Path, title: str) -> list[Path]:
    """The four config files of `plan` in `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rel = _relative_to(out)
    prepared = sources.work / "prepared"
    data = {"labels": _Entry(list(plan.label_names.values())), "hu_window": _entry(plan, "data.hu_window")}
    grids = {
        "coarse": {"region": _Entry("volume", "the whole volume: the coarse stage finds where the organs are")},
        "fine": {"region": _Entry("labels", "the box of all labels + margin: what the fine network segments")},
    }
    for stage in ("coarse", "fine"):
        for key in ("size", "spacing", "margin_mm"):
            decided = _maybe(plan, f"prepare.grids.{stage}.{key}")
            if decided is not None:
                grids[stage][key] = decided
    prepare = {
        **_sources(sources, rel),
        "out": _Entry(rel(prepared)),
        "workers": _Entry(sources.workers),
        "grids": grids,
    }
    if sources.label_map:
        prepare["label_map"] = _Entry(sources.label_map, "the dataset's label ids renumbered to 1..N (data.labels)")
    files = {
        "data_prepare.yaml": {"data": data, "prepare": prepare},
        "predict.yaml": _predict(plan, sources, rel),
    }
    for stage in ("coarse", "fine"):
        files[f"{stage}.yaml"] = _stage(plan, stage, networks[stage], prepared, sources.work, rel, data)
    usage = {
        "data_prepare.yaml": "sh data_prepare/run.sh {path}",
        "coarse.yaml": "sh coarse_seg/run.sh {path}",
        "fine.yaml": "sh fine_seg/run.sh {path}",
        "predict.yaml": "sh predict.sh INPUT_DIR OUTPUT_DIR {path}",
    }
    written = []
    for name in FILES:
        header = [f"# {title}", f"# {usage[name].format(path=out / name)}", ""]
        text = "\n".join(header + _lines(files[name], 0)) + "\n"
        written.append(atomic_write_text(out / name, text))
    return written


def _stage(plan: Plan, stage: str, network: StageNetwork, prepared: Path, work: Path, rel, data: dict) -> dict:
    model = {key: _Entry(value) for key, value in network.overrides.items()}
    patch = _maybe(plan, f"{stage}.model.input_size")
    if patch is None:  # a fixed-size grid runs in one pass: the network's input is the grid
        patch = _Entry(plan.value(f"prepare.grids.{stage}.size"), f"the {stage} grid's size (one pass per volume)")
    model["input_size"] = patch
    train = {
        "stage": _Entry(stage),
        "data": _Entry(rel(prepared)),
        "out": _Entry(rel(work / stage)),
        "batch_size": _entry(plan, f"{stage}.train.batch_size"),
    }
    return {"data": data, "model": model, "train": train}


def _predict(plan: Plan, sources: Sources, rel) -> dict:
    predict = {
        "coarse": _Entry(rel(sources.work / "coarse" / "checkpoint_best.pt")),
        "fine": _Entry(rel(sources.work / "fine" / "checkpoint_best.pt")),
        "margin_mm": _entry(plan, "predict.margin_mm"),
        "coarse_min_volume_mm3": _entry(plan, "predict.coarse_min_volume_mm3"),
        "keep_components_per_label": _entry(plan, "predict.keep_components_per_label"),
        "postprocess": {
            "fine": {"min_volume_mm3_per_label": _entry(plan, "predict.postprocess.fine.min_volume_mm3_per_label")}
        },
    }
    return {"predict": predict}


def _sources(sources: Sources, rel) -> dict:
    entries = {}
    if sources.dataset is not None:
        entries["dataset"] = _Entry(rel(sources.dataset))
    if sources.images is not None:
        entries["images"] = _Entry(rel(sources.images))
    if sources.labels is not None:
        entries["labels"] = _Entry(rel(sources.labels))
    if sources.unlabeled is not None:
        entries["unlabeled"] = _Entry(rel(sources.unlabeled))
    return entries


def _entry(plan: Plan, key: str) -> _Entry:
    decision = next(d for d in plan.decisions if d.key == key)
    return _Entry(decision.value, decision.why)


def _maybe(plan: Plan, key: str) -> _Entry | None:
    return _entry(plan, key) if any(d.key == key for d in plan.decisions) else None


def _relative_to(folder: Path):
    def rel(path: Path) -> str:
        return os.path.relpath(Path(path).resolve(), folder.resolve())

    return rel


def _lines(tree: dict, depth: int) -> list[str]:
    pad = "  " * depth
    lines = []
    for key, item in tree.items():
        if isinstance(item, dict):
            lines.append(f"{pad}{key}:")
            lines += _lines(item, depth + 1)
            continue
        if item.why:
            for line in textwrap.wrap(item.why, COMMENT_WIDTH - len(pad) - 2):
                lines.append(f"{pad}# {line}")
        lines.append(f"{pad}{key}: {_flow(item.value)}")
    return lines


def _flow(value: object) -> str:
    """A YAML flow value: JSON for lists, numbers, strings and null; mappings keep their integer keys."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_flow(item)}" for key, item in value.items()) + "}"
    if isinstance(value, float) and value.is_integer():
        return json.dumps(int(value)) if abs(value) < 1e15 else json.dumps(value)
    return json.dumps(value)

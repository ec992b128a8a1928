"""`flareseg plan`: configure the coarse-to-fine pipeline from a dataset's own fingerprint.

cases (a folder pair or a dataset layout) -> fingerprint (worker processes, fingerprint.json)
-> decisions (flareseg.planning.decide, each with its reason) -> a config folder (write_configs)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flareseg.config import load_config
from flareseg.data.cases import discover_cases
from flareseg.planning.decide import Plan, StageNetwork, make_plan
from flareseg.planning.fingerprint import Fingerprint, fingerprint_dataset
from flareseg.planning.network_memory import network_memory
from flareseg.planning.write_configs import Sources, write_configs

FINGERPRINT_FILE = "fingerprint.json"
DEFAULT_GPU_MEMORY_GB = 24.0  # a common research GPU; FLARE21's reference sizes train at batch 2 in about 18 GB
# The FLARE21 EfficientSegmentation pair (configs/flare21/): the plan decides their grids, not their layers.
REFERENCE_NETWORKS = {
    "coarse": {"name": "base_unet", "channels": [8, 16, 32, 64, 128], "channels_last": True},
    "fine": {"name": "efficient_segnet", "channels": [16, 32, 64, 128, 256]},
}

log = logging.getLogger(__name__)


@dataclass
class PlanResult:
    plan: Plan
    fingerprint: Fingerprint
    configs: list[Path]  # data_prepare.yaml, coarse.yaml, fine.yaml, predict.yaml
    fingerprint_file: Path


def plan_dataset(
    out: str | Path,
    *,
    images: str | Path | None = None,
    labels: str | Path | None = None,
    unlabeled: str | Path | None = None,
    dataset: str | Path | None = None,
    work: str | Path | None = None,
    label_names: list[str] | None = None,
    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
    workers: int = 2,
    networks: dict[str, dict] | None = None,
    label_map: dict[int, int] | None = None,
    max_voxels: dict[str, int] | None = None,
) -> PlanResult:
    """Fingerprint the cases (`images` + `labels` [+ `unlabeled`], or a `dataset` root in the nnU-Net v2, MSD or
    FLARE layout), decide the pipeline and write its config folder `out` (with fingerprint.json).

    `work`: where the configs send prepared arrays and trained stages (default: `out`/work). `label_names`: names
    of label ids 1..N where no dataset.json names them. `networks`: model keys per stage over REFERENCE_NETWORKS.
    `label_map`: source id -> label id 1..N (prepare.label_map; merges labels, drops unlisted ones), with
    `label_names` for the ids it makes. `max_voxels`: a cap per stage on its grid's voxels besides the memory
    (the demo's, for CPU training time).
    """
    out = Path(out)
    if gpu_memory_gb <= 0:
        raise ValueError(f"--gpu-memory-gb must be positive, got {gpu_memory_gb}")
    if dataset is not None:
        if images is not None or labels is not None:
            raise ValueError("give either a dataset root (-d) or image and label folders (-i, -l), not both")
        from flareseg.data.layouts import read_dataset

        layout = read_dataset(dataset)
        found, named = layout.discovery, layout.label_names
        if unlabeled is not None:
            found.cases += discover_cases(None, None, Path(unlabeled)).cases
    else:
        if images is None or labels is None:
            raise ValueError("a plan needs labeled cases: give -i IMAGES and -l LABELS, or -d DATASET")
        found, named = discover_cases(Path(images), Path(labels), Path(unlabeled) if unlabeled else None), None
    for _, problem in found.problems:
        log.error("left out of the plan: %s", problem)
    if label_map is not None:
        if label_names is None or sorted(set(label_map.values()) - {0}) != list(range(1, len(label_names) + 1)):
            raise ValueError(f"a label map {label_map} needs names for the ids 1..N it makes (label_names)")
        named = None
    if named is None and label_names is not None:
        named = {k + 1: name for k, name in enumerate(label_names)}
    fingerprint = fingerprint_dataset(found.cases, named, workers=workers, label_map=label_map)
    for case_id, problem in found.problems:
        fingerprint.failed.append((case_id, problem))
    label_map = label_map or _renumber(fingerprint)
    stage_networks = {}
    for stage, reference in REFERENCE_NETWORKS.items():
        overrides = {**reference, **(networks or {}).get(stage, {})}
        config = load_config(
            None,
            [f"model.{key}={_value(value)}" for key, value in overrides.items()]
            + [f"data.labels=[{','.join(f'l{k}' for k in fingerprint.label_names)}]"],
        )
        stage_networks[stage] = StageNetwork(overrides, network_memory(config), (max_voxels or {}).get(stage))
    plan = make_plan(fingerprint, stage_networks["coarse"], stage_networks["fine"], gpu_memory_gb)
    work = Path(work) if work is not None else out / "work"
    sources = Sources(
        images=Path(images) if images is not None else None,
        labels=Path(labels) if labels is not None else None,
        unlabeled=Path(unlabeled) if unlabeled is not None else None,
        dataset=Path(dataset) if dataset is not None else None,
        work=work,
        workers=workers,
        label_map=label_map,
    )
    cases = len(fingerprint.cases)
    title = (
        f"Planned by `flareseg plan` from {cases} cases ({len(fingerprint.labeled)} labeled); the figures in the "
        f"comments come from {FINGERPRINT_FILE} beside this file."
    )
    configs = write_configs(plan, stage_networks, sources, out, title)
    return PlanResult(plan, fingerprint, configs, fingerprint.save(out / FINGERPRINT_FILE))


def _renumber(fingerprint: Fingerprint) -> dict[int, int] | None:
    """Renumber the fingerprint's labels to 1..N in id order (data.labels' numbering); the map from the dataset's
    ids, or None where they already are 1..N."""
    ids = sorted(fingerprint.label_names)
    if ids == list(range(1, len(ids) + 1)):
        return None
    mapping = {old: new for new, old in enumerate(ids, start=1)}
    fingerprint.label_names = {mapping[old]: fingerprint.label_names[old] for old in ids}
    for case in fingerprint.cases:
        if "labels" in case:
            case["labels"] = {str(mapping[int(k)]): v for k, v in case["labels"].items() if int(k) in mapping}
    return mapping


def _value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


__all__ = ["PlanResult", "plan_dataset", "DEFAULT_GPU_MEMORY_GB", "REFERENCE_NETWORKS", "FINGERPRINT_FILE"]

"""`flareseg demo`: the whole pipeline on synthetic CT phantoms, with no data and no download.

    phantoms -> prepare -> train coarse -> train fine -> predict the held-out phantoms -> evaluate -> report.md

`minutes` is the total wall time to aim for: phantoms, prepare, predict and evaluate take what they take (seconds
at the demo's sizes), and training gets the rest (`train.time_budget_minutes`), split between the two stages; each
stage trains at least one epoch. The default `DemoSettings` are small but real networks that learn the large
organs of FLARE21 (liver, kidneys, spleen, pancreas) from ten phantoms on 2 CPU cores in that time.

Everything goes under one folder: phantoms/ (imagesTr, labelsTr and the held-out imagesTs, labelsTs), prepared/,
coarse/ and fine/ (the training runs), predictions/ (with timing.csv), evaluation/ (scores.csv, scores.json),
overlays/, report.md, predict.yaml (the trained networks as a config for `sh predict.sh`) and demo.json (the
settings; it marks the folder as the demo's). A rerun into the same folder
reuses the phantoms and the prepared arrays and trains, predicts and evaluates afresh.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from flareseg.atomic import atomic_write_text
from flareseg.checkpoint import BEST
from flareseg.config import Config, load_config
from flareseg.demo_report import write_report
from flareseg.demo_settings import (
    LABEL_MAP,
    MARKER,
    MIN_STAGE_SECONDS,
    ORGANS,
    PLAN,
    PLANNED_FILES,
    PREDICT_CONFIG,
    PRESET,
    SMOKE_SETTINGS,
    DemoError,
    DemoResult,
    DemoSettings,
    scores_csv,
)

__all__ = ["ORGANS", "PRESET", "SMOKE_SETTINGS", "DemoError", "DemoResult", "DemoSettings", "run_demo"]


def run_demo(
    out: str | os.PathLike = "flareseg_demo",
    minutes: float = 10.0,
    device: str = "auto",
    settings: DemoSettings | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run the demo into `out`, aiming at `minutes` of wall time in all; returns the result (report in out)."""
    settings = settings or DemoSettings()
    if minutes < 0:
        raise DemoError(f"--minutes must be >= 0, got {minutes}")
    out = Path(out)
    _claim_folder(out, settings)
    clock = _Clock()
    print(
        f"flareseg demo -> {out}: {settings.train_cases} training + {settings.test_cases} held-out CT phantoms, "
        f"segmenting {', '.join(ORGANS)} (left and right kidney as one label); about {minutes:g} min in all",
        flush=True,
    )

    train_ids, test_ids = _phantoms_and_prepared_data(out, settings, clock, progress)
    histories = {}
    for stage in ("coarse", "fine"):
        left = 60.0 * minutes - clock.elapsed() - settings.reserve_seconds
        share = settings.coarse_share if stage == "coarse" else 1.0
        budget = max(left * share, MIN_STAGE_SECONDS)
        with clock.phase(stage, f"training the {stage} network for {budget / 60:.1f} min") as note:
            histories[stage] = train_stage(out, stage, settings, budget, device, progress)
            note.append(_training_line(histories[stage]))

    with clock.phase("predict", f"predicting the {len(test_ids)} held-out phantoms") as note:
        rows = predict(out, device, progress)
        note.append(f"{np.mean([float(row['seconds']) for row in rows]):.1f} s per case")
    with clock.phase("evaluate", "evaluating (DSC, NSD) and drawing overlays") as note:
        summary = evaluate(out)
        draw_overlays(out, test_ids)
        note.append(f"mean DSC {summary['mean']['dsc']:.4f}")

    from flareseg.evaluation import format_summary

    phases = dict(clock.phases)
    report = write_report(out, settings, minutes, device, summary, histories, rows, phases, clock.elapsed())
    print(format_summary(summary))
    print(
        f"mean DSC {summary['mean']['dsc']:.4f} over {summary['cases']} held-out phantoms "
        f"({', '.join(ORGANS)}), {clock.elapsed() / 60:.1f} min in all -> {report}",
        flush=True,
    )
    return DemoResult(out, summary, phases, report)


def _phantoms_and_prepared_data(
    out: Path, settings: DemoSettings, clock: _Clock, progress: bool
) -> tuple[list[str], list[str]]:
    """The first two phases: the phantoms and their prepared folder, each reused when a rerun finds it complete.
    Returns the training and held-out case ids."""
    with clock.phase("phantoms", "writing synthetic CT phantoms") as note:
        train_ids, test_ids, written = make_phantoms(out / "phantoms", settings)
        shape = "x".join(map(str, settings.shape))
        note.append(
            f"{len(train_ids)} training + {len(test_ids)} held-out ({shape} voxels, random axis order; sites "
            f"{', '.join(settings.sites)})"
            if written
            else "already there, reused"
        )
    with clock.phase("plan", "planning the pipeline from the phantoms (flareseg plan)") as note:
        if not written and all((out / PLAN / name).is_file() for name in PLANNED_FILES):
            note.append("already planned, reused")
        else:
            written = True  # a new plan: prepare again on its grids
            result = plan(out, settings)
            grids = {stage: result.plan.value(f"prepare.grids.{stage}.size") for stage in ("coarse", "fine")}
            note.append(f"coarse grid {grids['coarse']}, fine grid {grids['fine']} -> {out / PLAN}")
    with clock.phase("prepare", "preparing the training phantoms") as note:
        if not written and _prepared(out, train_ids):
            note.append("already prepared, reused")
        else:
            summary = prepare(out, settings, progress)
            note.append(f"{len(summary.prepared)} cases")

    return train_ids, test_ids


# ------------------------------------------------------------------------------------------------------------------
# The phases


def make_phantoms(root: Path, settings: DemoSettings) -> tuple[list[str], list[str], bool]:
    """Training phantoms in root/imagesTr + labelsTr, held-out ones in root/imagesTs + labelsTs, from the settings'
    sites in turn (root/sites.json: {case id: site}).

    Returns (training ids, held-out ids, whether they were written now). Files are written atomically, so a
    complete set on disk (from an earlier run with the same settings) is reused as it is.
    """
    from flareseg.data.phantom import write_phantom_dataset

    per_site = {
        site: (_share(settings.train_cases, settings.sites, site), _share(settings.test_cases, settings.sites, site))
        for site in settings.sites
    }
    train_ids, test_ids = [], []
    for site, (train, test) in per_site.items():  # write_phantom_dataset's names: <site>_000, <site>_001, ...
        train_ids += [f"{site}_{index:03d}" for index in range(train)]
        test_ids += [f"{site}_{index:03d}" for index in range(train, train + test)]
    files = {case: _case_files(root, case, "Tr") for case in train_ids}
    files |= {case: _case_files(root, case, "Ts") for case in test_ids}
    if all(path.is_file() for pair in files.values() for path in pair):
        return train_ids, test_ids, False
    for site, (train, test) in per_site.items():
        write_phantom_dataset(root, train + test, seed=settings.seed, shape=settings.shape, site=site)
    for case in test_ids:
        for written, target in zip(_case_files(root, case, "Tr"), files[case]):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(written, target)
    return train_ids, test_ids, True


def _share(count: int, sites: tuple[str, ...], site: str) -> int:
    """How many of `count` cases come from `site` when the sites take them in turn (the first ones one more)."""
    return count // len(sites) + (sites.index(site) < count % len(sites))


def plan(out: Path, settings: DemoSettings):
    """flareseg plan of the training phantoms into out/plan: grids, HU window, margin and component rules from the
    phantoms themselves, for the demo's networks, each grid at most coarse_size^3 / fine_size^3 voxels (what trains
    in minutes on a CPU); its configs send prepared data and runs to out/prepared, out/coarse and out/fine."""
    from flareseg.planning import plan_dataset

    return plan_dataset(
        out / PLAN,
        images=out / "phantoms" / "imagesTr",
        labels=out / "phantoms" / "labelsTr",
        work=out,
        label_names=list(ORGANS),
        label_map=dict(LABEL_MAP),
        networks={
            "coarse": {"channels": list(settings.coarse_channels)},
            "fine": {"channels": list(settings.fine_channels)},
        },
        max_voxels={"coarse": settings.coarse_size**3, "fine": settings.fine_size**3},
        workers=2,
    )


def prepare(out: Path, settings: DemoSettings, progress: bool = True):
    """flareseg prepare of the training phantoms into out/prepared with the planned config, from scratch
    (prepare.overwrite).

    From scratch because the phantoms or the plan were just (re)written; `run_demo` skips this phase when they were
    reused and the index already holds every training case.
    """
    from flareseg.data.prepare import FAILURES_FILE, prepare_dataset

    config = load_config(out / PLAN / "data_prepare.yaml", ["prepare.folds=5", "prepare.overwrite=true"])
    summary = prepare_dataset(config, progress=progress)
    if not summary.ok:
        raise RuntimeError(f"prepare failed for {len(summary.failed)} phantoms: see {summary.out_dir / FAILURES_FILE}")
    return summary


def stage_config(out: Path, stage: str, settings: DemoSettings, budget_seconds: float, progress: bool) -> Config:
    """The training config of one stage: the planned one (network, grid, HU window) with the learning test's recipe
    (tests/test_training.py) and a time budget."""
    config = load_config(out / PLAN / f"{stage}.yaml")
    model, train = config.model, config.train
    model.dropout = 0.0
    train.fold = 0
    train.epochs = 1000  # a cap, not reached on a CPU: the time budget ends training
    train.time_budget_minutes = budget_seconds / 60.0
    train.batch_size, train.iterations_per_epoch = settings.batch_size, settings.steps_per_epoch
    train.lr, train.schedule, train.val_every = settings.lr, "constant", settings.val_every
    train.workers = 0  # compute-bound at these sizes: loader processes would only take cores away
    train.resume = False  # a rerun trains afresh, so that every run shows what its own budget learns
    # The default +-200 HU per-organ shift (for contrast phases never seen in training) costs more learning time
    # than the demo has, and both of the demo's phases are in its training cases: bench/compare_semi.py measured
    # supervised training without the shift 0.035 Dice better on other sites' phases (README, CPS section).
    train.augment.organ_hu_shift_p = 0.0
    train.progress = progress
    return config.validate()


def train_stage(
    out: Path, stage: str, settings: DemoSettings, budget_seconds: float, device: str, progress: bool = True
) -> list[dict]:
    """Train one stage into out/<stage> for about `budget_seconds`; returns the per-epoch records."""
    from flareseg.engine.run import train

    config = stage_config(out, stage, settings, budget_seconds, progress)
    config.train.device = device
    return train(config)


def write_predict_config(out: Path) -> Path:
    """out/predict.yaml: the demo's networks as a ready predict config (`sh predict.sh IN OUT DIR/predict.yaml`),
    with the planned margin and component rules."""
    planned = load_config(out / PLAN / "predict.yaml").predict
    predict = {
        "coarse": str((out / "coarse" / BEST).resolve()),
        "fine": str((out / "fine" / BEST).resolve()),
        "margin_mm": planned.margin_mm,
        "coarse_min_volume_mm3": planned.coarse_min_volume_mm3,
        "keep_components_per_label": planned.keep_components_per_label,
        "postprocess": {name: _plain(rule) for name, rule in planned.postprocess.items()},
    }
    header = "# The demo's trained networks (phantoms only: not for real scans): sh predict.sh IN OUT this-file\n"
    return atomic_write_text(out / PREDICT_CONFIG, header + yaml.safe_dump({"predict": predict}, sort_keys=False))


def _plain(rule) -> dict:
    return {key: value for key, value in asdict(rule).items() if value is not None}


def predict(out: Path, device: str, progress: bool = True) -> list[dict]:
    """The real predictor on the held-out images into out/predictions, with the ready predict config that
    `write_predict_config` leaves for users; returns the timing.csv rows."""
    from flareseg.inference.batch import TIMING_FILE, predict_folder

    # the networks were (re)trained by this run: every held-out case is predicted again
    config = load_config(write_predict_config(out), [f"predict.device={device}", "predict.overwrite=true"])
    summary = predict_folder(config, out / "phantoms" / "imagesTs", out / "predictions", progress=progress)
    if not summary.ok:
        raise RuntimeError(f"prediction failed: {'; '.join(message for _, message in summary.failed)}")
    with open(out / "predictions" / TIMING_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def evaluate(out: Path) -> dict:
    """DSC and NSD of the predictions against the held-out ground truth; writes out/evaluation/scores.csv + .json."""
    from flareseg.evaluation import evaluate_folder

    _, summary = evaluate_folder(
        out / "phantoms" / "labelsTs", out / "predictions", preset=PRESET, workers=2, out=scores_csv(out)
    )
    if summary["failures"] or summary["missing_predictions"]:
        raise RuntimeError(f"evaluation incomplete: {summary['failures'] or summary['missing_predictions']}")
    return summary


def draw_overlays(out: Path, case_ids: list[str]) -> list[Path]:
    """out/overlays/<case>.png: the prediction (solid) against the ground truth in the demo's labels (dashed)."""
    from flareseg.io import read_image
    from flareseg.visualize import overlay_png

    lookup = np.zeros(256, dtype=np.uint8)
    for source, target in LABEL_MAP.items():
        lookup[source] = target
    paths = []
    for case in case_ids:
        image, geometry = read_image(_case_files(out / "phantoms", case, "Ts")[0])
        truth, _ = read_image(_case_files(out / "phantoms", case, "Ts")[1])
        label, _ = read_image(out / "predictions" / f"{case}.nii.gz")
        path = out / "overlays" / f"{case}.png"
        paths.append(overlay_png(image, geometry, label, path, lookup[truth], names=list(ORGANS)))
    return paths


# ------------------------------------------------------------------------------------------------------------------
# The report


# ------------------------------------------------------------------------------------------------------------------


class _Clock:
    """Wall time since the start, and per phase; prints a line when a phase starts and when it ends."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def stamp(self) -> str:
        seconds = int(self.elapsed())
        return f"[demo {seconds // 60}:{seconds % 60:02d}]"

    @contextmanager
    def phase(self, name: str, doing: str) -> Iterator[list[str]]:
        print(f"{self.stamp()} {doing} ...", flush=True)
        start, note = time.perf_counter(), []
        yield note
        self.phases[name] = time.perf_counter() - start
        print(f"{self.stamp()} {name}: {'; '.join(note) or 'done'} ({self.phases[name]:.1f} s)", flush=True)


def _claim_folder(out: Path, settings: DemoSettings) -> None:
    """Use `out` if it is new, empty or an earlier demo with the same settings; never write into anything else."""
    marker = out / MARKER
    wanted = json.loads(json.dumps(asdict(settings)))
    if marker.is_file():
        found = json.loads(marker.read_text()).get("settings")
        if found != wanted:
            raise DemoError(f"{out} holds a demo made with other settings ({marker}); use another --out")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DemoError(f"{out} exists and is not a flareseg demo folder (no {MARKER}); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"settings": wanted}, indent=1) + "\n")


def _case_files(root: Path, case: str, split: str) -> tuple[Path, Path]:
    return root / f"images{split}" / f"{case}_0000.nii.gz", root / f"labels{split}" / f"{case}.nii.gz"


def _prepared(out: Path, case_ids: list[str]) -> bool:
    """Whether out/prepared holds every one of `case_ids` (a record is written only after its arrays)."""
    from flareseg.data.prepared import PreparedData

    try:
        return set(case_ids) <= set(PreparedData(out / "prepared").case_ids())
    except FileNotFoundError:
        return False


def _training_line(history: list[dict]) -> str:
    best = max((r["val_dice_mean"] for r in history if r.get("val_dice_mean") is not None), default=None)
    last = next((r["val_dice"] for r in reversed(history) if r.get("val_dice")), {})
    organs = ", ".join(f"{organ} {value:.2f}" for organ, value in last.items())
    dice = f", best validation Dice {best:.4f} (last: {organs})" if best is not None else ""
    return f"{len(history)} epochs, {sum(r['seconds'] for r in history):.0f} s of training{dice}"

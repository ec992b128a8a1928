"""When do unlabeled scans help? Semi-supervised methods under a domain shift between phantom sites.

    python bench/compare_semi.py [--out DIR] [--seeds 0 1 2] [--epochs 50] [--threads 2]
                                 [--home portal_venous] [--shifted arterial_sharp non_contrast_lowdose ...]
    python bench/compare_semi.py --out DIR --report      # the tables of what DIR holds, nothing trained
    python bench/compare_semi.py --out DIR --diagnose    # why: pseudo-label quality and UIF per site (below)
    python bench/compare_semi.py --tiny                  # a seconds-long smoke run (used by the tests)

The situation of FLARE22: few labeled scans from one centre, many unlabeled scans from other centres, phases and
scanners. Here a centre is a phantom site (`flareseg phantoms --site`): `--labeled` cases of the home site are
labeled (liver, kidneys, spleen); `--unlabeled` cases of every shifted site are unlabeled; the test cases
(`--test-home` of the home site, `--test` of each shifted site) are labeled, never trained on and never used to
choose anything (no checkpoint selection: every run's last epoch is scored). The coarse stage is trained alone on
a whole-volume grid (`--grid`^3, BaseUNet 8..64, batch 2, 4 steps per epoch, constant lr 1e-2) and predicts the
test images at their own resolution (`predict.stages`, post-processing as in inference, both kidneys kept), Dice
per case and label against the test labels.

Methods, each from the same seed (`train.seed`; `--seeds` gives several):

- `supervised`: labeled cases only, `--epochs` epochs (equal steps).
- `supervised_equal_time`: the same run continued, scored at the kept checkpoint whose training time is closest to
  the CPS run's (constant lr: the run's epoch-E checkpoint is the E-epoch run).
- `cps`: cross pseudo supervision (`train.method=cps`) with every unlabeled case, `--epochs` epochs.
- `cps_uif`: reliable unlabeled-image filtering (FLARE22 SemiSeg-CSSN): the CPS run's intermediate checkpoints
  (`train.keep_every`) score each unlabeled case by their agreement with its last one (`flareseg.semi.reliability`);
  the cases above `--uif-threshold` with every label present train a second CPS run from scratch.
- `cps_uif_half`: the same UIF scores ranked instead of thresholded: the more reliable half of the unlabeled cases
  (every label present) train the second CPS run.
- `teacher_student` (FLARE23): the supervised run at `--epochs` (the teacher) labels every unlabeled case; a
  student trains supervised on the labeled and the pseudo-labeled cases, `--epochs` epochs.
- `cps_reference`: CPS with the reference's settings, lambda 1 from the first step (no ramp-up).
- `supervised_no_hu_shift`: `supervised` without the organ HU shift augmentation (on by default): how much of the
  contrast-phase shift that augmentation already covers.

Every run's scores are kept in DIR/results/<method>_seed<N>.json and every training run resumes (train.resume): a
killed benchmark goes on where it stopped, and several processes (different --seeds, the same --out, after one
has written the data) can share the work; the report averages what is there:
mean Dice over labels per case, averaged over the home site's and the shifted sites' test cases (and per site),
mean and spread (min-max) over seeds, and each method's difference from `supervised` seed by seed. Seconds are
training time (plus scoring for UIF and pseudo-labelling for the student), comparable within one run only.

The diagnosis (`--diagnose`, and after a run) looks for why: per seed and shifted site, the true Dice of the
teacher's pseudo-labels and of the CPS run's predictions on the unlabeled cases (their labels made again from the
phantoms' seeds; no method sees them), the mean UIF score, how many cases UIF kept, and the rank correlation of
the UIF score with the true Dice (does reliability find the good cases?).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flareseg.atomic import atomic_write_text
from flareseg.config import load_config
from flareseg.config.schema import PredictConfig
from flareseg.data.phantom import write_phantom_dataset
from flareseg.data.prepare import prepare_dataset
from flareseg.engine.cps import CrossPseudoSupervisionTrainer
from flareseg.engine.distributed import DistributedContext
from flareseg.engine.trainer import Trainer
from flareseg.inference.predictor import Predictor
from flareseg.io import read_image, write_image
from flareseg.semi.reliability import label_dice, reliability, select

LABEL_NAMES = ["liver", "kidney", "spleen"]
LABEL_MAP = {1: 1, 2: 2, 13: 2, 3: 3}  # FLARE ids -> liver 1, kidneys 2, spleen 3; the other organs background
LABELS = [f"data.labels=[{', '.join(LABEL_NAMES)}]", "prepare.label_map={1: 1, 2: 2, 13: 2, 3: 3}"]
METHODS = (
    "supervised",
    "supervised_equal_time",
    "cps",
    "cps_uif",
    "cps_uif_half",
    "teacher_student",
    "cps_reference",
    "supervised_no_hu_shift",
)
NO_HU_SHIFT = "train.augment.organ_hu_shift_p=0"
UIF_KEEP = 0.5  # cps_uif_half: the share of the unlabeled cases kept, most reliable first
SUPERVISED_SPAN = 3.5  # the supervised run continues to this many times --epochs, for the equal-time score


@dataclass
class Setup:
    """The benchmark's sizes and sites, as parsed."""

    out: Path
    home: str
    shifted: list[str]
    labeled: int
    unlabeled: int
    test_home: int
    test: int
    shape: tuple[int, int, int] | None
    grid: int
    epochs: int
    steps: int
    keep_every: int
    uif_threshold: float
    weight: float
    rampup: int
    threads: int


@dataclass
class TestCase:
    site: str
    image: np.ndarray
    geometry: object
    label: np.ndarray  # mapped to 0..3


def _site_cases(raw: Path, site: str, labeled: int, unlabeled: int, seed: int, shape) -> list[str]:
    """Write one site's phantoms once (a finished folder has its marker file) and return its labeled case ids."""
    folder = raw / site
    done = folder / "cases.json"
    if done.exists():
        return json.loads(done.read_text())
    cases = write_phantom_dataset(folder, labeled, seed=seed, site=site, shape=shape, unlabeled=unlabeled)
    atomic_write_text(done, json.dumps(cases) + "\n")
    return cases


def _link_all(sources: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        link = folder / source.name
        if not link.exists():
            link.symlink_to(source.resolve())


def make_data(setup: Setup) -> tuple[Path, list[Path], list[TestCase]]:
    """Phantoms of every site, the training folders (links) and the prepared folder; returns the prepared folder,
    the unlabeled image files and the test cases (read into memory once)."""
    raw = setup.out / "raw"
    home_ids = _site_cases(raw, setup.home, setup.labeled + setup.test_home, 0, 1, setup.shape)
    train_ids, home_test = home_ids[: setup.labeled], home_ids[setup.labeled :]
    tests = [(setup.home, raw / setup.home, case) for case in home_test]
    unlabeled: list[Path] = []
    for number, site in enumerate(setup.shifted):
        ids = _site_cases(raw, site, setup.test, setup.unlabeled, 100 + number, setup.shape)
        tests += [(site, raw / site, case) for case in ids]
        unlabeled += sorted((raw / site / "unlabeled").glob("*_0000.nii.gz"))
    train = setup.out / "train"
    home = raw / setup.home
    _link_all([home / "imagesTr" / f"{case}_0000.nii.gz" for case in train_ids], train / "imagesTr")
    _link_all([home / "labelsTr" / f"{case}.nii.gz" for case in train_ids], train / "labelsTr")
    _link_all(unlabeled, train / "unlabeled")
    data = setup.out / "data"
    _prepare(setup, train / "imagesTr", train / "labelsTr", train / "unlabeled", data)
    lookup = _lookup()
    cases = []
    for site, folder, case in tests:
        image, geometry = read_image(folder / "imagesTr" / f"{case}_0000.nii.gz")
        label, _ = read_image(folder / "labelsTr" / f"{case}.nii.gz")
        cases.append(TestCase(site, image, geometry, lookup[label]))
    return data, unlabeled, cases


def _prepare(setup: Setup, images: Path, labels: Path, unlabeled: Path | None, out: Path) -> None:
    if (out / "prepared.done").exists():
        return
    grid = f"[{setup.grid},{setup.grid},{setup.grid}]"
    overrides = [
        *LABELS,
        "prepare.folds=1",
        f"prepare.grids.coarse.size={grid}",
        f"prepare.grids.fine.size={grid}",
        f"prepare.images={images}",
        f"prepare.labels={labels}",
        f"prepare.out={out}",
        "prepare.workers=1",
    ]
    if unlabeled is not None:
        overrides.append(f"prepare.unlabeled={unlabeled}")
    summary = prepare_dataset(load_config(None, overrides), progress=False)
    if not summary.ok:
        sys.exit(f"preparing {out} failed: {summary.failed}")
    atomic_write_text(out / "prepared.done", "")


def train(setup: Setup, data: Path, out: Path, seed: int, epochs: int, extra: list[str]) -> tuple[Path, list[dict]]:
    """One coarse-stage run (supervised, or CPS when `extra` says so); returns its folder and history."""
    overrides = [
        *LABELS,
        f"train.data={data}",
        f"train.out={out}",
        "train.fold=-1",
        f"train.epochs={epochs}",
        f"train.iterations_per_epoch={setup.steps}",
        "train.batch_size=2",
        "train.lr=1e-2",
        "train.schedule=constant",
        "train.workers=0",
        "train.progress=false",
        "train.stage=coarse",
        f"train.seed={seed}",
        f"train.keep_every={setup.keep_every}",
        "train.resume=true",  # a killed benchmark goes on; a finished run is only read
        "model.name=base_unet",
        "model.channels=[8,16,32,64]",
        f"model.input_size=[{setup.grid},{setup.grid},{setup.grid}]",
        "model.dropout=0",
        *extra,
    ]
    config = load_config(None, overrides)
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cps = any(item == "train.method=cps" for item in extra)
    history = (CrossPseudoSupervisionTrainer if cps else Trainer)(config, context).fit()
    return out, history


def predictor(setup: Setup, checkpoint: Path) -> Predictor:
    settings = PredictConfig(
        stages=[checkpoint], device="cpu", backend="torch", threads=setup.threads, keep_components_per_label={2: 2}
    )
    settings.validate()
    return Predictor(settings)


def score(setup: Setup, checkpoint: Path, tests: list[TestCase]) -> list[dict]:
    """Dice per test case and label of the checkpoint's predictions at the images' own resolution."""
    model = predictor(setup, checkpoint)
    rows = []
    for case in tests:
        predicted = model.predict_array(case.image, case.geometry)
        dice = {name: label_dice(predicted, case.label, k) for k, name in enumerate(LABEL_NAMES, start=1)}
        rows.append({"site": case.site, "dice": dice, "mean": float(np.mean(list(dice.values())))})
    return rows


def _epoch_checkpoint(run: Path, epoch: int) -> Path:
    return run / f"checkpoint_epoch_{epoch:04d}.pt"


def _seconds(history: list[dict], epochs: int | None = None) -> float:
    return float(sum(record["seconds"] for record in history[:epochs]))


def _save(setup: Setup, method: str, seed: int, rows: list[dict], seconds: float, **extra) -> None:
    result = {"method": method, "seed": seed, "seconds": round(seconds, 1), "cases": rows, **extra}
    atomic_write_text(_result_path(setup, method, seed), json.dumps(result, indent=1) + "\n")


def _result_path(setup: Setup, method: str, seed: int) -> Path:
    return setup.out / "results" / f"{method}_seed{seed}.json"


def run_seed(setup: Setup, data: Path, unlabeled: list[Path], tests: list[TestCase], seed: int) -> None:
    """Every method's result for one seed that DIR/results lacks; runs already trained are taken up where they
    stopped (train.resume), finished ones are only read."""
    runs = setup.out / "runs" / f"seed{seed}"

    def missing(method: str) -> bool:
        return not _result_path(setup, method, seed).exists()

    cps_extra = _cps_overrides(setup.weight, setup.rampup)
    supervised, supervised_history = train(
        setup, data, runs / "supervised", seed, round(SUPERVISED_SPAN * setup.epochs), []
    )
    teacher = _epoch_checkpoint(supervised, setup.epochs)
    if missing("supervised"):
        _save(setup, "supervised", seed, score(setup, teacher, tests), _seconds(supervised_history, setup.epochs))

    cps, cps_history = train(setup, data, runs / "cps", seed, setup.epochs, cps_extra)
    cps_seconds = _seconds(cps_history)
    if missing("cps"):
        _save(setup, "cps", seed, score(setup, cps / "checkpoint_latest.pt", tests), cps_seconds)

    if missing("supervised_equal_time"):
        elapsed = np.cumsum([record["seconds"] for record in supervised_history])
        kept = list(range(setup.keep_every, len(elapsed) + 1, setup.keep_every))
        equal = min(kept, key=lambda e: abs(elapsed[e - 1] - cps_seconds))
        rows = score(setup, _epoch_checkpoint(supervised, equal), tests)
        _save(setup, "supervised_equal_time", seed, rows, float(elapsed[equal - 1]), epochs=equal)

    chosen = runs / "uif_selected.json"
    if missing("cps_uif") or not chosen.exists():
        started = time.perf_counter()
        selected, scores, missing_labels = filter_unlabeled(setup, cps, unlabeled)
        filtering = time.perf_counter() - started
        record = {"selected": selected, "scores": scores, "missing_labels": missing_labels, "seconds": filtering}
        atomic_write_text(chosen, json.dumps(record, indent=1) + "\n")
    uif = json.loads(chosen.read_text())
    if missing("cps_uif"):
        selected, filtering = uif["selected"], uif["seconds"]
        if selected:
            extra = [*cps_extra, f"semi_supervised.unlabeled_cases={chosen}"]
            uif, uif_history = train(setup, data, runs / "cps_uif", seed, setup.epochs, extra)
            rows = score(setup, uif / "checkpoint_latest.pt", tests)
            seconds = cps_seconds + filtering + _seconds(uif_history)
        else:  # nothing reliable: the first round's result stands
            rows, seconds = score(setup, cps / "checkpoint_latest.pt", tests), cps_seconds + filtering
        _save(setup, "cps_uif", seed, rows, seconds, selected=selected, of=len(unlabeled))

    if missing("cps_uif_half"):  # the same scores, ranked: the more reliable half (UIF_KEEP) instead of a threshold
        ranked = select(uif["scores"], uif["missing_labels"], -1.0, None)
        selected = ranked[: max(1, round(UIF_KEEP * len(uif["scores"])))]
        half = runs / "uif_half.json"
        atomic_write_text(half, json.dumps(selected, indent=1) + "\n")
        extra = [*cps_extra, f"semi_supervised.unlabeled_cases={half}"]
        run, history = train(setup, data, runs / "cps_uif_half", seed, setup.epochs, extra)
        rows = score(setup, run / "checkpoint_latest.pt", tests)
        seconds = cps_seconds + uif["seconds"] + _seconds(history)
        _save(setup, "cps_uif_half", seed, rows, seconds, selected=selected, of=len(unlabeled))

    if missing("teacher_student"):
        started = time.perf_counter()
        student_data = pseudo_labeled_data(setup, teacher, unlabeled, runs / "student_data")
        labelling = time.perf_counter() - started
        student, student_history = train(setup, student_data, runs / "student", seed, setup.epochs, [])
        seconds = _seconds(supervised_history, setup.epochs) + labelling + _seconds(student_history)
        _save(setup, "teacher_student", seed, score(setup, student / "checkpoint_latest.pt", tests), seconds)

    if missing("supervised_no_hu_shift"):  # how much of the phase shift the organ HU shift augmentation covers
        run, history = train(setup, data, runs / "supervised_no_hu_shift", seed, setup.epochs, [NO_HU_SHIFT])
        _save(
            setup, "supervised_no_hu_shift", seed, score(setup, run / "checkpoint_latest.pt", tests), _seconds(history)
        )

    if missing("cps_reference"):  # the reference's lambda 1 from the first step
        run, history = train(setup, data, runs / "cps_reference", seed, setup.epochs, _cps_overrides(1.0, 0))
        _save(setup, "cps_reference", seed, score(setup, run / "checkpoint_latest.pt", tests), _seconds(history))


def _cps_overrides(weight: float, rampup: int) -> list[str]:
    return [
        "train.method=cps",
        "semi_supervised.unlabeled_batch_size=2",
        f"semi_supervised.weight={weight}",
        f"semi_supervised.rampup_epochs={rampup}",
    ]


def filter_unlabeled(
    setup: Setup, run: Path, unlabeled: list[Path]
) -> tuple[list[str], dict[str, float], dict[str, list[int]]]:
    """UIF: each unlabeled case's agreement of the intermediate checkpoints with the last one; the reliable ones."""
    final = predictor(setup, _epoch_checkpoint(run, setup.epochs))
    kept = range(setup.keep_every, setup.epochs, setup.keep_every)  # the epochs before the last
    intermediate = [predictor(setup, _epoch_checkpoint(run, epoch)) for epoch in kept]
    labels = list(range(1, len(LABEL_NAMES) + 1))
    scores, missing = {}, {}
    for path in unlabeled:
        case = path.name.removesuffix("_0000.nii.gz")
        image, geometry = read_image(path)
        reference = final.predict_array(image, geometry)
        predictions = [model.predict_array(image, geometry) for model in intermediate]
        scores[case] = round(reliability(predictions, reference, labels), 4)
        present = set(np.unique(reference).tolist())
        missing[case] = [k for k in labels if k not in present]
    return select(scores, missing, setup.uif_threshold, None), scores, missing


def pseudo_labeled_data(setup: Setup, teacher: Path, unlabeled: list[Path], folder: Path) -> Path:
    """The labeled cases plus every unlabeled case with the teacher's label map, prepared."""
    images, labels = folder / "imagesTr", folder / "labelsTr"
    train = setup.out / "train"
    _link_all(sorted((train / "imagesTr").iterdir()) + unlabeled, images)
    # the home labels are FLARE ids and the teacher's are 1..3: the label map takes both to the same ids
    _link_all(sorted((train / "labelsTr").iterdir()), labels)
    model = predictor(setup, teacher)
    for path in unlabeled:
        target = labels / path.name.replace("_0000.nii.gz", ".nii.gz")
        if not target.exists():
            image, geometry = read_image(path)
            write_image(target, model.predict_array(image, geometry), geometry)
    data = folder / "data"
    _prepare(setup, images, labels, None, data)
    return data


def diagnose(setup: Setup) -> str:
    """Why a method helps or not, from what the runs left: the true Dice of the teacher's pseudo-labels and of the
    first CPS round's predictions on each unlabeled case (the phantoms' labels are regenerated from their seeds;
    no method ever sees them), per site, and whether the UIF score ranks the cases by that true quality."""
    lines = [
        "| seed | site | pseudo-label Dice (teacher) | CPS prediction Dice | UIF score | UIF kept "
        "| Spearman(UIF, Dice) |",
        "|---|---|---|---|---|---|---|",
    ]
    truth = {}
    for seed_dir in sorted((setup.out / "runs").glob("seed*")):
        seed = int(seed_dir.name.removeprefix("seed"))
        chosen = seed_dir / "uif_selected.json"
        uif = json.loads(chosen.read_text()) if chosen.exists() else {"selected": [], "scores": {}}
        labels = seed_dir / "student_data" / "labelsTr"
        cps = _epoch_checkpoint(seed_dir / "cps", setup.epochs)
        model = predictor(setup, cps) if cps.exists() else None
        rows: dict[str, list[tuple[float, float, float, bool]]] = {}
        for number, site in enumerate(setup.shifted):
            for path in sorted((setup.out / "raw" / site / "unlabeled").glob("*_0000.nii.gz")):
                case = path.name.removesuffix("_0000.nii.gz")
                if case not in truth:
                    truth[case] = _unlabeled_truth(setup, site, 100 + number, case)
                pseudo = labels / f"{case}.nii.gz"
                teacher = _mean_dice(read_image(pseudo)[0], truth[case]) if pseudo.exists() else float("nan")
                image, geometry = read_image(path)
                own = _mean_dice(model.predict_array(image, geometry), truth[case]) if model else float("nan")
                score = uif["scores"].get(case, float("nan"))
                rows.setdefault(site, []).append((teacher, own, score, case in uif["selected"]))
        for site, values in rows.items():
            teacher, own, score, kept = (np.array(column) for column in zip(*values, strict=True))
            lines.append(
                f"| {seed} | {site} | {np.nanmean(teacher):.3f} | {np.nanmean(own):.3f} | {np.nanmean(score):.3f} | "
                f"{int(kept.sum())}/{len(kept)} | {_spearman(score, own)} |"
            )
    lines += ["", "Dice: mean over liver, kidneys and spleen against the unlabeled phantoms' true labels"]
    return "\n".join(lines)


def _unlabeled_truth(setup: Setup, site: str, site_seed: int, case: str) -> np.ndarray:
    """The label map (mapped to 0..3) of an unlabeled phantom, made again from its seed as make_data wrote it."""
    from flareseg.data.phantom import make_phantom, phantom_case_seed

    index = int(case.rsplit("_", 1)[1])
    phantom = make_phantom(phantom_case_seed(site_seed, index, site), site=site, shape=setup.shape)
    return _lookup()[phantom.label]


def _lookup() -> np.ndarray:
    lookup = np.zeros(256, dtype=np.uint8)
    for source, target in LABEL_MAP.items():
        lookup[source] = target
    return lookup


def _mean_dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([label_dice(predicted, truth, k) for k in range(1, len(LABEL_NAMES) + 1)]))


def _spearman(a: np.ndarray, b: np.ndarray) -> str:
    keep = ~(np.isnan(a) | np.isnan(b))
    if keep.sum() < 3 or np.ptp(a[keep]) == 0 or np.ptp(b[keep]) == 0:
        return "n/a"
    ranks = [np.argsort(np.argsort(values[keep])) for values in (a, b)]
    return f"{np.corrcoef(*ranks)[0, 1]:+.2f}"


def report(setup: Setup) -> str:
    """Markdown tables of every result in DIR/results."""
    results = [json.loads(path.read_text()) for path in sorted((setup.out / "results").glob("*.json"))]
    if not results:
        return "no results yet"
    sites = sorted({row["site"] for result in results for row in result["cases"]}, key=_site_order(setup))
    by_method: dict[str, dict[int, dict]] = {}
    for result in results:
        by_method.setdefault(result["method"], {})[result["seed"]] = result
    lines = [
        f"home site {setup.home} ({setup.labeled} labeled), shifted: {', '.join(setup.shifted)} "
        f"({setup.unlabeled} unlabeled each); coarse {setup.grid}^3, {setup.epochs} epochs x {setup.steps} steps",
        "",
        "| method | seeds | home test | shifted test | shifted - supervised (per seed) | "
        + " | ".join(sites)
        + " | seconds |",
        "|---" * (5 + len(sites) + 1) + "|",
    ]
    baseline = by_method.get("supervised", {})
    for method in [m for m in METHODS if m in by_method]:
        runs = by_method[method]
        home = [_mean(run, lambda site: site == setup.home) for run in runs.values()]
        shifted = [_mean(run, lambda site: site != setup.home) for run in runs.values()]
        gain = [
            _mean(run, lambda site: site != setup.home) - _mean(baseline[seed], lambda site: site != setup.home)
            for seed, run in runs.items()
            if seed in baseline
        ]
        per_site = [_spread([_mean(run, lambda s, site=site: s == site) for run in runs.values()]) for site in sites]
        seconds = statistics.median(run["seconds"] for run in runs.values())
        lines.append(
            f"| {method} | {len(runs)} | {_spread(home)} | {_spread(shifted)} | {_spread(gain, signed=True)} | "
            + " | ".join(per_site)
            + f" | {seconds:.0f} |"
        )
    lines += ["", "mean Dice over liver, kidneys and spleen per case; mean (min-max) over seeds"]
    return "\n".join(lines)


def _site_order(setup: Setup):
    order = [setup.home, *setup.shifted]
    return lambda site: order.index(site) if site in order else len(order)


def _mean(result: dict, keep) -> float:
    values = [row["mean"] for row in result["cases"] if keep(row["site"])]
    return float(np.mean(values)) if values else float("nan")


def _spread(values: list[float], signed: bool = False) -> str:
    if not values:
        return "n/a"
    sign = "+" if signed else ""
    mean = f"{float(np.mean(values)):{sign}.3f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):{sign}.3f} to {max(values):{sign}.3f})"


def parse(argv: list[str] | None = None) -> tuple[Setup, argparse.Namespace]:
    from flareseg.data.phantom.sites import SITES

    names = list(SITES)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="work folder, kept and resumed (default: a temporary one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--home", default="portal_venous", choices=names, help="the labeled site")
    parser.add_argument("--shifted", nargs="+", choices=names, help="the unlabeled sites (default: all others)")
    parser.add_argument("--labeled", type=int, default=4, help="labeled training cases of the home site")
    parser.add_argument("--unlabeled", type=int, default=6, help="unlabeled cases per shifted site")
    parser.add_argument("--test-home", type=int, default=4, help="test cases of the home site")
    parser.add_argument("--test", type=int, default=3, help="test cases per shifted site")
    parser.add_argument("--shape", type=int, nargs=3, help="phantom voxels z y x (default: each site's own)")
    parser.add_argument("--grid", type=int, default=32, help="the coarse grid's edge (voxels)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--keep-every", type=int, default=10, help="kept checkpoints (UIF, equal time)")
    parser.add_argument("--uif-threshold", type=float, default=0.9)
    parser.add_argument("--weight", type=float, default=0.3, help="semi_supervised.weight (lambda)")
    parser.add_argument("--rampup", type=int, default=25, help="semi_supervised.rampup_epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="print the tables of --out's results, train nothing")
    parser.add_argument(
        "--diagnose", action="store_true", help="pseudo-label quality and UIF per site from --out's runs (see above)"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny phantoms, 2 epochs: checks that the script runs")
    args = parser.parse_args(argv)
    shifted = args.shifted or [name for name in names if name != args.home]
    if (args.report or args.diagnose) and args.out is None:
        parser.error("--report and --diagnose read a benchmark's folder: give it with --out")
    if args.home in shifted:
        parser.error(f"--shifted lists the home site {args.home}: its unlabeled cases would be the labeled site's")
    if not args.tiny and not 1 <= args.keep_every < args.epochs:
        parser.error("--keep-every must be at least 1 and below --epochs (UIF needs intermediate checkpoints)")
    if args.tiny:
        args.seeds = args.seeds[:1]
        args.labeled, args.unlabeled, args.test_home, args.test = 2, 1, 1, 1
        args.shape, args.grid, args.epochs, args.keep_every = [24, 48, 48], 16, 2, 1
        shifted = shifted[:2]
    setup = Setup(
        out=args.out or Path(),
        home=args.home,
        shifted=shifted,
        labeled=args.labeled,
        unlabeled=args.unlabeled,
        test_home=args.test_home,
        test=args.test,
        shape=tuple(args.shape) if args.shape else None,
        grid=args.grid,
        epochs=args.epochs,
        steps=1 if args.tiny else 4,
        keep_every=args.keep_every,
        uif_threshold=args.uif_threshold,
        weight=args.weight,
        rampup=args.rampup,
        threads=args.threads,
    )
    return setup, args


def main(argv: list[str] | None = None) -> None:
    setup, args = parse(argv)
    torch.set_num_threads(setup.threads)
    if args.report or args.diagnose:
        print(diagnose(setup) if args.diagnose else report(setup))
        return
    with tempfile.TemporaryDirectory(prefix="flareseg-semi-") as tmp:
        if args.out is None:
            setup.out = Path(tmp)
        setup.out.mkdir(parents=True, exist_ok=True)
        data, unlabeled, tests = make_data(setup)
        for seed in args.seeds:
            run_seed(setup, data, unlabeled, tests, seed)
            print(f"seed {seed} done", flush=True)
        print(report(setup))
        print()
        print(diagnose(setup))


if __name__ == "__main__":
    main()

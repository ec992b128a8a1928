"""The demo's report.md: scores, per-case time and memory, training, overlays, phase times and settings, one
function per section."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np

from flareseg.atomic import atomic_write_text
from flareseg.demo_settings import LABEL_MAP, ORGANS, PLAN, PREDICT_CONFIG, PRESET, REPORT, DemoSettings, scores_csv


def write_report(
    out: Path,
    settings: DemoSettings,
    minutes: float,
    device: str,
    summary: dict,
    histories: dict[str, list[dict]],
    timing_rows: list[dict],
    phases: dict[str, float],
    total_seconds: float,
) -> Path:
    """out/report.md: scores, per-case time and memory, training, overlays, phase times, settings."""
    scores = _read_scores(scores_csv(out))
    cases = sorted({row["case"] for row in scores})
    lines = [
        *_report_scores(out, settings, minutes, device, summary, len(cases), total_seconds),
        *_report_sites(out, scores),
        *_report_cases(out, scores, cases, timing_rows, phases),
        *_report_training(out, settings, histories),
        "## Overlays",
        "",
        "Prediction solid, ground truth dashed (also `predictions/<case>.nii.gz`, on the input's exact grid).",
        "",
        *(f"![{case}](overlays/{case}.png)" for case in cases),
        "",
        "## Wall time per phase",
        "",
        "| phase | seconds |",
        "|---|---|",
        *(f"| {phase} | {seconds:.1f} |" for phase, seconds in phases.items()),
        f"| **total** | **{total_seconds:.1f}** |",
        "",
        *_report_settings(out, settings, minutes, device),
    ]
    return atomic_write_text(out / REPORT, "\n".join(lines))


def _report_scores(
    out: Path, settings: DemoSettings, minutes: float, device: str, summary: dict, cases: int, total_seconds: float
) -> list[str]:
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else "CPU"
    tolerance = {target.name: target.tolerance_mm for target in PRESET.targets}
    return [
        "# flareseg demo",
        "",
        f"`flareseg demo --out {out} --minutes {minutes:g}`, {datetime.now():%Y-%m-%d %H:%M}, on {where} "
        f"({os.cpu_count()} CPU cores visible): {total_seconds / 60:.1f} min in all.",
        "",
        f"{settings.train_cases} synthetic CT phantoms trained a coarse BaseUNet ({_planned_size(out, 'coarse')}, "
        f"whole volume) and a fine EfficientSegNet ({_planned_size(out, 'fine')}, organ box), on the grids "
        f"`flareseg plan` chose for them (`{PLAN}/`, each at most {settings.coarse_size}^3 and "
        f"{settings.fine_size}^3 voxels); the predictor then segmented {cases} held-out phantoms. Organs: "
        f"{', '.join(ORGANS)} (left and right kidney as one label).",
        "",
        f"## Held-out phantoms: mean DSC {summary['mean']['dsc']:.4f}",
        "",
        "| organ | DSC | NSD | NSD tolerance |",
        "|---|---|---|---|",
        *(
            f"| {organ} | {entry['dsc']:.4f} | {entry['nsd']:.4f} | {tolerance[organ]:g} mm |"
            for organ, entry in summary["organs"].items()
        ),
        f"| **mean** | **{summary['mean']['dsc']:.4f}** | **{summary['mean']['nsd']:.4f}** | |",
        "",
        f"Means over the {summary['cases']} held-out cases of `evaluation/scores.csv` (per case and organ; the "
        "summary in `evaluation/scores.json`). Official FLARE21 protocol, as `flareseg evaluate --preset flare21`: "
        "NSD at 1 mm with the image spacing, strict at these phantoms' 2-4 mm voxels.",
        "",
    ]


def _report_sites(out: Path, scores: list[dict]) -> list[str]:
    """Mean DSC and NSD of the held-out cases of each phantom site (phantoms/sites.json)."""
    from flareseg.data.phantom import SITES, SITES_FILE

    site_of = json.loads((out / "phantoms" / SITES_FILE).read_text())
    lines = [
        "## Per site",
        "",
        "| site | contrast phase, kernel | held-out cases | mean DSC | mean NSD |",
        "|---|---|---|---|---|",
    ]
    for site in sorted({site_of[row["case"]] for row in scores}):
        rows = [row for row in scores if site_of[row["case"]] == site]
        setting = SITES[site]
        lines.append(
            f"| {site} | {setting.phase.replace('_', '-')}, {setting.kernel} | {len({row['case'] for row in rows})} | "
            f"{np.mean([row['dsc'] for row in rows]):.4f} | {np.mean([row['nsd'] for row in rows]):.4f} |"
        )
    return [
        *lines,
        "",
        "Every site also gave training cases (the sites take the cases in turn); `flareseg phantoms --list-sites` "
        "describes them (the demo keeps their contrast, kernel, noise, field of view and body, on its own voxel "
        "grid). Means over the site's held-out cases and organs.",
        "",
    ]


def _report_cases(
    out: Path, scores: list[dict], cases: list[str], timing_rows: list[dict], phases: dict[str, float]
) -> list[str]:
    from flareseg.io import read_image

    lines = [
        "## Per case",
        "",
        "| case | voxels (z, y, x) | spacing mm | "
        + " | ".join(f"DSC {organ}" for organ in ORGANS)
        + " | predict s | peak memory MB |",
        "|---|---|---|" + "---|" * len(ORGANS) + "---|---|",
    ]
    timing = {row["case"]: row for row in timing_rows}
    for case in cases:
        _, geometry = read_image(out / "predictions" / f"{case}.nii.gz")
        dsc = {row["organ"]: row["dsc"] for row in scores if row["case"] == case}
        row = timing[case]
        memory = row["peak_rss_mb"] + (f" (GPU {row['peak_gpu_mb']})" if row.get("peak_gpu_mb") else "")
        lines.append(
            f"| {case} | {' x '.join(map(str, geometry.shape))} | {' x '.join(f'{s:.2f}' for s in geometry.spacing)} "
            f"| {' | '.join(f'{dsc[organ]:.4f}' for organ in ORGANS)} | {float(row['seconds']):.2f} | {memory} |"
        )
    return [
        *lines,
        "",
        "Predict seconds and peak resident memory of the process per case from `predictions/timing.csv` (read, "
        "coarse, box, fine, post-processing and write, each in its own column there); the memory is that of the "
        "demo's process, which also trained the networks. The predict phase below also spent "
        f"{phases['predict'] - sum(float(row['seconds']) for row in timing_rows):.1f} s outside the cases, loading "
        "the two models (and compiling them, where the inference backend does).",
        "",
    ]


def _report_training(out: Path, settings: DemoSettings, histories: dict[str, list[dict]]) -> list[str]:
    networks = {"coarse": "BaseUNet", "fine": "EfficientSegNet"}
    sizes = {stage: _planned_size(out, stage) for stage in ("coarse", "fine")}
    lines = [
        "## Training",
        "",
        "| stage | network | input | epochs | samples | training s | best validation Dice |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage, history in histories.items():
        samples = len(history) * settings.steps_per_epoch * settings.batch_size
        best = max((r["val_dice_mean"] for r in history if r.get("val_dice_mean") is not None), default=None)
        lines.append(
            f"| {stage} | {networks[stage]} | {sizes[stage]} | {len(history)} | {samples} | "
            f"{sum(r['seconds'] for r in history):.0f} | {'-' if best is None else f'{best:.4f}'} |"
        )
    validation = _validation_cases(out)
    return [
        *lines,
        "",
        f"Validation: {len(validation)} of the {settings.train_cases} training phantoms (fold 0: "
        f"{', '.join(validation)}), Dice at threshold 0.5 on the prepared grid; the predictor uses each "
        "stage's best checkpoint.",
        "",
        *(f"![{stage} training curve]({stage}/training_curve.png)" for stage in histories),
        "",
    ]


def _report_settings(out: Path, settings: DemoSettings, minutes: float, device: str) -> list[str]:
    return [
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| `{key}` | {value} |" for key, value in _settings_rows(settings, minutes, device)),
        "",
        f"Fixed: the phantom labels mapped by `prepare.label_map` {LABEL_MAP} (both kidneys one label), fold 0 of "
        "a 5-fold split, Adam at a constant learning rate, no dropout, no per-organ HU shift augmentation, "
        "`train.workers=0`. Each stage's full resolved config is in `coarse/config.yaml` and `fine/config.yaml`; "
        "prepare's in `prepared/config.yaml`, the predictor's in `predictions/config.yaml`. To segment other images "
        f"with these networks: `sh predict.sh INPUT_DIR OUTPUT_DIR {out / PREDICT_CONFIG}` (trained on phantoms: "
        "they show the mechanics, not results on real scans).",
        "",
    ]


def _validation_cases(out: Path) -> list[str]:
    from flareseg.data.prepared import PreparedData

    return PreparedData(out / "prepared").fold(0)[1]


def _settings_rows(settings: DemoSettings, minutes: float, device: str) -> list[tuple[str, object]]:
    return [*asdict(settings).items(), ("minutes", minutes), ("device", device)]


def _read_scores(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [{**row, "dsc": float(row["dsc"]), "nsd": float(row["nsd"])} for row in csv.DictReader(handle)]


def _planned_size(out: Path, stage: str) -> str:
    """The network input (= grid) `flareseg plan` chose for `stage`, as "z x y x x"."""
    from flareseg.config import load_config

    return " x ".join(map(str, load_config(out / PLAN / f"{stage}.yaml").model.input_size))

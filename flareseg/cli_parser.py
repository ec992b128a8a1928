"""The `flareseg` command line: one parser per sub-command, and the flags several of them share.

Each sub-command names its handler (`run`): `flareseg.cli` runs `_run_<name>`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flareseg import __version__

DEBUG_ENV = "FLARESEG_DEBUG"  # 1: print the traceback of any error (the same as --debug)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flareseg", description="Fast coarse-to-fine abdominal CT segmentation.")
    parser.add_argument("--version", action="version", version=f"flareseg {__version__}")
    parser.add_argument("--debug", action="store_true", help=f"print the traceback of an error (also {DEBUG_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    flags = _SharedFlags()
    for add_command in (
        _add_plan,
        _add_prepare,
        _add_phantoms,
        _add_train,
        _add_predict,
        _add_pseudo_label,
        _add_overlay,
        _add_evaluate,
        _add_select_unlabeled,
        _add_summary,
        _add_export,
        _add_quantize,
        _add_demo,
        _add_show_config,
    ):
        add_command(commands, flags)
    for command in commands.choices.values():  # also after the command, as the stage scripts pass it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


class _SharedFlags:
    """The flags several sub-commands take, each defined once (argparse parent parsers)."""

    def __init__(self):
        self.config = argparse.ArgumentParser(add_help=False)
        self.config.add_argument("--config", type=Path, help="YAML config file (default: built-in defaults)")
        self.config.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one config key, e.g. --set prepare.workers=4 (repeatable)",
        )
        self.quiet = argparse.ArgumentParser(add_help=False)
        self.quiet.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        self.checkpoints = argparse.ArgumentParser(add_help=False)  # the trained stages a predictor runs
        self.checkpoints.add_argument(
            "--coarse", nargs="+", metavar="CKPT", help="coarse checkpoint; several: a fold ensemble (predict.coarse)"
        )
        self.checkpoints.add_argument(
            "--fine", nargs="+", metavar="CKPT", help="fine checkpoint; several: a fold ensemble (predict.fine)"
        )
        self.predictor = argparse.ArgumentParser(add_help=False, parents=[self.checkpoints])
        self.predictor.add_argument(
            "--stages",
            nargs="+",
            type=_checkpoint_group,
            metavar="CKPT",
            help="a chain instead: ROI checkpoint, then segmenters; A,B,C: one stage's fold ensemble (predict.stages)",
        )
        self.predictor.add_argument("--device", help="auto, cpu, cuda, cuda:N (predict.device)")
        self.predictor.add_argument(
            "--tta", choices=("none", "mirror"), help="mirror: average the flips the networks learned (predict.tta)"
        )


def _add_plan(commands, flags: _SharedFlags) -> None:
    plan = commands.add_parser(
        "plan", help="configure the coarse-to-fine pipeline from a dataset's fingerprint (a config folder)"
    )
    plan.add_argument("-i", "--images", type=Path, help="folder of <case>_0000 images")
    plan.add_argument("-l", "--labels", type=Path, help="folder of <case> label maps")
    plan.add_argument("-u", "--unlabeled", type=Path, help="folder of unlabeled <case>_0000 images")
    plan.add_argument(
        "-d", "--dataset", type=Path, help="a dataset root in nnU-Net v2, Decathlon or FLARE layout (instead of -i/-l)"
    )
    plan.add_argument("-o", "--out", type=Path, required=True, help="the config folder to write")
    plan.add_argument("--work-dir", type=Path, help="prepared data and trained stages go here (default: OUT/work)")
    plan.add_argument("--label-names", type=_name_list, help="names of label ids 1..N, e.g. liver,kidney")
    plan.add_argument("--gpu-memory-gb", type=float, help="GPU memory the training may use (default 24)")
    plan.add_argument("-w", "--workers", type=_positive_int, default=2, help="worker processes (default 2)")
    plan.set_defaults(run="plan")


def _add_prepare(commands, flags: _SharedFlags) -> None:
    prepare = commands.add_parser(
        "prepare", parents=[flags.config, flags.quiet], help="prepare arrays and the LMDB index"
    )
    prepare.add_argument("-i", "--images", help="folder of <case>_0000 images (prepare.images)")
    prepare.add_argument("-l", "--labels", help="folder of <case> label maps (prepare.labels)")
    prepare.add_argument("-u", "--unlabeled", help="folder of unlabeled <case>_0000 images (prepare.unlabeled)")
    prepare.add_argument(
        "-d",
        "--dataset",
        help="a dataset root (nnU-Net v2, Decathlon, FLARE layout) instead of -i/-l (prepare.dataset)",
    )
    prepare.add_argument("-o", "--out", help="output folder (prepare.out)")
    prepare.add_argument("-w", "--workers", type=int, help="worker processes (prepare.workers)")
    prepare.add_argument("--overwrite", action="store_true", default=None, help="redo every case (prepare.overwrite)")
    prepare.set_defaults(run="prepare")


def _add_phantoms(commands, flags: _SharedFlags) -> None:
    # flareseg.data.phantom.SITES's names, spelled here so that the parser imports no numpy (a test compares them)
    sites = (
        "portal_venous",
        "arterial_sharp",
        "non_contrast_lowdose",
        "delayed_large",
        "portal_venous_metal",
        "portal_venous_thick",
    )
    phantoms = commands.add_parser("phantoms", help="write a synthetic CT phantom dataset (imagesTr/, labelsTr/)")
    phantoms.add_argument("-o", "--out", type=Path, help="output folder (required unless --list-sites)")
    phantoms.add_argument("-n", "--num-cases", type=int, default=8, help="labeled cases (default 8)")
    phantoms.add_argument("--unlabeled", type=int, default=0, help="extra unlabeled cases in unlabeled/")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="voxels (default: realistic)")
    phantoms.add_argument("--lesions", action="store_true", help="add lesions (label 14)")
    phantoms.add_argument("--partial", action="store_true", help="keep only some organs annotated")
    phantoms.add_argument("--orientation", default="random", choices=("identity", "ras", "random", "oblique"))
    phantoms.add_argument(
        "--site",
        choices=sites,
        help="scanner / protocol / contrast phase settings; cases are named <site>_000... (default: the reference "
        "generator, phantom_000...)",
    )
    phantoms.add_argument("--list-sites", action="store_true", help="print the sites and what each sets, then exit")
    phantoms.set_defaults(run="phantoms")


def _add_train(commands, flags: _SharedFlags) -> None:
    train = commands.add_parser(
        "train", parents=[flags.config], help="train one stage (coarse or fine); torchrun-aware"
    )
    train.add_argument("--device", help="auto, cpu, cuda, cuda:N (train.device)")
    train.set_defaults(run="train")


def _add_predict(commands, flags: _SharedFlags) -> None:
    predict = commands.add_parser(
        "predict", parents=[flags.config, flags.predictor, flags.quiet], help="segment every image of a folder"
    )
    predict.add_argument("-i", "--input", type=Path, required=True, help="folder of <case>_0000 images or DICOM series")
    predict.add_argument("-o", "--output", type=Path, required=True, help="folder for <case> label maps")
    predict.add_argument(
        "--png", action="store_true", default=None, help="also write <case>.png overlays (predict.png)"
    )
    predict.add_argument(
        "--output-format",
        nargs="+",
        choices=("nifti", "dicom-seg", "rtstruct"),
        help="what to write per case (predict.output_format; DICOM ones from DICOM series input)",
    )
    predict.add_argument(
        "--statistics",
        action="store_true",
        default=None,
        help="also per-label volume, HU and position: <case>_statistics.json, statistics.csv (predict.statistics)",
    )
    predict.add_argument(
        "--labels", type=_label_list, help="write only these labels, e.g. liver,spleen or 1,3 (predict.labels)"
    )
    predict.add_argument(
        "--overwrite", action="store_true", default=None, help="predict cases whose outputs exist (predict.overwrite)"
    )
    predict.add_argument("--part", type=int, default=0, help="this process's shard, 0..PARTS-1 (default 0)")
    predict.add_argument("--parts", type=_positive_int, default=1, help="shards the folder is split into (default 1)")
    predict.set_defaults(run="predict")


def _add_pseudo_label(commands, flags: _SharedFlags) -> None:
    pseudo = commands.add_parser(
        "pseudo-label",
        parents=[flags.config, flags.predictor, flags.quiet],
        help="fill the organs that partial labels lack with a teacher's labels (the teacher: --coarse/--fine/--stages)",
    )
    pseudo.add_argument("-i", "--images", type=Path, required=True, metavar="DIR", help="<case>_0000 images")
    pseudo.add_argument("-l", "--labels", type=Path, required=True, metavar="DIR", help="<case> partial label maps")
    pseudo.add_argument("-o", "--out", type=Path, required=True, metavar="DIR", help="fused label maps, annotated.json")
    pseudo.add_argument(
        "--annotated", type=Path, metavar="FILE.json", help="{case: [label ids]} (default: LABELS/annotated.json)"
    )
    pseudo.set_defaults(run="pseudo_label")


def _add_overlay(commands, flags: _SharedFlags) -> None:
    overlay = commands.add_parser("overlay", help="PNG of axial and coronal slices with label contours")
    overlay.add_argument("--image", type=Path, required=True, help="CT image file or DICOM folder")
    overlay.add_argument("--label", type=Path, required=True, help="label map on the image's grid (e.g. a prediction)")
    overlay.add_argument("--gt", type=Path, help="ground-truth label map, drawn dashed")
    overlay.add_argument("-o", "--out", type=Path, required=True, help="output .png")
    overlay.set_defaults(run="overlay")


def _add_evaluate(commands, flags: _SharedFlags) -> None:
    evaluate = commands.add_parser("evaluate", help="Dice and NSD (FLARE protocol), HD95, HD of predicted label maps")
    evaluate.add_argument("--gt", type=Path, required=True, metavar="DIR", help="ground-truth <case>.nii.gz files")
    evaluate.add_argument("--pred", type=Path, required=True, metavar="DIR", help="predicted <case>.nii.gz files")
    evaluate.add_argument("--out", type=Path, required=True, metavar="FILE.csv", help="per-case CSV (+ summary .json)")
    evaluate.add_argument(
        "--preset",
        default="flare22",
        choices=("flare22", "flare23", "flare21", "lesion"),
        help="flare22: 13 organs; flare23: and lesions apart; flare21: 4 organs at 1 mm; lesion: label 14 only",
    )
    evaluate.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    evaluate.add_argument(
        "--metrics",
        nargs="+",
        default=["dsc", "nsd"],
        choices=("dsc", "nsd", "hd95", "hd"),
        help="CSV columns and summary (default dsc nsd); hd95, hd: Hausdorff distances in mm, empty if one mask is",
    )
    evaluate.set_defaults(run="evaluate")


def _add_select_unlabeled(commands, flags: _SharedFlags) -> None:
    uif = commands.add_parser(
        "select-unlabeled",
        parents=[flags.config, flags.checkpoints, flags.quiet],
        help="rank unlabeled cases by reliability (UIF; --fine is the final fine checkpoint)",
    )
    uif.add_argument("-i", "--images", type=Path, required=True, help="folder of unlabeled <case>_0000 images")
    uif.add_argument("-o", "--out", type=Path, required=True, help="output JSON (selected cases and every score)")
    uif.add_argument("--intermediate", nargs="+", required=True, help="intermediate fine checkpoints")
    uif.add_argument("--threshold", type=float, default=0.9, help="keep cases scoring above this (default 0.9)")
    uif.add_argument("--top", type=int, help="keep at most this many, most reliable first")
    uif.add_argument("--expected", type=int, nargs="+", help="label ids every kept case must show (default: all)")
    uif.set_defaults(run="select_unlabeled")


def _add_summary(commands, flags: _SharedFlags) -> None:
    summary = commands.add_parser(
        "summary", parents=[flags.config], help="parameters, multiply-adds, forward time, memory"
    )
    summary.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    summary.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    summary.add_argument("--repeats", type=_positive_int, default=3, help="timed forward passes (median reported)")
    summary.set_defaults(run="summary")


def _add_export(commands, flags: _SharedFlags) -> None:
    export = commands.add_parser("export", parents=[flags.config], help="write the model as TorchScript and/or ONNX")
    export.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    export.add_argument("--weights", type=Path, help="state dict or checkpoint to load (default: random init)")
    export.add_argument("--format", nargs="+", default=["torchscript", "onnx"], choices=("torchscript", "onnx"))
    export.set_defaults(run="export")


def _add_quantize(commands, flags: _SharedFlags) -> None:
    quantize = commands.add_parser(
        "quantize",
        parents=[flags.quiet],
        help="int8 models of trained stages for the OpenVINO CPU backend (NNCF), with their accuracy check",
    )
    quantize.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT", help="stage checkpoint(s)")
    quantize.add_argument(
        "--data", type=Path, help="the prepared folder to calibrate and check on (default: each checkpoint's)"
    )
    quantize.add_argument(
        "--samples", type=_positive_int, default=300, help="calibration inputs drawn by the training sampler"
    )
    quantize.add_argument("--threads", type=_positive_int, help="CPU threads for the check (default: all cores)")
    quantize.set_defaults(run="quantize")


def _add_demo(commands, flags: _SharedFlags) -> None:
    demo = commands.add_parser(
        "demo",
        parents=[flags.quiet],
        help="the whole pipeline on synthetic phantoms: prepare, train, predict, evaluate, report (no data)",
    )
    demo.add_argument("--out", type=Path, default=Path("flareseg_demo"), help="output folder (default ./flareseg_demo)")
    demo.add_argument(
        "--minutes", type=float, default=10.0, help="total wall time to aim for; training gets what the rest leaves"
    )
    demo.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto (CUDA if present)")
    demo.set_defaults(run="demo")


def _add_show_config(commands, flags: _SharedFlags) -> None:
    show = commands.add_parser("config", parents=[flags.config], help="print the resolved config as YAML")
    show.set_defaults(run="show_config")


def _checkpoint_group(text: str) -> str | list[str]:
    """A --stages item: one checkpoint, or a stage's fold ensemble as CKPT,CKPT,... (a list of paths)."""
    members = [item.strip() for item in text.split(",")]
    if not all(members):
        raise argparse.ArgumentTypeError(f"expects a checkpoint or checkpoints separated by commas, got {text!r}")
    return members[0] if len(members) == 1 else members


def _label_list(text: str) -> list[str | int]:
    """`liver,spleen` or `1,3` (or both): label names and ids."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expects label names or ids separated by commas, got {text!r}")
    return [int(item) if item.isdigit() else item for item in items]


def _name_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, e.g. liver,kidney; got {text!r}")
    return names


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value

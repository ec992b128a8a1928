"""The `flareseg` command: one sub-command per stage, each a thin layer over a library function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import yaml

from flareseg import __version__
from flareseg.config import Config, ConfigError, load_config, set_value, to_plain

DEBUG_ENV = "FLARESEG_DEBUG"  # 1: print the traceback of any error (the same as --debug)
# A user's mistake (a wrong path, a file that is no image, a bad setting, a folder in use): one line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    """The `flareseg` command. Exit status: 0 done, 1 some case failed (or an unexpected error), 2 a usage error,
    130 interrupted. Errors are one line on stderr; --debug or FLARESEG_DEBUG=1 adds the traceback."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if not getattr(args, "quiet", False) else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.run(args)
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - the one place that turns errors into a line
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        line, status = _error_line(error)
        print(f"flareseg {args.command}: {line}", file=sys.stderr)
        return status


def _error_line(error: BaseException) -> tuple[str, int]:
    """One line for the user and the exit status, by the kind of error."""
    from flareseg.locks import FolderBusyError

    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())[:1000]
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(error, ConfigError):
        return f"config error: {message}", 2
    if isinstance(error, (*USER_ERRORS, FolderBusyError)) and message:
        return message, 2
    if isinstance(error, OSError) and message:  # the system's failure (disk full, I/O error), not flareseg's
        return message, 1
    return f"unexpected error: {type(error).__name__}: {message} (rerun with --debug for the traceback)", 1


def run_stage(command: str, default_config: Path, argv: Sequence[str] | None = None) -> int:
    """A stage folder's run.py: `flareseg COMMAND` with the stage's default config unless --config is given."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(arg == "--config" or arg.startswith("--config=") for arg in args):
        args = ["--config", str(default_config), *args]
    return main([command, *args])


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flareseg", description="Fast coarse-to-fine abdominal CT segmentation.")
    parser.add_argument("--version", action="version", version=f"flareseg {__version__}")
    parser.add_argument("--debug", action="store_true", help=f"print the traceback of an error (also {DEBUG_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    flags = _SharedFlags()
    for add_command in (
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
        self.checkpoints.add_argument("--coarse", metavar="CKPT", help="coarse checkpoint (predict.coarse)")
        self.checkpoints.add_argument("--fine", metavar="CKPT", help="fine checkpoint (predict.fine)")
        self.predictor = argparse.ArgumentParser(add_help=False, parents=[self.checkpoints])
        self.predictor.add_argument(
            "--stages",
            nargs="+",
            metavar="CKPT",
            help="a chain instead: ROI checkpoint, then segmenters (predict.stages)",
        )
        self.predictor.add_argument("--device", help="auto, cpu, cuda, cuda:N (predict.device)")


def _add_prepare(commands, flags: _SharedFlags) -> None:
    prepare = commands.add_parser(
        "prepare", parents=[flags.config, flags.quiet], help="prepare arrays and the LMDB index"
    )
    prepare.add_argument("-i", "--images", help="folder of <case>_0000 images (prepare.images)")
    prepare.add_argument("-l", "--labels", help="folder of <case> label maps (prepare.labels)")
    prepare.add_argument("-u", "--unlabeled", help="folder of unlabeled <case>_0000 images (prepare.unlabeled)")
    prepare.add_argument("-o", "--out", help="output folder (prepare.out)")
    prepare.add_argument("-w", "--workers", type=int, help="worker processes (prepare.workers)")
    prepare.add_argument("--overwrite", action="store_true", default=None, help="redo every case (prepare.overwrite)")
    prepare.set_defaults(run=_run_prepare)


def _add_phantoms(commands, flags: _SharedFlags) -> None:
    phantoms = commands.add_parser("phantoms", help="write a synthetic CT phantom dataset (imagesTr/, labelsTr/)")
    phantoms.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    phantoms.add_argument("-n", "--num-cases", type=int, default=8, help="labeled cases (default 8)")
    phantoms.add_argument("--unlabeled", type=int, default=0, help="extra unlabeled cases in unlabeled/")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="voxels (default: realistic)")
    phantoms.add_argument("--lesions", action="store_true", help="add lesions (label 14)")
    phantoms.add_argument("--partial", action="store_true", help="keep only some organs annotated")
    phantoms.add_argument("--orientation", default="random", choices=("identity", "ras", "random", "oblique"))
    phantoms.set_defaults(run=_run_phantoms)


def _add_train(commands, flags: _SharedFlags) -> None:
    train = commands.add_parser(
        "train", parents=[flags.config], help="train one stage (coarse or fine); torchrun-aware"
    )
    train.add_argument("--device", help="auto, cpu, cuda, cuda:N (train.device)")
    train.set_defaults(run=_run_train)


def _add_predict(commands, flags: _SharedFlags) -> None:
    predict = commands.add_parser(
        "predict", parents=[flags.config, flags.predictor, flags.quiet], help="segment every image of a folder"
    )
    predict.add_argument("-i", "--input", type=Path, required=True, help="folder of <case>_0000 images or DICOM series")
    predict.add_argument("-o", "--output", type=Path, required=True, help="folder for <case> label maps")
    predict.add_argument(
        "--png", action="store_true", default=None, help="also write <case>.png overlays (predict.png)"
    )
    predict.set_defaults(run=_run_predict)


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
    pseudo.set_defaults(run=_run_pseudo_label)


def _add_overlay(commands, flags: _SharedFlags) -> None:
    overlay = commands.add_parser("overlay", help="PNG of axial and coronal slices with label contours")
    overlay.add_argument("--image", type=Path, required=True, help="CT image file or DICOM folder")
    overlay.add_argument("--label", type=Path, required=True, help="label map on the image's grid (e.g. a prediction)")
    overlay.add_argument("--gt", type=Path, help="ground-truth label map, drawn dashed")
    overlay.add_argument("-o", "--out", type=Path, required=True, help="output .png")
    overlay.set_defaults(run=_run_overlay)


def _add_evaluate(commands, flags: _SharedFlags) -> None:
    evaluate = commands.add_parser("evaluate", help="Dice and NSD of predicted label maps (FLARE protocol)")
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
    evaluate.set_defaults(run=_run_evaluate)


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
    uif.set_defaults(run=_run_select_unlabeled)


def _add_summary(commands, flags: _SharedFlags) -> None:
    summary = commands.add_parser(
        "summary", parents=[flags.config], help="parameters, multiply-adds, forward time, memory"
    )
    summary.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    summary.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    summary.add_argument("--repeats", type=_positive_int, default=3, help="timed forward passes (median reported)")
    summary.set_defaults(run=_run_summary)


def _add_export(commands, flags: _SharedFlags) -> None:
    export = commands.add_parser("export", parents=[flags.config], help="write the model as TorchScript and/or ONNX")
    export.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    export.add_argument("--weights", type=Path, help="state dict or checkpoint to load (default: random init)")
    export.add_argument("--format", nargs="+", default=["torchscript", "onnx"], choices=("torchscript", "onnx"))
    export.set_defaults(run=_run_export)


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
    demo.set_defaults(run=_run_demo)


def _add_show_config(commands, flags: _SharedFlags) -> None:
    show = commands.add_parser("config", parents=[flags.config], help="print the resolved config as YAML")
    show.set_defaults(run=_run_show_config)


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _config_from(args: argparse.Namespace, flags: dict[str, object]) -> Config:
    """YAML, then --set overrides, then explicit command-line flags (the most specific wins)."""
    config = load_config(args.config, args.overrides)
    for key, value in flags.items():
        if value is not None:
            set_value(config, key, value, Path.cwd())
    return config.validate()


def _run_prepare(args: argparse.Namespace) -> int:
    from flareseg.data.prepare import FAILURES_FILE, prepare_dataset

    config = _config_from(
        args,
        {
            "prepare.images": args.images,
            "prepare.labels": args.labels,
            "prepare.unlabeled": args.unlabeled,
            "prepare.out": args.out,
            "prepare.workers": args.workers,
            "prepare.overwrite": args.overwrite,
        },
    )
    summary = prepare_dataset(config, progress=not args.quiet)
    print(
        f"prepared {len(summary.prepared)}, already done {len(summary.skipped)}, removed {len(summary.removed)}, "
        f"failed {len(summary.failed)} in {summary.seconds:.1f} s -> {summary.out_dir}"
    )
    if summary.failed:
        print(f"failed cases are listed in {summary.out_dir / FAILURES_FILE}", file=sys.stderr)
    return 0 if summary.ok else 1


def _run_phantoms(args: argparse.Namespace) -> int:
    from flareseg.data.phantom import write_phantom_dataset

    cases = write_phantom_dataset(
        args.out,
        args.num_cases,
        seed=args.seed,
        shape=tuple(args.shape) if args.shape else None,
        lesions=args.lesions,
        partial=args.partial,
        orientation=args.orientation,
        unlabeled=args.unlabeled,
    )
    print(f"wrote {len(cases)} labeled and {args.unlabeled} unlabeled phantoms to {args.out}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from flareseg.engine.run import train

    train(_config_from(args, {"train.device": args.device}))
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from flareseg.inference.batch import TIMING_FILE, predict_folder

    flags = {"predict.coarse": args.coarse, "predict.fine": args.fine, "predict.device": args.device}
    config = _config_from(args, {**flags, "predict.stages": args.stages, "predict.png": args.png})
    summary = predict_folder(config, args.input, args.output, progress=not args.quiet)
    print(
        f"predicted {len(summary.predicted)}, failed {len(summary.failed)} -> {args.output} "
        f"(time and memory per case in {TIMING_FILE})"
    )
    return 0 if summary.ok else 1


def _run_pseudo_label(args: argparse.Namespace) -> int:
    from flareseg.data.cases import default_annotated_file
    from flareseg.semi import ANNOTATED_FILE, REPORT_FILE, pseudo_label_folder, read_annotated_file

    flags = {"predict.coarse": args.coarse, "predict.fine": args.fine, "predict.device": args.device}
    config = _config_from(args, {**flags, "predict.stages": args.stages})
    annotated_file = args.annotated or default_annotated_file(args.labels)
    annotated = read_annotated_file(annotated_file) if annotated_file is not None else None
    summary = pseudo_label_folder(args.images, args.labels, args.out, config.predict, annotated, not args.quiet)
    print(
        f"pseudo-labelled {len(summary.written)}, skipped {len(summary.skipped)}, failed {len(summary.failed)} "
        f"-> {args.out} (per case in {REPORT_FILE}, annotated ids in {ANNOTATED_FILE})"
    )
    return summary.exit_code


def _run_overlay(args: argparse.Namespace) -> int:
    from flareseg.io import read_image
    from flareseg.visualize import check_picture_path, overlay_png

    check_picture_path(args.out)
    image, geometry = read_image(args.image)
    label, label_geometry = read_image(args.label)
    truth = None
    if args.gt is not None:
        truth, truth_geometry = read_image(args.gt)
        if not truth_geometry.same_grid(geometry, atol=1e-3):
            print(f"flareseg overlay: {args.gt} is not on the grid of {args.image}", file=sys.stderr)
            return 2
    if not label_geometry.same_grid(geometry, atol=1e-3):
        print(f"flareseg overlay: {args.label} is not on the grid of {args.image}", file=sys.stderr)
        return 2
    print(f"wrote {overlay_png(image, geometry, label, args.out, truth)}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from flareseg.evaluation import evaluate_folder, format_summary

    _, summary = evaluate_folder(args.gt, args.pred, preset=args.preset, workers=args.workers, out=args.out)
    print(format_summary(summary))
    print(f"{summary['cases']} cases -> {args.out} and {args.out.with_suffix('.json')}")
    if summary["missing_predictions"]:
        print(f"missing predictions (scored as empty): {', '.join(summary['missing_predictions'])}", file=sys.stderr)
    for case, error in summary["failures"].items():
        print(f"failed: {case}: {error}", file=sys.stderr)
    return 1 if summary["failures"] else 0


def _run_select_unlabeled(args: argparse.Namespace) -> int:
    from flareseg.semi.reliability import select_unlabeled

    config = _config_from(args, {"predict.coarse": args.coarse, "predict.fine": args.fine})
    result = select_unlabeled(
        args.images,
        config.predict,
        args.intermediate,
        args.out,
        args.threshold,
        args.top,
        args.expected,
        progress=not args.quiet,
    )
    print(f"selected {len(result.selected)} of {len(result.scores)} cases -> {args.out}")
    return 0 if not result.failed else 1


def _run_summary(args: argparse.Namespace) -> int:
    from flareseg.models.runtime import resolve_device
    from flareseg.models.summary import summarize

    config = load_config(args.config, args.overrides)
    print("\n".join(summarize(config, resolve_device(args.device), args.precision, args.repeats).lines()))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    import torch

    from flareseg.checkpoint import load_checkpoint, load_weights
    from flareseg.config import save_config
    from flareseg.models import build_model
    from flareseg.models.export import export_onnx, export_torchscript
    from flareseg.stage import TrainedStage

    config = load_config(args.config, args.overrides)
    model = build_model(config).eval()
    if args.weights is not None:
        what = "'--weights': checkpoint"
        state = load_checkpoint(args.weights, what)
        if isinstance(state.get("config"), dict):  # a flareseg checkpoint: its own network, input size and config
            stage = TrainedStage.from_state(args.weights, state, what)
            config, model = stage.config, stage.network()
        else:  # a state dict, or a checkpoint of weights only: into the network the config describes
            load_weights(model, state.get("model", state), f"{what} {args.weights}")
    example = torch.randn(1, config.model.in_channels, *config.model.input_size)
    save_config(config, args.out)
    for kind in args.format:
        write = export_torchscript if kind == "torchscript" else export_onnx
        path = write(model, example, args.out / f"{config.model.name}.{'pt' if kind == 'torchscript' else 'onnx'}")
        print(f"wrote {path}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from flareseg.demo import DemoError, run_demo

    try:
        run_demo(args.out, args.minutes, device=args.device, progress=not args.quiet)
    except DemoError as error:
        print(f"flareseg demo: {error}", file=sys.stderr)
        return 2
    return 0


def _run_show_config(args: argparse.Namespace) -> int:
    print(yaml.safe_dump(to_plain(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

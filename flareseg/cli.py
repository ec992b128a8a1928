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

from flareseg.cli_parser import DEBUG_ENV, build_parser
from flareseg.config import Config, ConfigError, load_config, set_value, to_plain

# A user's mistake (a wrong path, a file that is no image, a bad setting, a folder in use): one line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    """The `flareseg` command. Exit status: 0 done, 1 some case failed (or an unexpected error), 2 a usage error,
    130 interrupted. Errors are one line on stderr; --debug or FLARESEG_DEBUG=1 adds the traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if not getattr(args, "quiet", False) else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return globals()[f"_run_{args.run}"](args)  # the handler the sub-command names (cli_parser)
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


def _config_from(args: argparse.Namespace, flags: dict[str, object]) -> Config:
    """YAML, then --set overrides, then explicit command-line flags (the most specific wins)."""
    config = load_config(args.config, args.overrides)
    if getattr(args, "dataset", None) is not None and args.run == "prepare":
        config.prepare.images = config.prepare.labels = None  # -d replaces the folders a config names (-i/-l may not)
    for key, value in flags.items():
        if value is not None:
            set_value(config, key, value, Path.cwd())
    return config.validate()


def _run_plan(args: argparse.Namespace) -> int:
    from flareseg.planning import DEFAULT_GPU_MEMORY_GB, plan_dataset

    result = plan_dataset(
        args.out,
        images=args.images,
        labels=args.labels,
        unlabeled=args.unlabeled,
        dataset=args.dataset,
        work=args.work_dir,
        label_names=args.label_names,
        gpu_memory_gb=args.gpu_memory_gb or DEFAULT_GPU_MEMORY_GB,
        workers=args.workers,
    )
    for decision in result.plan.decisions:
        print(f"{decision.key}: {decision.value}")
    failed = len(result.fingerprint.failed)
    print(
        f"planned from {len(result.fingerprint.cases)} cases ({failed} left out) -> {args.out} "
        f"({', '.join(path.name for path in result.configs)}, {result.fingerprint_file.name})"
    )
    return 0 if not failed else 1


def _checkpoint_flags(args: argparse.Namespace) -> dict[str, object]:
    """--coarse and --fine (nargs="+"): one checkpoint as itself, several as a fold ensemble's list."""
    return {
        f"predict.{key}": value[0] if value is not None and len(value) == 1 else value
        for key, value in (("coarse", args.coarse), ("fine", args.fine))
    }


def _run_prepare(args: argparse.Namespace) -> int:
    from flareseg.data.prepare import FAILURES_FILE, prepare_dataset

    config = _config_from(
        args,
        {
            "prepare.dataset": args.dataset,
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
    from flareseg.data.phantom import sites_table, write_phantom_dataset

    if args.list_sites:
        print(sites_table())
        return 0
    if args.out is None:
        raise ValueError("the following arguments are required: -o/--out (or --list-sites)")
    cases = write_phantom_dataset(
        args.out,
        args.num_cases,
        seed=args.seed,
        shape=tuple(args.shape) if args.shape else None,
        lesions=args.lesions,
        partial=args.partial,
        orientation=args.orientation,
        unlabeled=args.unlabeled,
        site=args.site,
    )
    site = f" of site {args.site}" if args.site else ""
    print(f"wrote {len(cases)} labeled and {args.unlabeled} unlabeled phantoms{site} to {args.out}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from flareseg.engine.run import train

    train(_config_from(args, {"train.device": args.device}))
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from flareseg.inference.batch import predict_folder

    flags = {**_checkpoint_flags(args), "predict.device": args.device, "predict.tta": args.tta}
    flags |= {"predict.stages": args.stages, "predict.png": args.png, "predict.output_format": args.output_format}
    flags |= {"predict.statistics": args.statistics, "predict.labels": args.labels, "predict.overwrite": args.overwrite}
    config = _config_from(args, flags)
    summary = predict_folder(config, args.input, args.output, progress=not args.quiet, part=args.part, parts=args.parts)
    done = f", already done {len(summary.done_before)}" if summary.done_before else ""
    print(
        f"predicted {len(summary.predicted)}{done}, failed {len(summary.failed)} in {summary.seconds:.1f} s "
        f"({summary.cases_per_hour:.0f} cases/hour) -> {args.output} (time and memory per case in "
        f"{summary.timing_file.name})"
    )
    return 0 if summary.ok else 1


def _run_pseudo_label(args: argparse.Namespace) -> int:
    from flareseg.data.cases import default_annotated_file
    from flareseg.semi import ANNOTATED_FILE, REPORT_FILE, pseudo_label_folder, read_annotated_file

    flags = {**_checkpoint_flags(args), "predict.device": args.device, "predict.tta": args.tta}
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

    _, summary = evaluate_folder(
        args.gt, args.pred, preset=args.preset, workers=args.workers, out=args.out, metrics=args.metrics
    )
    print(format_summary(summary))
    print(f"{summary['cases']} cases -> {args.out} and {args.out.with_suffix('.json')}")
    if summary["missing_predictions"]:
        print(f"missing predictions (scored as empty): {', '.join(summary['missing_predictions'])}", file=sys.stderr)
    for case, error in summary["failures"].items():
        print(f"failed: {case}: {error}", file=sys.stderr)
    return 1 if summary["failures"] else 0


def _run_select_unlabeled(args: argparse.Namespace) -> int:
    from flareseg.semi.reliability import select_unlabeled

    config = _config_from(args, _checkpoint_flags(args))
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


def _run_quantize(args: argparse.Namespace) -> int:
    from flareseg.inference.quantize import describe, quantize_checkpoint

    for checkpoint in args.checkpoints:
        print(describe(checkpoint, quantize_checkpoint(checkpoint, args.data, args.samples, args.threads)))
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

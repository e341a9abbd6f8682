"""Command line: ``asyncflow run``, ``demo`` and ``flame`` over the same pipeline, ``stats`` and
``monitor`` over what runs leave.

Exit codes: 0 every case done, 1 some cases failed, 2 usage or request error, 3 internal error,
130 interrupted, 141 the reader of the output went away.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .backends import ModelError, ModelInfo
from .inputs import RequestError
from .journal import OutputFolder
from .labels import LabelError
from .log import configure_logging
from .pipeline import run_request_sync
from .progress import ProgressDisplay
from .result import Result
from .settings import Settings, SettingsError, packaged_demo_model
from .statistics import statistics_csv

__all__ = ["main"]

EXIT_DONE, EXIT_SOME_FAILED, EXIT_ERROR, EXIT_INTERNAL = 0, 1, 2, 3


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        help="trained model folder: v2 <task>/<trainer>__<plans>__<config> (dataset.json, plans.json, "
        "fold_N/), v1 nnUNet/<config>/<task>/<trainer>__<plans> (plans.pkl, fold_N/); "
        "default: found from --results-folder and --task",
    )
    parser.add_argument(
        "--multi-modal", action="store_true", default=None, help="<id>_0000, _0001... form one case"
    )


def _add_seg_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DICOM SEG")
    group.add_argument(
        "--labels",
        type=Path,
        dest="label_config",
        metavar="FILE",
        help="JSON/YAML label names, codes, colours per label value (see README)",
    )
    group.add_argument(
        "--seg-type",
        choices=["BINARY", "FRACTIONAL", "LABELMAP"],
        type=str.upper,
        help="segmentation type (default BINARY; LABELMAP is new and not every reader knows it)",
    )
    group.add_argument(
        "--keep-empty-frames",
        action="store_true",
        default=None,
        dest="seg_keep_empty_frames",
        help="a frame for every slice and segment, for viewers that need them",
    )
    group.add_argument(
        "--seg-compression",
        choices=["none", "rle", "jpeg2000", "jpegls"],
        help="lossless frame compression, FRACTIONAL/LABELMAP only (default none: every reader opens it)",
    )
    group.add_argument(
        "--deidentify",
        choices=["none", "basic"],
        help="basic: DICOM PS3.15's Basic Profile with the Retain UIDs Option on every SEG "
        "(default none here; the FLAME analyzer's default is basic)",
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--backend",
        choices=["auto", "v1", "v2"],
        help="nnU-Net generation: v2 in process, v1 through nnUNet_predict (default auto: by the model's files)",
    )
    group.add_argument(
        "--results-folder",
        type=Path,
        help="$nnUNet_results (v2) or $RESULTS_FOLDER (v1), searched with --task",
    )
    group.add_argument("--task", dest="task_name", help="$TASK_NAME: dataset/task folder name (v1: or id)")
    group.add_argument("--trainer", help="default: nnUNetTrainer (v2), nnUNetTrainerV2 (v1)")
    group.add_argument("--plans", help="default: nnUNetPlans (v2), nnUNetPlansv2.1 (v1)")
    group.add_argument("--configuration", help="default: 3d_fullres")
    group.add_argument(
        "--folds", help="folds to ensemble, comma-separated, e.g. 0,1,2 (default: every fold_N found)"
    )
    group.add_argument("--checkpoint", help="default: checkpoint_final.pth (v2), model_final_checkpoint (v1)")
    _add_run_options(parser)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """How the model runs, and the request's logs: for run, flame and demo alike."""
    group = parser.add_argument_group("prediction")
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto: cuda when available)")
    group.add_argument(
        "--devices", help="one prediction worker per device, comma-separated (e.g. cuda:0,cuda:1)"
    )
    group.add_argument("--tile-step", type=float, dest="tile_step_size", help="sliding-window step (0.5)")
    group.add_argument(
        "--no-mirroring",
        action="store_false",
        dest="use_mirroring",
        default=None,
        help="disable mirroring TTA",
    )
    group.add_argument("--threads", type=int, dest="torch_threads", help="torch CPU threads")
    parser.add_argument(
        "--work-dir", type=Path, help="parent folder of temporary files (default: system temp)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="settings",
        metavar="NAME=VALUE",
        help="any other setting, e.g. --set max_archive_bytes=2e11 (README lists them)",
    )
    parser.add_argument("--json-logs", action="store_true", help="JSON lines (default when not on a TTY)")
    parser.add_argument(
        "--log-file", type=Path, help="append every event (info and above) to this file as JSON lines"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no log lines but errors (the progress line stays)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line")


def _add_statistics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--min-cases",
        type=int,
        default=5,
        help="a node (or report) or figure with fewer cases sends only its count (default 5)",
    )
    parser.add_argument(
        "--epsilon", type=float, help="differential privacy: Laplace noise on each node's numbers (OpenDP)"
    )
    parser.add_argument(
        "--bounds",
        action="append",
        default=[],
        metavar="[LABEL.]FIGURE=LOW,HIGH,BINS",
        help="clip bounds and histogram bins of a figure, e.g. tumor.volume_ml=0,200,100; repeatable",
    )


def _bounds(args: argparse.Namespace) -> dict[str, list[str]]:
    pairs = [item.partition("=") for item in args.bounds]
    if any(not sep or value.count(",") != 2 for _, sep, value in pairs):
        raise SettingsError("--bounds takes [LABEL.]FIGURE=LOW,HIGH,BINS, e.g. volume_ml=0,3000,60")
    return {name: value.split(",") for name, _, value in pairs}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncflow",
        description="nnU-Net segmentation of DICOM and NIfTI: asyncflow run, demo, flame, stats, monitor.",
    )
    parser.add_argument("--version", action="version", version=f"asyncflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="segment files, folders and archives")
    run.add_argument(
        "inputs",
        nargs="*",
        type=Path,
        metavar="INPUT",
        help="files, folders or TAR archives (default: $nnUNet_input)",
    )
    run.add_argument(
        "-o", "--output", type=Path, help="folder for SEG/NIfTI outputs and report (default: $nnUNet_output)"
    )
    output_rules = run.add_mutually_exclusive_group()
    output_rules.add_argument(
        "--resume",
        action="store_true",
        help="go on with the output folder of an earlier run of these inputs: cases it finished "
        "with the same content, model and settings are kept, the rest is done",
    )
    output_rules.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a used output folder: what asyncflow wrote there goes, nothing else",
    )
    _add_model_argument(run)
    _add_model_options(run)
    _add_seg_options(run)

    flame = commands.add_parser("flame", help="run as a FLAME analysis node (StarModel; needs the FLAME SDK)")
    flame.add_argument(
        "--query",
        action="append",
        default=[],
        metavar="KEY",
        help="S3 object key to fetch, repeatable (default: every object of the node)",
    )
    flame.add_argument(
        "--aggregator",
        choices=["zip", "passthrough", "statistics"],
        help="zip: one ZIP with a manifest (default); passthrough: the node results as a pickled list; "
        "statistics: merged per-label statistics (with --result statistics)",
    )
    flame.add_argument(
        "--result",
        choices=["segmentations", "statistics"],
        default="segmentations",
        help="what leaves each node: its segmentations (default), or per-label statistics only",
    )
    _add_statistics_options(flame)
    _add_model_argument(flame)
    _add_model_options(flame)
    _add_seg_options(flame)

    monitor = commands.add_parser(
        "monitor", help="follow JSON logs: live progress, then stage percentiles and failures"
    )
    monitor.add_argument(
        "log",
        nargs="?",
        default="-",
        type=argparse.FileType("r", encoding="utf-8", errors="replace"),
        metavar="LOGFILE",
        help="a JSON log file, or - for stdin (default)",
    )
    monitor.add_argument("--summary", action="store_true", help="no live line: only the summary at the end")
    monitor.add_argument("--json", action="store_true", help="print the summary as JSON")
    monitor.add_argument(
        "--interval", type=float, default=1.0, help="seconds between live updates (default 1)"
    )

    stats = commands.add_parser(
        "stats", help="merge the statistics in report.json files, as FLAME's statistics aggregator does"
    )
    stats.add_argument("reports", nargs="+", type=Path, metavar="REPORT", help="report.json of a run")
    stats.add_argument("-o", "--output", type=Path, help="write the JSON here (default: standard output)")
    _add_statistics_options(stats)

    demo = commands.add_parser("demo", help="segment synthetic CT archives with the built-in tiny model")
    demo.add_argument(
        "-o", "--output", type=Path, default=Path("asyncflow-demo"), help="default: ./asyncflow-demo"
    )
    _add_run_options(demo)  # the demo's model is the built-in one
    _add_seg_options(demo)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given on the command line (None: not given, the environment decides)."""
    pairs = [item.partition("=") for item in args.settings]
    if any(not sep or not name for name, sep, _ in pairs):
        raise SettingsError("--set takes NAME=VALUE, e.g. --set max_archive_depth=3")
    model = (
        "backend",
        "results_folder",
        "task_name",
        "trainer",
        "plans",
        "configuration",
        "folds",
        "checkpoint",
    )
    return {
        **{name: getattr(args, name, None) for name in model},  # the demo has none of these
        "device": args.device,
        "devices": args.devices,
        "tile_step_size": args.tile_step_size,
        "use_mirroring": args.use_mirroring,
        "torch_threads": args.torch_threads,
        "work_dir": args.work_dir,
        "label_config": args.label_config,
        "seg_type": args.seg_type,
        "seg_keep_empty_frames": args.seg_keep_empty_frames,
        "seg_compression": args.seg_compression,
        "deidentify": args.deidentify,
        **{name.strip(): value for name, _, value in pairs},
    }


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    return Settings.from_env(**_overrides(args), **extra)


def _write_report(result: Result, folder: OutputFolder) -> Path:
    """``report.json`` and ``statistics.csv`` (a line per case and label), each written whole or
    not at all; the case outputs are in the folder already (written as each case ended)."""
    content = result.report()
    folder.write("", "report.json", (json.dumps(content, indent=2) + "\n").encode())
    folder.write("", "statistics.csv", statistics_csv(content["cases"]).encode())
    return folder.path / "report.json"


def _summary(result: Result, output: Path, scores: dict[str, dict[str, float]] | None = None) -> str:
    lines = [f"{'case':<10} {'kind':<6} {'status':<7} {'seconds':>8}  output"]
    for case in result.cases:
        seconds = sum(case.stage_s.values())
        where = case.output or case.error or ""
        if scores and case.output in scores:
            where += "  Dice " + " ".join(f"{k}={v:.3f}" for k, v in scores[case.output].items())
        lines.append(f"{case.case_id:<10} {case.kind!s:<6} {case.status!s:<7} {seconds:8.2f}  {where}")
    finished = [c for c in result.cases if c.status in ("done", "resumed")]
    outputs = [c.output or "" for c in finished]
    resumed = sum(c.status == "resumed" for c in finished)
    lines.append(
        f"{result.status}: {len(finished)}/{len(result.cases)} cases in {result.duration_s:.1f} s"
        f"{f' ({resumed} resumed)' if resumed else ''}, "
        f"{sum(o.endswith('.dcm') for o in outputs)} DICOM SEG, {sum(o.endswith('.nii.gz') for o in outputs)} NIfTI, "
        f"{len(result.skipped)} file(s) skipped -> {output}"
    )
    return "\n".join(lines)


def _flame(args: argparse.Namespace) -> int:
    """``asyncflow flame``: this process is one node of a FLAME analysis."""
    from .flame import run_star_model

    # JSON when asked, or when stderr is not a terminal (a pod's is not)
    log_file = args.log_file.open("a") if args.log_file else None  # open while the node runs
    configure_logging(
        json=True if args.json_logs else None,
        level=logging.WARNING if args.quiet else logging.INFO,
        json_file=log_file,
    )
    overrides = {**_overrides(args), "model_dir": args.model, "multi_modal": args.multi_modal}
    if args.result == "statistics":
        overrides |= {"min_cases": args.min_cases, "statistics_bounds": _bounds(args) or None}
    run_star_model(
        query=args.query,
        aggregator=args.aggregator,
        analyzer_kwargs={k: v for k, v in overrides.items() if v is not None},
        result=args.result,
        epsilon=args.epsilon,
    )
    return EXIT_DONE


def _stats(args: argparse.Namespace) -> int:
    """``asyncflow stats``: each report is one node; merged as the FLAME aggregator merges."""
    from .aggregate import merge_nodes, node_aggregates, parse_bounds

    bounds = parse_bounds(_bounds(args))
    nodes = {}
    for number, path in enumerate(args.reports):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SettingsError(f"{path}: not a readable report.json ({exc})") from None
        if not isinstance(report, dict) or not isinstance(report.get("cases"), list):
            raise SettingsError(f"{path}: not an asyncflow report.json (it has no cases)")
        name = str(path) if str(path) not in nodes else f"{path} ({number})"
        nodes[name] = node_aggregates(
            report["cases"], min_cases=args.min_cases, bounds=bounds, epsilon=args.epsilon
        )
    text = json.dumps(merge_nodes(nodes), indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return EXIT_DONE


def _monitor(args: argparse.Namespace) -> int:
    """``asyncflow monitor``: read JSON log lines until the end, showing progress on a terminal."""
    from .monitor import Monitor, render_live, render_summary

    monitor = Monitor()
    live = not args.summary and sys.stderr.isatty()
    shown = 0.0
    with args.log as stream:
        try:
            for line in stream:
                monitor.feed(line)
                if live and time.monotonic() - shown >= args.interval:
                    print("\r\033[K" + render_live(monitor.snapshot()), end="", file=sys.stderr, flush=True)
                    shown = time.monotonic()
        except KeyboardInterrupt:
            pass  # the summary of what was read so far
    if live:  # the final state stays on screen above the summary
        print("\r\033[K" + render_live(monitor.snapshot()), file=sys.stderr)
    summary = monitor.summary()
    print(json.dumps(summary, indent=2) if args.json else render_summary(summary))
    return EXIT_DONE


def _execute(args: argparse.Namespace) -> int:
    if args.command == "flame":
        return _flame(args)
    if args.command == "monitor":
        return _monitor(args)
    if args.command == "stats":
        return _stats(args)
    bar = ProgressDisplay(enabled=sys.stderr.isatty() and not args.json_logs and not args.no_progress)
    # Above a live line only warnings (info lines go to --log-file); without one, info as well.
    level = logging.ERROR if args.quiet else logging.WARNING if bar.enabled else logging.INFO
    log_file = args.log_file.open("a") if args.log_file else None
    configure_logging(
        json=True if args.json_logs else None, level=level, stream=bar.stream(), json_file=log_file
    )
    try:
        if args.command == "demo":
            from .demo import score, write_demo_inputs

            settings = _settings(args, model_dir=packaged_demo_model())
            folder = OutputFolder(args.output, overwrite=True)  # the demo's folder is its own
            demo_inputs = write_demo_inputs(args.output / "inputs")
            entries: Sequence[Path] = demo_inputs.paths
        else:
            settings = _settings(args, model_dir=args.model, multi_modal=args.multi_modal)
            settings.resolve_model()  # fail before any work when no model is named
            entries = args.inputs or ([settings.input_dir] if settings.input_dir else [])
            args.output = args.output or settings.output_dir
            if not entries or args.output is None:
                raise SettingsError("name INPUT... and --output DIR (or set nnUNet_input and nnUNet_output)")
            folder = OutputFolder(args.output, resume=args.resume, overwrite=args.overwrite)
        ended: list[Result] = []
        try:
            result = run_request_sync(
                entries, settings, on_progress=bar, on_stage=bar.stage, on_finish=ended.append, sink=folder
            )
        except BaseException:
            if ended:  # interrupted, no usable case, a crash: the report says what was known by then
                bar.close()
                report = _write_report(ended[0], folder)
                print(
                    f"asyncflow: report of the request as it ended ({ended[0].status}): {report}",
                    file=sys.stderr,
                )
            raise
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    _write_report(result, folder)
    scores = None
    if args.command == "demo":
        labels = ModelInfo.from_folder(packaged_demo_model()).labels
        scores = score(args.output, demo_inputs, {label.name: value for value, label in labels.items()})
    print(_summary(result, args.output, scores))
    return EXIT_DONE if result.status == "done" else EXIT_SOME_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    try:
        return _execute(args)
    except (SettingsError, ModelError, RequestError, LabelError) as exc:
        print(f"asyncflow: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"asyncflow: interrupted after {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    except Exception:  # noqa: BLE001 - a bug: the traceback is for its report
        traceback.print_exc()
        print(
            "asyncflow: internal error (a bug in asyncflow: please report it with the traceback above)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

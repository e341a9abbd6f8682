"""The command line's words: every command, option and its help, and the settings they name.

:func:`build_parser` describes ``asyncflow run``, ``flame``, ``demo``, ``stats`` and
``monitor``; :func:`overrides` turns the options of the three that segment into
:class:`~asyncflow.settings.Settings` fields (None: not given, the environment decides).
"""

from __future__ import annotations

import argparse
from enum import StrEnum
from pathlib import Path
from typing import Any

from asyncflow._version import __version__
from asyncflow.backends.locate import MODEL_DEFAULTS
from asyncflow.cli.listen import add_listen_command
from asyncflow.enums import (
    DeidentifyProfile,
    Generation,
    ModelGeneration,
    Resampling,
    SegCompression,
    SegType,
)
from asyncflow.errors import SettingsError
from asyncflow.writing.registry import OPTIONAL

__all__ = ["build_parser", "overrides", "statistics_bounds"]

# Settings a model option names; the demo has none of these (its model is the built-in one).
_MODEL_FIELDS = ("backend", "results_folder", "task_name", "trainer", "plans", "configuration", "folds",
                 "postprocessing", "models", "merge_labels")  # fmt: skip


def _values(choices: type[StrEnum]) -> list[str]:
    """An enum's values as plain strings: argparse shows choices by their repr."""
    return [member.value for member in choices]


def _stock(name: str) -> str:
    """Help text naming the stock value of ``trainer``, ``plans`` or ``checkpoint`` per generation."""
    v2, v1 = MODEL_DEFAULTS[Generation.V2][name], MODEL_DEFAULTS[Generation.V1][name]
    return f"default: {v2} (v2), {v1} (v1)"


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        metavar="DIR",
        help="trained model folder: v2 <task>/<trainer>__<plans>__<config> (dataset.json, plans.json, "
        "fold_N/), v1 nnUNet/<config>/<task>/<trainer>__<plans> (plans.pkl, fold_N/); a v2 dataset "
        "folder with nnUNetv2_find_best_configuration's inference_information.json runs what it chose; "
        "given more than once, an ensemble of the configurations (nnUNetv2_ensemble); "
        "default: found from --results-folder and --task",
    )
    parser.add_argument(
        "--multi-modal", action="store_true", default=None, help="<id>_0000, _0001... form one case"
    )
    parser.add_argument(
        "--volumes",
        metavar="WHICH",
        help="which volumes of a 4D series become cases: all (default), first, last, a number, or "
        "KEYWORD=VALUE such as TemporalPositionIdentifier=2 or DiffusionBValue=0",
    )
    parser.add_argument(
        "--select", metavar="RULES", help="which DICOM series the model is for: a TOML or JSON rules file "
        "(docs/how-to/select.md)",
    )  # fmt: skip


def _add_seg_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DICOM SEG")
    group.add_argument(
        "--labels",
        type=Path,
        dest="label_config",
        metavar="FILE",
        help="JSON/YAML label names, codes, colours per label value (docs/how-to/cli.md)",
    )
    for name, writer in OPTIONAL.items():  # each optional output is asked for by its flag
        if writer.flag is not None:
            group.add_argument(writer.flag, action="store_true", dest=f"output_{name}", help=writer.help)
    group.add_argument(
        "--seg-type",
        choices=_values(SegType),
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
        choices=_values(SegCompression),
        help="lossless frame compression, FRACTIONAL/LABELMAP only (default none: every reader opens it)",
    )
    group.add_argument(
        "--deidentify",
        choices=_values(DeidentifyProfile),
        help="basic: DICOM PS3.15's Basic Profile with the Retain UIDs Option on every SEG "
        "(default none here; the FLAME analyzer's default is basic)",
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--backend",
        choices=_values(ModelGeneration),
        help="nnU-Net generation: v2 in process, v1 through nnUNet_predict (default auto: by the model's files)",
    )
    group.add_argument(
        "--results-folder",
        type=Path,
        help="$nnUNet_results (v2) or $RESULTS_FOLDER (v1), searched with --task",
    )
    group.add_argument("--task", dest="task_name", help="$TASK_NAME: dataset/task folder name (v1: or id)")
    group.add_argument("--trainer", help=_stock("trainer"))
    group.add_argument("--plans", help=_stock("plans"))
    group.add_argument("--configuration", help="default: 3d_fullres")
    group.add_argument(
        "--folds", help="folds to ensemble, comma-separated, e.g. 0,1,2 (default: every fold_N found)"
    )
    group.add_argument("--checkpoint", help=_stock("checkpoint"))
    group.add_argument(
        "--postprocessing",
        metavar="FILE|auto|none",
        help="nnU-Net v2 postprocessing (postprocessing.json or .pkl); default auto: what "
        "nnUNetv2_find_best_configuration chose, none for a plain model folder",
    )
    group.add_argument(
        "--add-model",
        dest="models",
        type=Path,
        action="append",
        metavar="DIR",
        help="another model (of any dataset: a model folder, a best configuration, a cascade) that "
        "every case also goes through; its outputs are named <case>_<dataset>; repeatable",
    )
    group.add_argument(
        "--merge-labels",
        action="store_true",
        default=None,
        help="with --add-model: one output per case, the models' labels merged (each model's after "
        "the previous ones'; where they overlap, the later model wins)",
    )
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
    group.add_argument(
        "--resampling",
        choices=_values(Resampling),
        help="model (default: the plans' own, as nnUNetv2_predict), torch (nnU-Net's torch "
        "resampling, several times less CPU), torch-device (the logits' on the prediction device)",
    )
    parser.add_argument(
        "--work-dir", type=Path, help="parent folder of temporary files (default: system temp)"
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        metavar="SECONDS",
        help="after a first Ctrl-C (or SIGTERM, SIGHUP) no new case starts and those in flight finish; "
        "after this long, or a second one, it stops now (default 60)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="settings",
        metavar="NAME=VALUE",
        help="any other setting, e.g. --set max_archive_bytes=2e11 (docs/reference/settings.md)",
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


def _add_run_command(commands: Any) -> None:
    run = commands.add_parser("run", help="segment files, folders and archives")
    run.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="files, folders or TAR archives (default: $nnUNet_input), or series pulled from a PACS: "
        "dicomweb://host:port/path?StudyInstanceUID=... or dimse://AET@host:port?PatientID=...",
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
    run.add_argument(
        "--send",
        metavar="DESTINATION",
        help="send each case's DICOM SEG to a PACS as the case ends: dicomweb://[USER@]host:port/path "
        "(STOW-RS; the password or a token from a file or ASYNCFLOW_SEND_PASSWORD/_TOKEN) or "
        "dimse://AET@host:port (C-STORE); a case that does not arrive is kept and reported, and "
        "--resume sends it again (docs/how-to/cli.md#sending-to-a-pacs)",
    )
    run.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run the steps on a Ray cluster, this machine keeping the books: auto, local, HOST:PORT "
        "or ray://HOST:PORT; --work-dir must be a folder every node reaches (docs/how-to/cluster.md)",
    )
    _add_model_argument(run)
    _add_model_options(run)
    _add_seg_options(run)


def _add_flame_command(commands: Any) -> None:
    flame = commands.add_parser("flame", help="run as a FLAME analysis node (StarModel; needs the FLAME SDK)")
    flame.add_argument(
        "--query",
        action="append",
        default=[],
        metavar="KEY",
        help="S3 object key to segment, repeatable (default: every object of the node)",
    )
    flame.add_argument(
        "--inputs",
        choices=["stream", "sdk"],
        default="stream",
        help="stream: each object fetched to disk as the pipeline needs it, within --fetch-window "
        "(default); sdk: the SDK reads every object into memory first",
    )
    flame.add_argument(
        "--data-gateway",
        metavar="URL",
        help="the node's data gateway (default: http://nginx-$DEPLOYMENT_NAME/kong, as the SDK finds it)",
    )
    flame.add_argument(
        "--fetch-window", type=int, metavar="N", help="objects fetched or waiting on disk at once"
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


def _add_monitor_command(commands: Any) -> None:
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


def _add_stats_command(commands: Any) -> None:
    stats = commands.add_parser(
        "stats", help="merge the statistics in report.json files, as FLAME's statistics aggregator does"
    )
    stats.add_argument("reports", nargs="+", type=Path, metavar="REPORT", help="report.json of a run")
    stats.add_argument("-o", "--output", type=Path, help="write the JSON here (default: standard output)")
    _add_statistics_options(stats)


def _add_demo_command(commands: Any) -> None:
    demo = commands.add_parser("demo", help="segment synthetic CT archives with the built-in tiny model")
    demo.add_argument(
        "-o", "--output", type=Path, default=Path("asyncflow-demo"), help="default: ./asyncflow-demo"
    )
    _add_run_options(demo)  # the demo's model is the built-in one
    _add_seg_options(demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncflow",
        description="nnU-Net segmentation of DICOM and NIfTI: asyncflow run, demo, listen, flame, stats, monitor.",
    )
    parser.add_argument("--version", action="version", version=f"asyncflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run_command, _add_flame_command, _add_monitor_command, _add_stats_command):
        add(commands)
    _add_demo_command(commands)
    add_listen_command(
        commands, lambda p: [f(p) for f in (_add_model_argument, _add_model_options, _add_seg_options)]
    )
    return parser


def statistics_bounds(args: argparse.Namespace) -> dict[str, list[str]]:
    """``--bounds`` as ``{figure: [low, high, bins]}`` (checked by :func:`asyncflow.stats.aggregate.parse_bounds`)."""
    pairs = [item.partition("=") for item in args.bounds]
    if any(not sep or value.count(",") != 2 for _, sep, value in pairs):
        raise SettingsError("--bounds takes [LABEL.]FIGURE=LOW,HIGH,BINS, e.g. volume_ml=0,3000,60")
    return {name: value.split(",") for name, _, value in pairs}


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given on the command line (None: not given, the environment decides)."""
    pairs = [item.partition("=") for item in args.settings]
    if any(not sep or not name for name, sep, _ in pairs):
        raise SettingsError("--set takes NAME=VALUE, e.g. --set max_archive_depth=3")
    named = (
        *_MODEL_FIELDS, "checkpoint", "device", "devices", "tile_step_size", "use_mirroring", "torch_threads",
        "grace_s", "resampling", "volumes", "select", "send", "cluster", "work_dir", "label_config", "seg_type",
        "seg_keep_empty_frames", "seg_compression", "deidentify",
    )  # fmt: skip
    asked = [name for name in OPTIONAL if getattr(args, f"output_{name}", False)]
    return {
        **{name: getattr(args, name, None) for name in named},
        "outputs": asked or None,
        **{name.strip(): value for name, _, value in pairs},
    }

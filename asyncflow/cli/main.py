"""Command line: ``asyncflow run``, ``demo`` and ``flame`` over the same pipeline, ``stats`` and
``monitor`` over what runs leave.

Exit codes: 0 every case done, 1 some cases failed, 2 usage or request error, 3 internal error,
128 + the signal when stopped by one (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP), 141 the reader of
the output went away.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from asyncflow.backends.base import Backend, ModelInfo
from asyncflow.cli.manifest import MANIFEST, run_manifest
from asyncflow.cli.parser import build_parser, overrides, statistics_bounds
from asyncflow.cli.progress import ProgressDisplay
from asyncflow.delivery.query import is_source, series_of
from asyncflow.errors import Interrupted, LabelError, ModelError, RequestError, SettingsError
from asyncflow.log import Stopwatch, configure_logging
from asyncflow.pipeline.journal import OutputFolder
from asyncflow.pipeline.model import locate_model
from asyncflow.pipeline.run import run_request_sync
from asyncflow.pipeline.stopping import Stop, can_watch_signals
from asyncflow.reading.request import Entry
from asyncflow.result import Result
from asyncflow.settings import Settings, packaged_demo_model
from asyncflow.stats.measure import statistics_csv
from asyncflow.writing.registry import outputs_summary

if TYPE_CHECKING:
    from asyncflow.cli.demo import DemoInputs

__all__ = ["main"]

EXIT_DONE, EXIT_SOME_FAILED, EXIT_ERROR, EXIT_INTERNAL = 0, 1, 2, 3


def _write_report(result: Result, settings: Settings, folder: OutputFolder) -> Path:
    """``report.json``, ``statistics.csv`` (a line per case and label), then ``manifest.json``
    (:mod:`asyncflow.cli.manifest`), each written whole or not at all; the case outputs are in
    the folder already (written as each case ended)."""
    content = result.report()
    folder.write("", "report.json", (json.dumps(content, indent=2) + "\n").encode())
    folder.write("", "statistics.csv", statistics_csv(content["cases"]).encode())
    manifest = run_manifest(result, settings, folder.path)
    folder.write("", MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return folder.path / "report.json"


def _summary(result: Result, output: Path, scores: dict[str, dict[str, float]] | None = None) -> str:
    """The console table: a line per case (with ``--send``, whether its objects reached the
    PACS, and why not in a few words), and the request's line."""
    sending = any(case.delivery is not None for case in result.cases)
    lines = [f"{'case':<10} {'kind':<6} {'status':<7} {'seconds':>8}  {'sent    ' if sending else ''}output"]
    for case in result.cases:
        seconds = sum(case.stage_s.values())
        where = case.output or case.error or ""
        if scores and case.output in scores:
            where += "  Dice " + " ".join(f"{k}={v:.3f}" for k, v in scores[case.output].items())
        column = ""
        if sending:
            delivery = case.delivery
            column = f"{'-' if delivery is None else 'yes' if delivery.sent else 'NO':<6}  "
            if delivery is not None and not delivery.sent:
                where += f"  not sent: {delivery.reason}"
        lines.append(
            f"{case.case_id:<10} {case.kind!s:<6} {case.status!s:<7} {seconds:8.2f}  {column}{where}"
        )
    finished = [c for c in result.cases if c.status in ("done", "resumed")]
    resumed = sum(c.status == "resumed" for c in finished)
    delivered = [c.delivery for c in result.cases if c.delivery is not None]
    reached = sum(d.sent for d in delivered)
    lines.append(
        f"{result.status}: {len(finished)}/{len(result.cases)} cases in {result.duration_s:.1f} s"
        f"{f' ({resumed} resumed)' if resumed else ''}, "
        f"{outputs_summary(a for case in finished for a in case.artifacts)}, "
        f"{f'{reached}/{len(delivered)} sent to {delivered[0].destination}, ' if delivered else ''}"
        f"{len(result.skipped)} file(s) skipped -> {output}"
    )
    return "\n".join(lines)


def _model_dirs(given: list[Path] | None) -> Path | list[Path] | None:
    """``--model`` as given once (a folder) or more often (an ensemble, a list)."""
    return given[0] if given and len(given) == 1 else given


def _flame(args: argparse.Namespace) -> int:
    """``asyncflow flame``: this process is one node of a FLAME analysis."""
    from asyncflow.flame import run_star_model

    _configure_logs(args)  # the --log-file stays open while the node runs
    settings = {
        **overrides(args),
        "model_dir": _model_dirs(args.model),
        "multi_modal": args.multi_modal,
        "data_gateway": args.data_gateway,
        "fetch_window": args.fetch_window,
    }
    if args.result == "statistics":
        settings |= {"min_cases": args.min_cases, "statistics_bounds": statistics_bounds(args) or None}
    run_star_model(
        query=args.query,
        aggregator=args.aggregator,
        analyzer_kwargs={k: v for k, v in settings.items() if v is not None},
        result=args.result,
        epsilon=args.epsilon,
        inputs=args.inputs,
    )
    return EXIT_DONE


def _stats(args: argparse.Namespace) -> int:
    """``asyncflow stats``: each report is one node; merged as the FLAME aggregator merges."""
    from asyncflow.stats.aggregate import merge_nodes, node_aggregates, parse_bounds

    bounds = parse_bounds(statistics_bounds(args))
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
    from asyncflow.cli.monitor import Monitor, render_live, render_summary

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
    if not monitor.events and monitor.ignored:
        raise SettingsError(
            f"{args.log.name}: no asyncflow event in its {monitor.ignored} line(s): monitor reads the JSON "
            "lines of --log-file or --json-logs (report.json is a report: asyncflow stats reads it)"
        )
    summary = monitor.summary()
    print(json.dumps(summary, indent=2) if args.json else render_summary(summary))
    return EXIT_DONE


def _configure_logs(args: argparse.Namespace, bar: ProgressDisplay | None = None) -> TextIO | None:
    """Logs as the options ask (JSON when asked, or when stderr is not a terminal, as a pod's is
    not); above a live progress line only warnings. The ``--log-file`` it opened, to close."""
    log_file = args.log_file.open("a") if args.log_file else None
    if bar is None:
        level = logging.WARNING if args.quiet else logging.INFO
    else:  # above a live line only warnings (info lines go to --log-file); without one, info as well
        level = logging.ERROR if args.quiet else logging.WARNING if bar.enabled else logging.INFO
    # The demo is for people: beside its table only warnings, readable, unless JSON is asked for.
    people = args.command == "demo" and not args.json_logs
    configure_logging(
        json=True if args.json_logs else False if people else None,
        level=max(level, logging.WARNING) if people else level,
        stream=bar.stream() if bar is not None else None,
        json_file=log_file,
    )
    return log_file


def _request(
    args: argparse.Namespace, *, check_model: bool
) -> tuple[Settings, Sequence[Entry], OutputFolder, DemoInputs | None]:
    """What ``run`` or ``demo`` segments, with which settings, into which folder; with
    ``check_model``, a model the options fail to name fails here, before any work."""
    if args.command == "demo":
        from asyncflow.cli.demo import write_demo_inputs

        settings = Settings.from_env(**overrides(args), model_dir=packaged_demo_model())
        folder = OutputFolder(args.output, overwrite=True)  # the demo's folder is its own
        demo_inputs = write_demo_inputs(args.output / "inputs")
        return settings, demo_inputs.paths, folder, demo_inputs
    settings = Settings.from_env(
        **overrides(args), model_dir=_model_dirs(args.model), multi_modal=args.multi_modal
    )
    if check_model:
        locate_model(settings)
    named = args.inputs or ([settings.input_dir] if settings.input_dir else [])
    args.output = args.output or settings.output_dir
    if not named or args.output is None:
        raise SettingsError("name INPUT... and --output DIR (or set nnUNet_input and nnUNet_output)")
    missing = [str(entry) for entry in named if not is_source(entry) and not Path(entry).exists()]
    if missing:  # before the output folder is made
        raise SettingsError(f"no such input: {', '.join(missing)}")
    entries: list[Entry] = []
    for entry in named:  # a PACS query is asked once, here: each series it finds is an input
        pulled = (
            series_of(entry, tries=settings.fetch_tries, backoff_s=settings.fetch_backoff_s)
            if is_source(entry)
            else None
        )
        entries += pulled if pulled is not None else [Path(entry)]
    return settings, entries, OutputFolder(args.output, resume=args.resume, overwrite=args.overwrite), None


def _segment(args: argparse.Namespace, backend: Backend | Sequence[Backend] | None) -> int:
    """``asyncflow run`` and ``asyncflow demo``: the request, its outputs as cases end, the report
    (also when the request ends early), a summary line per case."""
    bar = ProgressDisplay(enabled=sys.stderr.isatty() and not args.json_logs and not args.no_progress)
    log_file = _configure_logs(args, bar)
    try:
        settings, entries, folder, demo_inputs = _request(args, check_model=backend is None)
        ended: list[Result] = []
        try:
            result = run_request_sync(
                entries,
                settings,
                backend=backend,
                on_progress=bar,
                on_stage=bar.stage,
                on_finish=ended.append,
                sink=folder,
                stop=Stop(settings.grace_s, _announce(bar)),
            )
        except BaseException:
            if ended:  # interrupted, no usable case, a crash: the report says what was known by then
                bar.close()
                report = _write_report(ended[0], settings, folder)
                print(
                    f"asyncflow: report of the request as it ended ({ended[0].status}): {report}",
                    file=sys.stderr,
                )
            raise
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    with _signals_interrupt():  # the request's own handlers are gone: a signal now ends the command
        _write_report(result, settings, folder)
    scores = None
    if demo_inputs is not None:
        from asyncflow.cli.demo import score

        labels = ModelInfo.from_folder(packaged_demo_model()).labels
        scores = score(args.output, demo_inputs, {label.name: value for value, label in labels.items()})
    print(_summary(result, args.output, scores))
    return EXIT_DONE if result.status == "done" else EXIT_SOME_FAILED


def _announce(bar: ProgressDisplay) -> Callable[[int, int, float], None]:
    """What the first interrupt does, said at once."""

    def announce(signum: int, in_flight: int, grace_s: float) -> None:
        again = "Ctrl-C" if signum == signal.SIGINT else f"{signal.Signals(signum).name} or Ctrl-C"
        print(
            f"asyncflow: stopping: no new case starts; finishing {in_flight} case(s) in flight "
            f"(for at most {grace_s:g} s); {again} again to stop now",
            file=bar.stream() or sys.stderr,
            flush=True,
        )

    return announce


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the command as Ctrl-C does, outside a request (whose own handlers
    stop it in two steps); the handlers before are put back."""
    if not can_watch_signals():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for signum in before:
            signal.signal(signum, interrupt)
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _listen(args: argparse.Namespace) -> int:
    """``asyncflow listen``: a DICOM receiver that segments each series as it completes."""
    from asyncflow.cli.listen import listen_command

    log_file = _configure_logs(args)
    try:
        return listen_command(
            args,
            lambda a: Settings.from_env(
                **overrides(a), model_dir=_model_dirs(a.model), multi_modal=a.multi_modal
            ),
        )
    finally:
        if log_file is not None:
            log_file.close()


# The commands other than run and demo (_segment's).
_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "flame": _flame,
    "listen": _listen,
    "monitor": _monitor,
    "stats": _stats,
}


def main(argv: Sequence[str] | None = None, *, backend: Backend | Sequence[Backend] | None = None) -> int:
    """Run one command (``argv``, default the process's arguments); its exit code. ``backend``:
    a backend (or one per device) for ``run`` and ``demo`` to predict with instead of the one the
    model options name, as ``run_request(backend=...)`` takes it."""
    args = build_parser().parse_args(argv)
    watch = Stopwatch()
    try:
        with _signals_interrupt():
            command = _COMMANDS.get(args.command)
            return command(args) if command is not None else _segment(args, backend)
    except (SettingsError, ModelError, RequestError, LabelError) as exc:
        print(f"asyncflow: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        code = exc.exit_code if isinstance(exc, Interrupted) else 128 + signal.SIGINT
        name = signal.Signals(code - 128).name
        print(f"asyncflow: interrupted ({name}) after {watch.seconds:.1f} s", file=sys.stderr)
        return code
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

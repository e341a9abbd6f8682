"""``asyncflow listen``: its options, and the command (:mod:`asyncflow.listen.listener`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_listen_command", "listen_command"]


def add_listen_command(commands: Any, model_options: Any) -> None:
    """The ``listen`` command; ``model_options`` adds the model, input and SEG options run has."""
    listen = commands.add_parser(
        "listen", help="receive DICOM series (C-STORE SCP) and segment each as it completes"
    )
    listen.add_argument(
        "-o", "--output", type=Path, required=True, help="folder for outputs, journal and reports/"
    )
    listen.add_argument(
        "--spool", type=Path, required=True, help="folder where received instances wait (kept)"
    )
    listen.add_argument(
        "--ae-title", default="ASYNCFLOW", help="this receiver's AE title (default ASYNCFLOW)"
    )
    listen.add_argument("--host", default="0.0.0.0", help="address to listen on (default: every one)")
    listen.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    listen.add_argument(
        "--quiet-s",
        type=float,
        default=10.0,
        help="a series is complete this long after its last instance (10)",
    )
    listen.add_argument(
        "--complete-on-release",
        action="store_true",
        help="a series is complete when its association ends, too",
    )
    listen.add_argument(
        "--spool-budget-gb", type=float, default=0.0,
        help="bytes the spool may hold before senders are answered 0xA700 (default: half the free space)",
    )  # fmt: skip
    listen.add_argument(
        "--allow-caller",
        action="append",
        default=[],
        metavar="AET",
        help="accept only these calling AE titles",
    )
    listen.add_argument(
        "--send", metavar="DESTINATION", help="send each case's DICOM objects here, as run --send"
    )
    model_options(listen)


def listen_command(args: argparse.Namespace, settings_of: Any) -> int:
    """Listen until interrupted; ``settings_of(args)`` gives the pipeline's settings."""
    from asyncflow.listen.listener import ListenOptions, listen
    from asyncflow.pipeline.model import build_plan

    options = ListenOptions(
        spool=args.spool,
        output=args.output,
        ae_title=args.ae_title,
        host=args.host,
        port=args.port,
        quiet_s=args.quiet_s,
        on_release=args.complete_on_release,
        spool_budget_gb=args.spool_budget_gb,
        callers=tuple(args.allow_caller),
    )
    settings = settings_of(args)
    listen(settings, options, build_plan(settings))
    return 0

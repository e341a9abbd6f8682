"""Structured logging: JSON lines for machines, readable console lines for people.

Event names are dotted and past tense (``case.predicted``); fields are snake_case
with units in their names (``duration_s``, ``bytes``). ``request_id`` and
``case_id`` are bound with contextvars. No log line carries patient data or
input file names: cases are named by opaque ids, errors are scrubbed of paths.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog

__all__ = ["configure_logging", "get_logger", "scrub"]

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:,;)]+){2,}[\\/]?")


def scrub(message: str, limit: int = 300) -> str:
    """An error message fit for a log line: file paths (which may hold names) removed."""
    return _PATH.sub("<path>", message)[:limit]


def configure_logging(
    *, json: bool | None = None, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Configure structlog once per process; ``json=None`` picks JSON when not on a TTY."""
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    processors = [*shared, structlog.processors.format_exc_info, renderer] if json else [*shared, renderer]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "asyncflow") -> Any:
    return structlog.get_logger(name)

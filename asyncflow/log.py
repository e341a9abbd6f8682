"""Structured logging: JSON lines for machines, readable console lines for people.

Event names are dotted and past tense (``case.predicted``); fields are snake_case
with units in their names (``duration_s``, ``bytes``). ``request_id`` and
``case_id`` are bound with contextvars. No log line carries patient data or
input file names: cases are named by opaque ids, errors are scrubbed of paths.
Every event and field is documented in ``ops/events.schema.json``.

Standard-library logging (nnU-Net, highdicom, torch, Python warnings) goes through
the same renderer, as ``library.logged`` events carrying the ``logger`` name and
the scrubbed ``message``, so a log stream is one format. Libraries log at
WARNING and above unless the level asked for is lower.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["configure_logging", "get_logger", "scrub"]

_HANDLER_NAME = "asyncflow"
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
    _route_standard_logging(stream, level, shared, renderer)


def _library_record(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A standard-library record as a ``library.logged`` event."""
    record = event_dict.get("_record")
    event_dict["message"] = scrub(str(event_dict.get("event", "")).strip(), 500)
    event_dict["event"] = "library.logged"
    event_dict["logger"] = record.name if record is not None else "unknown"
    return event_dict


def _route_standard_logging(stream: TextIO, level: int, shared: list[Any], renderer: Any) -> None:
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, _library_record],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if level < logging.INFO else max(level, logging.WARNING))
    logging.captureWarnings(True)  # warnings.warn (torch, nnU-Net) as records of "py.warnings"


def get_logger(name: str = "asyncflow") -> Any:
    return structlog.get_logger(name)

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

import contextlib
import logging
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator, MutableMapping
from types import TracebackType
from typing import Any, TextIO

import structlog

__all__ = ["Stopwatch", "bound_case", "configure_logging", "get_logger", "scrub", "take_over_logging"]

_HANDLER_NAME = "asyncflow"
_QUIET_LIBRARIES = ("httpx", "httpcore")  # a line per HTTP request at DEBUG/INFO (the FLAME SDK's)
_configured_level: int | None = None  # the level configure_logging was given
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:,;)]+){2,}[\\/]?")


def scrub(message: str, limit: int = 300) -> str:
    """An error message fit for a log line: file paths (which may hold names) removed."""
    return _PATH.sub("<path>", message)[:limit]


def configure_logging(
    *,
    json: bool | None = None,
    level: int = logging.INFO,
    stream: TextIO | None = None,
    json_file: TextIO | None = None,
) -> None:
    """Configure structlog once per process; ``json=None`` picks JSON when not on a TTY.
    ``json_file`` also gets every event at INFO and above as a JSON line, whatever ``level``
    lets through to ``stream``."""
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
    lowest = level
    if json_file is not None:
        processors.insert(len(shared), _Tee(json_file, level))
        lowest = min(level, logging.INFO)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lowest),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _route_standard_logging(stream, level, shared, renderer, json_file)
    global _configured_level
    _configured_level = level


class _Tee:
    """A processor that writes each event to a JSON file, then lets only those at the console's
    level go on to the console."""

    def __init__(self, file: TextIO, console_level: int) -> None:
        self.file, self.console_level = file, console_level
        self.render = structlog.processors.JSONRenderer()
        self.lock = threading.Lock()

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        line = self.render(logger, method, structlog.processors.format_exc_info(logger, method, dict(event)))
        text = line if isinstance(line, str) else line.decode()
        with self.lock, contextlib.suppress(ValueError):  # closed at the end of a run: later lines are lost
            self.file.write(text + "\n")
            self.file.flush()
        if logging.getLevelName(str(event.get("level", "info")).upper()) < self.console_level:
            raise structlog.DropEvent
        return event


def take_over_logging() -> None:
    """Make this process's logging asyncflow's again after a library configured it (the FLAME
    SDK adds a stdout handler of its own, sets the root level to DEBUG and replaces
    ``sys.excepthook`` and ``threading.excepthook``).

    Afterwards asyncflow's handler is the root logger's only console handler, at asyncflow's
    level, so every line is written once and scrubbed (the SDK's own log lines included: its ``flame_log``
    still sends them to the Hub); httpx and httpcore log warnings only; an exception that
    escapes any thread is logged as ``exception.unhandled``, scrubbed. Call it again whenever
    the library may have run its set-up since (in FLAME's test mode each node builds its own).
    """
    if _configured_level is None:
        configure_logging(json=True)  # a pod's output is read by machines
    assert _configured_level is not None
    root = logging.getLogger()
    consoles = {id(stream) for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    for handler in list(root.handlers):  # another console handler prints every line a second time
        stream = getattr(handler, "stream", None)
        if (
            handler.get_name() != _HANDLER_NAME
            and isinstance(handler, logging.StreamHandler)
            and id(stream) in consoles
        ):
            root.removeHandler(handler)
    root.setLevel(
        _configured_level if _configured_level < logging.INFO else max(_configured_level, logging.WARNING)
    )
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.excepthook = _log_unhandled
    threading.excepthook = _log_unhandled_in_thread


def _log_unhandled(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, tb)
        return
    frames = "".join(traceback.format_exception(kind, error, tb))
    log = get_logger(__name__)
    log.error(
        "exception.unhandled",
        error_type=kind.__name__,
        reason=scrub(str(error)),
        traceback=scrub(frames, 4000),
        thread=threading.current_thread().name,
    )


def _log_unhandled_in_thread(hook: threading.ExceptHookArgs) -> None:
    if hook.exc_value is not None:
        _log_unhandled(hook.exc_type, hook.exc_value, hook.exc_traceback)


def _library_record(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A standard-library record as a ``library.logged`` event."""
    record = event_dict.get("_record")
    event_dict["message"] = scrub(str(event_dict.get("event", "")).strip(), 500)
    event_dict["event"] = "library.logged"
    event_dict["logger"] = record.name if record is not None else "unknown"
    return event_dict


def _route_standard_logging(
    stream: TextIO, level: int, shared: list[Any], renderer: Any, json_file: TextIO | None
) -> None:
    """Libraries' records (``library.logged``) to ``stream`` at ``level`` (warnings at least),
    and to ``json_file`` from warnings up, whatever ``stream`` shows."""
    console_level = level if level < logging.INFO else max(level, logging.WARNING)
    outputs = [(stream, renderer, console_level, _HANDLER_NAME)]
    if json_file is not None:
        outputs.append(
            (json_file, structlog.processors.JSONRenderer(), logging.WARNING, f"{_HANDLER_NAME}-file")
        )
    root = logging.getLogger()
    for old in [h for h in root.handlers if (h.get_name() or "").startswith(_HANDLER_NAME)]:
        root.removeHandler(old)
    for target, render, threshold, name in outputs:
        handler = logging.StreamHandler(target)
        handler.set_name(name)
        handler.setLevel(threshold)
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=[*shared, _library_record],
                processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, render],
            )
        )
        root.addHandler(handler)
    root.setLevel(min(threshold for _, _, threshold, _ in outputs))
    logging.captureWarnings(True)  # warnings.warn (torch, nnU-Net) as records of "py.warnings"


def get_logger(name: str) -> Any:
    """A module's logger, named by its ``__name__``. The name is not part of the log contract:
    asyncflow's events carry no logger field (``library.logged`` names the library's)."""
    return structlog.get_logger(name)


@contextlib.contextmanager
def bound_case(case_id: str) -> Iterator[None]:
    """Every event logged inside carries ``case_id`` (a contextvar: the worker threads that
    ``anyio.to_thread`` starts from inside see it too), and on a cluster, once a step of the case
    ran there, the ``node`` it ran on (:func:`bind_node`), which ends here too."""
    with structlog.contextvars.bound_contextvars(case_id=case_id):
        try:
            yield
        finally:
            bind_node(None)


def bind_node(node: str | None) -> None:
    """The events logged next by this task carry ``node``: where a cluster ran its last step
    (None: no more)."""
    if node is None:
        structlog.contextvars.unbind_contextvars("node")
    else:
        structlog.contextvars.bind_contextvars(node=node)


class Stopwatch:
    """Seconds since it was made (``time.perf_counter``); :attr:`duration_s` is what an event
    carries (rounded to 0.1 ms)."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def duration_s(self) -> float:
        return round(self.seconds, 4)

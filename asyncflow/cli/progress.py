"""The command line's live progress line: it moves while cases run, not only when they end.

On a terminal it shows cases done, failed and known, the stage each running case
is in, the time elapsed and an ETA from the rate observed so far, redrawn twice a
second by a thread of its own, so it moves during a long prediction. Log lines
are written above it. The line is rendered by tqdm's ``format_meter``: tqdm is
already a dependency (nnU-Net uses it), so the bar, rate and time formats are the
familiar ones, and one more library (rich) for a single line was not worth it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from typing import TextIO

from tqdm import tqdm

from asyncflow.result import Progress

__all__ = ["ProgressDisplay"]

_STAGES = ("prepare", "predict", "export")


class ProgressDisplay:
    """The live line on ``stream``; ``enabled`` False makes every call a no-op."""

    def __init__(self, enabled: bool, stream: TextIO | None = None, interval_s: float = 0.5) -> None:
        self.enabled = enabled
        self._out = stream or sys.stderr
        self._lock = threading.RLock()  # _draw holds it while line() takes it
        self._started = time.monotonic()
        self._progress = Progress(done=0, failed=0, total=None)
        self._stages: dict[str, str] = {}  # case id -> the stage it is in
        self._closed = threading.Event()
        self._ticker: threading.Thread | None = None
        if enabled:
            self._ticker = threading.Thread(
                target=self._tick, args=(interval_s,), name="asyncflow progress", daemon=True
            )
            self._ticker.start()

    # -- what the pipeline tells it ---------------------------------------------------

    def __call__(self, progress: Progress) -> None:
        """A case ended (``run_request``'s ``on_progress``)."""
        with self._lock:
            self._progress = progress
        self._draw()

    def stage(self, case_id: str, stage: str | None, progress: Progress) -> None:
        """A case entered ``stage``, or ended (None) (``run_request``'s ``on_stage``)."""
        with self._lock:
            self._progress = progress
            if stage is None:
                self._stages.pop(case_id, None)
            else:
                self._stages[case_id] = stage

    # -- the line ------------------------------------------------------------------------

    def line(self, width: int = 100) -> str:
        with self._lock:
            progress, stages = self._progress, Counter(self._stages.values())
        ended = progress.done + progress.failed
        running = " · ".join(f"{stage} {stages[stage]}" for stage in _STAGES)
        postfix = f"failed {progress.failed} | {running}"
        prefix, total = "segmenting", progress.total
        if total is None and progress.known:  # inputs still being read: what is known so far
            prefix = (
                f"segmenting (at least {progress.known} cases, {progress.inputs_read} of "
                f"{progress.inputs} inputs read)"
            )
            total = progress.known if ended else None  # an ETA for those, once one case has ended
        return str(
            tqdm.format_meter(
                n=ended,
                total=total,
                elapsed=time.monotonic() - self._started,
                ncols=width,
                prefix=prefix,
                unit="case",
                postfix=postfix,
            )
        )

    def _draw(self) -> None:
        if not self.enabled or self._closed.is_set():
            return
        with self._lock:
            self._out.write("\r\033[K" + self.line(_width(self._out)))
            self._out.flush()

    def _tick(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            self._draw()

    def stream(self) -> TextIO | None:
        """A stream for log lines: each is written above the live line (None when disabled)."""
        if not self.enabled:
            return None
        display = self

        class _Above:
            def write(self, text: str) -> int:
                if text.strip():  # print() sends the newline as a write of its own
                    with display._lock:
                        display._out.write("\r\033[K" + text.rstrip("\n") + "\n")
                    display._draw()
                return len(text)

            def flush(self) -> None:
                display._out.flush()

            def isatty(self) -> bool:
                return True

        return _Above()  # type: ignore[return-value]

    def close(self) -> None:
        """The final line stays on screen."""
        if not self.enabled or self._closed.is_set():
            return
        self._draw()
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            self._out.write("\n")
            self._out.flush()


def _width(stream: TextIO) -> int:
    try:
        return min(os.get_terminal_size(stream.fileno()).columns, 160)
    except (OSError, ValueError, AttributeError):
        return 100

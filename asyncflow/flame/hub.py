"""What reaches the FLAME Hub: progress and a few short lines, never patient data.

The Hub's log stream is read by analysts outside the hospital, so every line
sent there is built here from counts, stage names and error types only; error
messages pass through :func:`hub_text`, which drops file paths and quoted
names. Progress (``flame.set_progress``) only moves forward, from 0 to 100, as
objects are fetched and cases end. A Hub call that fails is logged locally and
never fails the request.

The reporter's callbacks run on the pipeline's event loop: they do a few cheap
calls per request (one per whole percent at most), nothing per voxel or file.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Protocol

from asyncflow._version import __version__
from asyncflow.log import get_logger, scrub
from asyncflow.result import Progress, Result
from asyncflow.writing.registry import outputs_summary

__all__ = ["FLAME_LOG_TYPES", "FlameLike", "HubReporter", "hub_text"]

log = get_logger(__name__)

#: The only log types ``flame.flame_log`` accepts; ``error`` marks the analysis failed.
FLAME_LOG_TYPES = frozenset({"debug", "info", "notice", "warn", "alert", "emerg", "error", "crit"})

#: Of the Hub's 0..100, what fetching the objects counts for (a request of a store's objects).
FETCH_SHARE = 20

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


class FlameLike(Protocol):
    """The two calls of the FLAME SDK's core object that the reporter uses."""

    def flame_log(self, msg: str, *args: Any, **kwargs: Any) -> None: ...

    def set_progress(self, progress: int) -> None: ...


def hub_text(message: str, limit: int = 200) -> str:
    """An error message fit for the Hub: quoted names and file paths removed."""
    return scrub(_QUOTED.sub("<name>", message), limit)


def _failures(result: Result) -> str:
    counts = Counter(f"{c.error_stage} {c.error_type}" for c in result.cases if c.error_type)
    return ", ".join(f"{what} x{n}" for what, n in counts.most_common())


def _lost(result: Result) -> str:
    """Inputs that could not be read and archive members refused, by reason class."""
    counts = Counter(str(entry["failure"]) for entry in result.inputs if entry["failure"])
    counts["refused archive member"] += sum(s.refused for s in result.skipped)
    return ", ".join(f"{what} x{n}" for what, n in counts.most_common() if n)


class HubReporter:
    """Mirrors one request's milestones and progress to a FLAME node's Hub stream."""

    def __init__(self, flame: FlameLike) -> None:
        self._flame = flame
        self._progress = 0
        self._total_announced = False
        self._next_quarter = 25

    # -- the two Hub calls, shielded ----------------------------------------------

    def log(self, message: str, log_type: str = "info") -> None:
        if log_type not in FLAME_LOG_TYPES:
            raise ValueError(f"FLAME accepts log types {sorted(FLAME_LOG_TYPES)}, not {log_type!r}")
        try:
            self._flame.flame_log(message, log_type=log_type)
        except Exception as exc:  # noqa: BLE001 - the Hub being unreachable must not fail the request
            log.warning("hub.log_failed", error_type=type(exc).__name__)

    def progress(self, percent: int) -> None:
        """Send ``percent`` when it is a step forward; FLAME rejects anything else."""
        percent = max(0, min(100, int(percent)))
        if percent <= self._progress:
            return
        try:
            self._flame.set_progress(percent)
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("hub.progress_failed", error_type=type(exc).__name__)
            return
        self._progress = percent

    # -- milestones -----------------------------------------------------------------

    def started(self, inputs: int, size: int | None = None) -> None:
        """The request begins with ``inputs`` objects (``size``: their bytes, when listed)."""
        amount = f"{size / 1e9:.1f} GB" if size is not None and size >= 1e9 else f"{(size or 0) / 1e6:.1f} MB"
        total = f" ({amount}, each fetched as it is needed)" if size is not None else ""
        self.log(f"asyncflow {__version__}: segmenting {inputs} input object(s){total}")

    def __call__(self, progress: Progress) -> None:
        """The pipeline's ``on_progress`` callback: after every case that ends, and every object
        fetched. Objects fetched count for the first :data:`FETCH_SHARE` percent, the cases that
        end for the rest. Until every input is read the number of cases is not known: the cases
        found so far are the least it can be, and the share of inputs read says how many more to
        expect, so progress moves with the work instead of waiting for the last input."""
        first = FETCH_SHARE if progress.objects else 0
        fetching = first * progress.fetched // progress.objects if progress.objects else 0
        ended = progress.done + progress.failed
        if progress.total is not None:
            expected, total = progress.total, str(progress.total)
            if not self._total_announced and progress.total:
                self._total_announced = True
                self.log(f"{progress.total} case(s) found")
        else:  # the cases found so far, and as many again per input not yet read
            read = max(1, progress.inputs_read)
            expected = max(progress.known, -(-progress.known * progress.inputs // read))
            total = f"at least {progress.known}"
        if expected == 0:
            self.progress(fetching)
            return
        # 100 is sent when the result is ready, not when the last case is exported.
        self.progress(min(99, fetching + (100 - first) * ended // expected))
        if ended < expected and 100 * ended >= self._next_quarter * expected:
            self.log(f"{ended}/{total} cases finished, {progress.failed} failed")
            while self._next_quarter * expected <= 100 * ended:
                self._next_quarter += 25

    def finished(self, result: Result) -> None:
        done = sum(c.status in ("done", "resumed") for c in result.cases)
        resumed = sum(c.status == "resumed" for c in result.cases)
        kept = f", {resumed} of them before a restart" if resumed else ""  # from the node's storage
        line = (
            f"{result.status}: {done}/{len(result.cases)} cases segmented{kept} in {result.duration_s:.0f} s "
            f"({outputs_summary(a for case in result.cases for a in case.artifacts)}, "
            f"{len(result.skipped)} file(s) skipped)"
        )
        failures = _failures(result)
        lost = _lost(result)
        if failures:
            line += f"; failed: {failures}"
        if lost:  # reason classes and counts: an input's own message may quote its name
            line += f"; inputs lost: {lost}"
        self.log(line, "info" if result.status == "done" else "warn")
        self.progress(100)

    def no_usable_case(self, error: Exception) -> None:
        """The node's data held nothing to segment; the analysis goes on without it."""
        self.log(f"no case segmented: {hub_text(str(error))}", "warn")
        self.progress(100)

    def failed(self, error: BaseException, *, detail: bool = True) -> None:
        """The request could not run at all (model, settings): the analysis fails.

        ``detail=False`` sends the error's type alone, for errors whose message may quote data.
        """
        reason = f": {hub_text(str(error))}" if detail else ""
        self.log(f"asyncflow failed: {type(error).__name__}{reason}", "error")

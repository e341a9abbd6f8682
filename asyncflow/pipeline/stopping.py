"""Stopping a request in two steps, as people expect of Ctrl-C.

The first interrupt (SIGINT, SIGTERM or SIGHUP: how a terminal, ``timeout``,
systemd, Kubernetes and FLAME stop a process) stops taking new cases: the
intake (fetch, unpack, assembly) ends, cases not yet started stay ``pending``,
and the cases in flight finish, are written and journaled. A second interrupt,
or the end of the grace period, stops now: the stages are cancelled (a
prediction in progress is abandoned). Either way the request ends as
interrupted (:class:`~asyncflow.errors.Interrupted`, carrying the first signal),
its report is written and its temporary folder removed, as on any end.

Signals are only watched in the main thread (Python delivers them there): the
FLAME analyzer, whose nodes run in threads in FLAME's local test mode, installs
no handler. A driver that watches signals itself (the listener, whose requests come
one after another) makes a ``Stop(signals=False)`` and hands each interrupt on with
:meth:`Stop.interrupt`: the same two steps follow.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import anyio

from asyncflow.log import get_logger

__all__ = ["SIGNALS", "Stop", "can_watch_signals"]

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

log = get_logger(__name__)


def can_watch_signals() -> bool:
    """Signals reach only the main thread's handlers."""
    return threading.current_thread() is threading.main_thread()


class Stop:
    """The stop of one request. ``grace_s``: how long cases in flight may take after the first
    interrupt. ``on_stopping(signum, cases_in_flight, grace_s)`` is told of the first one (the
    command line says what happens next)."""

    def __init__(
        self,
        grace_s: float,
        on_stopping: Callable[[int, int, float], None] | None = None,
        *,
        signals: bool = True,
    ) -> None:
        self.grace_s = grace_s
        self.on_stopping = on_stopping
        self.signals = signals  # watch the process' signals; else only what interrupt() hands on
        self._interrupts = anyio.create_memory_object_stream[int](8)
        self.signum: int | None = None  # the first interrupt's signal
        self.now = False  # the stages were cancelled: the second interrupt, or the grace ran out
        self._intake: anyio.CancelScope | None = None
        self._stages: anyio.CancelScope | None = None

    @property
    def intake(self) -> anyio.CancelScope:
        """The scope of the intake (fetch, unpack, assembly): cancelled by the first interrupt.
        Made on first use, in the request's event loop."""
        if self._intake is None:
            self._intake = anyio.CancelScope()
        return self._intake

    @property
    def stages(self) -> anyio.CancelScope:
        """The scope of every stage: cancelled to stop now."""
        if self._stages is None:
            self._stages = anyio.CancelScope()
        return self._stages

    @property
    def draining(self) -> bool:
        """No new case starts."""
        return self.signum is not None

    def drain(self, signum: int, in_flight: int) -> None:
        """The first interrupt: the intake ends, the cases in flight finish."""
        self.signum = signum
        self.intake.cancel()
        log.warning(
            "request.stopping",
            signal=signal.Signals(signum).name,
            cases_in_flight=in_flight,
            grace_s=self.grace_s,
        )
        if self.on_stopping is not None:
            self.on_stopping(signum, in_flight, self.grace_s)

    def stop_now(self, reason: str) -> None:
        """The second interrupt, or the grace ran out: the stages are cancelled."""
        self.now = True
        log.warning("request.stopped_now", reason=reason)
        self.stages.cancel()

    def interrupt(self, signum: int) -> None:
        """An interrupt from the driver (a Stop without ``signals``), in the request's event loop."""
        self._interrupts[0].send_nowait(signum)

    async def watch(self, in_flight: Callable[[], int]) -> None:
        """Wait for interrupts until cancelled (the request has ended); ``in_flight`` counts the
        cases that have started and not ended."""
        receiver = anyio.open_signal_receiver(*SIGNALS) if self.signals else self._interrupts[1]
        with receiver as signals:
            async for signum in signals:
                self.drain(signum, in_flight())
                break
            with anyio.move_on_after(self.grace_s) as grace:
                async for signum in signals:
                    self.stop_now(f"second {signal.Signals(signum).name}")
                    break
            if grace.cancelled_caught:
                self.stop_now(f"grace of {self.grace_s:g} s over")
            await anyio.sleep_forever()  # later interrupts change nothing: the request is ending

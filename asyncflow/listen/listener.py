"""``asyncflow listen``: series arrive over DICOM, complete series go through the pipeline.

The receiver (:mod:`asyncflow.listen.receiver`) spools each instance to disk before it
acknowledges it. A series is complete when no instance of it came for ``quiet_s`` (mercure's
rule), or, with ``on_release``, when the association that sent it ends. Complete series wait
in the spool's ``ready`` folder; the listener runs them as requests, one after another, each
taking every series ready by then (:func:`asyncflow.pipeline.run.run_request`, the model
loaded once for all, a complete series one input as an archive's members would be). The
selection rules (``--select``) choose the series that become cases; the cases' outputs and
journal lines go to the output folder as each case ends, their DICOM objects to ``--send``;
each request's report to ``reports/``. A series leaves the spool once its cases are
journaled; one whose objects did not reach the PACS stays and is tried again after
``retry_s``. A restart finds every series spooled and not finished (the journal resumes
what was finished and sends what was not sent to this destination).

The first SIGTERM (or SIGINT, SIGHUP) stops the receiver and lets the request in progress
finish its cases in flight within ``grace_s``; a second stops it now. The spool is kept.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

from asyncflow.backends.plan import ModelPlan
from asyncflow.errors import Interrupted, RequestError, SettingsError
from asyncflow.listen.receiver import Receiver
from asyncflow.listen.spool import Spool
from asyncflow.log import get_logger
from asyncflow.pipeline.journal import OutputFolder
from asyncflow.pipeline.run import run_request
from asyncflow.pipeline.stopping import SIGNALS, Stop, can_watch_signals
from asyncflow.reading.request import LocalFolder
from asyncflow.result import Result
from asyncflow.settings import Settings

__all__ = ["ListenOptions", "Listener"]

log = get_logger(__name__)


@dataclass(frozen=True)
class ListenOptions:
    """What ``asyncflow listen`` is, besides the pipeline's settings."""

    spool: Path  # where instances wait (asyncflow.listen.spool)
    output: Path  # the output folder: outputs, journal, reports/
    ae_title: str = "ASYNCFLOW"
    host: str = "0.0.0.0"
    port: int = 11112
    quiet_s: float = 10.0  # a series is complete after this long without a new instance
    on_release: bool = False  # ... or when the association that sent it ends
    spool_budget_gb: float = 0.0  # bytes the spool may hold; 0: half its disk's free space at start
    callers: tuple[str, ...] = ()  # the calling AE titles accepted (none: any)
    retry_s: float = 60.0  # a series whose objects did not reach the PACS is tried again after this

    def __post_init__(self) -> None:
        if not 0 < len(self.ae_title) <= 16:
            raise SettingsError(f"an AE title has 1 to 16 characters, got {self.ae_title!r}")
        if not 0 <= self.port < 65536:
            raise SettingsError(f"port must be 0..65535, got {self.port}")
        if self.quiet_s <= 0 or self.retry_s <= 0 or self.spool_budget_gb < 0:
            raise SettingsError("quiet_s and retry_s must be positive, spool_budget_gb not negative")

    def budget_bytes(self) -> int:
        if self.spool_budget_gb > 0:
            return int(self.spool_budget_gb * 1e9)
        self.spool.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.spool).free // 2


class Listener:
    """One listener: its spool, its receiver, and the requests it runs."""

    def __init__(self, settings: Settings, options: ListenOptions, plan: ModelPlan) -> None:
        self.settings, self.options, self.plan = settings, options, plan
        self.spool = Spool(options.spool, options.budget_bytes())
        self.folder = OutputFolder(options.output, resume=True)
        self.receiver = Receiver(
            self.spool,
            options.ae_title,
            options.host,
            options.port,
            callers=options.callers,
            on_series=_received,
            on_release=self._released,
        )
        self.waiting: list[Path] = self.spool.waiting()  # ready, and not yet in a request
        self.retry: dict[Path, float] = {}  # not delivered: when to try again
        self.batch: Stop | None = None  # the stop of the request in progress
        self.stopping = False
        self._ended: set[int] = set()  # associations ended (from the receiver's threads)
        self._lock = threading.Lock()
        self._wake = anyio.Event()
        self.listening = anyio.Event()  # the receiver takes associations (its port is known)
        self.requests = 0

    def _released(self, association: int) -> None:
        if self.options.on_release:
            with self._lock:
                self._ended.add(association)

    async def run(self) -> None:
        """Listen until interrupted; then finish (or stop) the request in progress."""
        for backend in self.plan.workers:
            await anyio.to_thread.run_sync(backend.load)
        self.receiver.start()
        self.spool.receiving()
        self.listening.set()
        log.info(
            "listen.started",
            ae_title=self.options.ae_title,
            port=self.receiver.port,
            quiet_s=self.options.quiet_s,
            spool_budget_bytes=self.spool.budget,
            series_waiting=len(self.waiting) + len(self.spool.arriving),
        )
        try:
            async with anyio.create_task_group() as tg:
                if can_watch_signals():
                    tg.start_soon(self._signals)
                tg.start_soon(self._complete)
                await self._requests()
                tg.cancel_scope.cancel()
        finally:
            self.receiver.stop()
        log.info(
            "listen.stopped",
            requests=self.requests,
            series_waiting=len(self.spool.waiting()) + len(self.spool.arriving),
        )

    def interrupt(self, signum: int) -> None:
        """An interrupt (a signal; in the listener's event loop): the first stops receiving and
        lets the request in progress finish its cases in flight, a second stops it now."""
        if not self.stopping:
            self.stopping = True
            self.receiver.stop()
            log.warning("listen.stopping", signal=signal.Signals(signum).name, grace_s=self.settings.grace_s)
            self._wake.set()
        if self.batch is not None:
            self.batch.interrupt(signum)

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(*SIGNALS) as signals:
            async for signum in signals:
                self.interrupt(signum)

    async def _complete(self) -> None:
        """Move the series that are complete to ``ready``, and wake the requests."""
        tick = min(1.0, self.options.quiet_s / 4)
        while True:
            names = {name: "quiet" for name in self.spool.quiet(self.options.quiet_s)}
            with self._lock:
                ended, self._ended = self._ended, set()
            for association in ended:
                names |= {name: "release" for name in self.spool.of_association(association)}
            for name, trigger in names.items():
                moved = self.spool.complete(name)
                if moved is None:
                    continue
                folder, arrival = moved
                log.info(
                    "series.complete",
                    **_series_field(name),
                    instances=arrival.instances,
                    bytes=arrival.bytes,
                    trigger=trigger,
                    quiet_s=round(time.monotonic() - arrival.last, 3),
                )
                self.waiting.append(folder)
                self._wake.set()
            await anyio.sleep(tick)

    async def _requests(self) -> None:
        """Run every ready series, a request at a time, until interrupted."""
        while not self.stopping:
            now = time.monotonic()
            due = [folder for folder, when in self.retry.items() if when <= now]
            for folder in due:
                del self.retry[folder]
            batch, self.waiting = [*self.waiting, *due], []
            if not batch:
                self._wake = anyio.Event()
                with anyio.move_on_after(1.0):
                    await self._wake.wait()
                continue
            await self._request(batch)

    async def _request(self, folders: list[Path]) -> None:
        """One request of ``folders`` (complete series); each leaves the spool once its cases are
        journaled, or waits for a retry when its objects did not reach the PACS."""
        self.batch = stop = Stop(self.settings.grace_s, signals=False)
        ended: list[Result] = []
        self.requests += 1
        try:
            await run_request(
                [LocalFolder(folder) for folder in folders],
                self.settings,
                backend=self.plan,
                sink=self.folder,
                on_finish=ended.append,
                stop=stop,
            )
        except RequestError:
            pass  # no usable case in any of them (not selected, no images): the report says why
        except Interrupted:
            pass  # the cases not started stay pending: their series stay in the spool
        finally:
            self.batch = None
        if not ended:
            return
        result = ended[0]
        self._write_report(result)
        report = result.report()
        for index, folder in enumerate(folders):
            cases = [case for case in report["cases"] if case["input"] == index]
            if any(case["status"] == "pending" for case in cases):
                continue  # stopped before it: a restart does it
            if any(case.get("delivery", {}).get("status") == "failed" for case in cases):
                self.retry[folder] = time.monotonic() + self.options.retry_s
                continue
            self.spool.done(folder)

    def _write_report(self, result: Result) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        text = json.dumps(result.report(), indent=2) + "\n"
        self.folder.write("reports", f"{stamp}-{result.request_id}.json", text.encode())


def _series_field(name: str) -> dict[str, str]:
    """A spool folder's name as an event field: the SeriesInstanceUID it is, or nothing (a
    hash of a UID that was not a plain one)."""
    uid = name.rsplit("-", 1)[0] if "-" in name else name
    return {"series_instance_uid": uid} if uid.replace(".", "").isdigit() else {}


def _received(series: str, association: int, caller: str) -> None:
    """The first instance of a series in ``incoming`` (the receiver's thread)."""
    log.info("series.received", **_series_field(series), caller=caller)


def listen(settings: Settings, options: ListenOptions, plan: ModelPlan) -> None:
    """Run a listener until it is interrupted (the command line's ``asyncflow listen``)."""

    async def main() -> None:
        await Listener(settings, options, plan).run()

    anyio.run(main)

"""The request's intake: inputs -> cases. Feed the inputs (objects of a store fetched within a
window, :mod:`asyncflow.pipeline.fetching`), unpack and scan them (N workers), assemble their
files into cases (one task), and send on the cases that need work.

The first input is unpacked and scanned alone: its cases reach the prediction
worker sooner when the other unpack workers do not share the cores with it. A
case's key (:func:`asyncflow.pipeline.keys.case_key`) is computed as it leaves
assembly; a case the sink's journal holds as finished with the same model is
booked ``resumed`` there and goes no further. On ``--resume`` the members those
finished cases were made of are not even written
(:class:`asyncflow.reading.archives.Withhold`); the workspace unpacks them again
should a case need them after all. The pipeline (:mod:`asyncflow.pipeline.run`)
wires ``Intake.fetcher.feed``, :meth:`Intake.unpack_worker` and :meth:`Intake.assemble`
between its streams.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from asyncflow.case import Case, SkippedFile
from asyncflow.enums import InputKind, Stage
from asyncflow.errors import RequestError
from asyncflow.log import Stopwatch, bind_node, bound_case, get_logger, scrub
from asyncflow.pipeline.fetching import Fetcher
from asyncflow.pipeline.flow import CaseFlow
from asyncflow.pipeline.journal import CaseSink
from asyncflow.pipeline.keys import case_key
from asyncflow.reading.archives import UnpackedInput, Withhold, unpack
from asyncflow.reading.assemble import CaseBuilder
from asyncflow.reading.request import InputItem
from asyncflow.reading.scan import Scan, classify, scan
from asyncflow.settings import Settings

__all__ = ["Intake"]

log = get_logger(__name__)


class Intake:
    """Turns a request's inputs into cases on a stream."""

    def __init__(self, settings: Settings, flow: CaseFlow, sink: CaseSink | None, model: str) -> None:
        self.flow, self.ledger, self.workspace = flow, flow.ledger, flow.workspace
        window = settings.fetch_window_size()
        self.fetcher = Fetcher(self.ledger, self.workspace.root / "fetched", window)
        self.sink = sink  # what an earlier run finished
        # Called with each case the sink holds, its key and journal line, once it is booked resumed
        # (the export stage's Export.resumed: it sends the case where this run sends).
        self.resumed: Callable[[Case, str, Mapping[str, Any]], Awaitable[None]] | None = None
        self.model = model  # the model key (asyncflow.pipeline.keys)
        self.builder = CaseBuilder(
            multi_modal=settings.multi_modal,
            opaque_names=settings.opaque_names,
            volumes=settings.volumes,
            selection=settings.select,
        )
        self.hashes: dict[Path, str] = {}  # unpacked file -> sha256 of its content
        self.limits = settings.archive_limits()
        sources = sink.finished_sources(model) if sink is not None else frozenset()
        inspect = functools.partial(classify, max_file_bytes=self.limits.max_file_bytes)
        self.withhold = Withhold(sources, inspect) if sources else None
        # Set once the first input's cases are sent on: the other unpack workers wait for it.
        self.first_input_assembled = anyio.Event()
        self.unpack_leader_taken = False

    @property
    def skipped(self) -> list[SkippedFile]:
        """The files of the request that became no case, with their reasons."""
        return self.builder.skipped

    def sources(self, case: Case) -> list[str]:
        """The sha256 of each of the case's files (its journal line keeps them)."""
        return sorted(self.hashes[path] for path in case.files if path in self.hashes)

    async def unpack_worker(
        self,
        items: MemoryObjectReceiveStream[InputItem],
        send: MemoryObjectSendStream[tuple[UnpackedInput, Scan | None]],
    ) -> None:
        """Unpack and scan inputs (scanning here, not in ``assemble``, spreads it over the workers)."""
        leader = not self.unpack_leader_taken
        self.unpack_leader_taken = True
        async with items, send:
            if not leader:
                await self.first_input_assembled.wait()
            async for item in items:  # each worker takes the next input the feed sends
                watch = Stopwatch()
                try:
                    unpacked = await anyio.to_thread.run_sync(
                        unpack, item, self.workspace.input_dir(item.index), self.limits, self.withhold
                    )
                finally:
                    self.fetcher.done_with(item)
                _log_unpacked(unpacked, watch.duration_s)
                scanned = None
                if not unpacked.error:
                    # Reading the files' headers, CPU work: on a cluster's node (the files are where
                    # every node reaches them).
                    scanned = await self.flow.offload.run(scan, unpacked, self.limits.max_file_bytes)
                    if scanned.skipped:
                        log.info("files.skipped", input_index=item.index, files=len(scanned.skipped))
                    bind_node(None)  # where the scan ran, on a cluster: not the next input's
                await send.send((unpacked, scanned))

    async def assemble(
        self,
        receive: MemoryObjectReceiveStream[tuple[UnpackedInput, Scan | None]],
        send: MemoryObjectSendStream[Case],
    ) -> None:
        async with receive, send:
            async for unpacked, scanned in receive:
                self.ledger.add_input(unpacked)
                self.hashes.update(unpacked.hashes)
                self.workspace.withhold(unpacked.withheld)
                if scanned is None:  # the input failed
                    self.builder.broken(unpacked)
                    self._take_withdrawn()
                else:
                    cases = self.builder.add(scanned)
                    self._take_withdrawn()
                    for case in cases:
                        await self._emit(case, send)
                self.first_input_assembled.set()
            for case in self.builder.finish():
                await self._emit(case, send)
            total = self.ledger.assembled()
            log.info("request.assembled", cases=total, files_skipped=len(self.skipped))
            if not total:  # end now, with the report, not once the model has loaded
                inputs = self.ledger.inputs
                failed_inputs = sum(1 for i in inputs if i["error"])
                raise RequestError(
                    f"no usable case in the request: {len(inputs)} input(s), {failed_inputs} unreadable, "
                    f"{len(self.skipped)} file(s) skipped (the report gives each file's reason)"
                )

    def _take_withdrawn(self) -> None:
        """The builder withdrew cases (their series grew or lost an input): drop what they made."""
        for case in self.builder.withdrawn:
            self.ledger.withdraw(case)
        self.builder.withdrawn.clear()

    async def _emit(self, case: Case, send: MemoryObjectSendStream[Case]) -> None:
        key = case_key(case, self.hashes)
        self.ledger.open(case, key)
        earlier = None
        if self.sink is not None and key:  # a FLAME node's storage asks its service
            earlier = await anyio.to_thread.run_sync(self.sink.finished, key, self.model)
        if earlier is not None and key:  # an earlier run of this request finished it: nothing to do
            self.ledger.resume(case, earlier)
            self.workspace.skip(case)
            if self.resumed is not None:  # but send it where this run sends
                await self.resumed(case, key, earlier)
            return
        watch = Stopwatch()
        with bound_case(case.case_id):  # input.restored's case
            try:
                await self.workspace.hold(case)
            except OSError as exc:  # its input changed or vanished since it was first unpacked
                self.flow.fail(case, Stage.PREPARE, exc, watch.seconds)
                return
        await send.send(case)


def _log_unpacked(unpacked: UnpackedInput, duration_s: float) -> None:
    """``input.failed``, ``archive.extracted`` or ``file.received`` for one input."""
    index = unpacked.item.index
    withheld = (
        {"files_withheld": len(unpacked.withheld), "bytes_withheld": unpacked.bytes_withheld}
        if unpacked.withheld
        else {}
    )
    if unpacked.error:
        log.warning("input.failed", input_index=index, reason=scrub(unpacked.error))
    elif unpacked.kind is InputKind.ARCHIVE:
        log.info(
            "archive.extracted",
            input_index=index,
            files=len(unpacked.files) - len(unpacked.withheld),
            members_skipped=len(unpacked.skipped),
            bytes=unpacked.bytes_written,
            duration_s=duration_s,
            **withheld,
        )
    else:
        log.info(
            "file.received", input_index=index, bytes=unpacked.item.size, duration_s=duration_s, **withheld
        )

"""The request's feed: inputs to the unpack workers, objects of a store fetched as they are needed.

An input that is bytes or a local file goes on as it is. An object of a store
(:class:`~asyncflow.reading.request.RemoteObject`) is streamed to
``<request folder>/fetched/<index>`` first, inside a window of at most
``window`` objects fetched or on disk at once: a slot is taken before a fetch
starts and given back when the unpack workers are done with the object
(:meth:`Fetcher.done_with`), so fetching overlaps unpacking, prediction and
export while the disk holds a bounded number of objects and memory holds none
(a fetch keeps one chunk at a time). Several fetches run at once, up to the
window. An object that cannot be fetched is a lost input, like an unreadable
archive: it goes straight to assembly with its reason, the others go on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from asyncflow.enums import InputKind
from asyncflow.log import Stopwatch, get_logger, scrub
from asyncflow.pipeline.ledger import Ledger
from asyncflow.reading.archives import UnpackedInput
from asyncflow.reading.request import FetchFailed, InputItem
from asyncflow.reading.scan import Scan

__all__ = ["Fetcher", "fetch_object"]

log = get_logger(__name__)


async def fetch_object(item: InputItem, target: Path) -> tuple[InputItem, int]:
    """Fetch ``item``'s object to ``target``: the item as a fetched file, and the tries it took.
    Raises :class:`~asyncflow.reading.request.FetchFailed`."""
    assert item.remote is not None
    tries = await item.remote.store.fetch(item.remote, target)
    remote = dataclasses.replace(item.remote, size=target.stat().st_size)
    return dataclasses.replace(item, path=target, fetched=True, remote=remote), tries


class Fetcher:
    """Feeds a request's inputs to the unpack workers, fetching objects within a window."""

    def __init__(self, ledger: Ledger, folder: Path, window: int) -> None:
        self.ledger = ledger
        self.folder = folder  # where fetched objects wait to be unpacked
        self._slots = anyio.Semaphore(window)

    async def feed(
        self,
        items: Iterable[InputItem],
        send: MemoryObjectSendStream[InputItem],
        lost: MemoryObjectSendStream[tuple[UnpackedInput, Scan | None]],
    ) -> None:
        """Send every input on ``send`` (objects once fetched); an object that cannot be
        fetched goes to ``lost`` (assembly's stream) as a failed input."""
        async with send, lost, anyio.create_task_group() as tg:
            for item in items:
                if item.remote is None:
                    await send.send(item)
                    continue
                await self._slots.acquire()  # given back by done_with, or when the fetch fails
                tg.start_soon(self._fetch, item, send, lost)

    async def _fetch(
        self,
        item: InputItem,
        send: MemoryObjectSendStream[InputItem],
        lost: MemoryObjectSendStream[tuple[UnpackedInput, Scan | None]],
    ) -> None:
        watch = Stopwatch()
        try:
            fetched, tries = await fetch_object(item, self.folder / f"{item.index:04d}")
        except FetchFailed as exc:
            self._slots.release()
            log.warning("input.failed", input_index=item.index, reason=scrub(str(exc)), tries=exc.tries)
            self.ledger.fetch_ended()
            error = f"object could not be fetched: {exc}"
            await lost.send(
                (UnpackedInput(item, InputKind.FILE, self.folder, error=error, failure=exc.failure), None)
            )
            return
        log.info(
            "input.fetched",
            input_index=item.index,
            bytes=fetched.size,
            duration_s=watch.duration_s,
            tries=tries,
        )
        self.ledger.fetch_ended()
        await send.send(fetched)

    def done_with(self, item: InputItem) -> None:
        """The unpack workers are done with ``item``: a fetched object's file goes (unless
        unpacking moved it into place), and its slot in the window is free."""
        if item.fetched:
            assert item.path is not None
            item.path.unlink(missing_ok=True)
            self._slots.release()

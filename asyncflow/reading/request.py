"""A request's entries as numbered inputs, before anything is read.

An entry is ``bytes`` (an archive or a single file), a ``{name: bytes}`` mapping
(FLAME's s3 shape: names are full object keys and may contain ``/``), a local
path (a file or a folder, from the CLI; a folder gives one input per file), a
:class:`LocalFolder` (a folder whose files are one input, read in place, as an
archive's would be: the listener's complete series), or a :class:`RemoteObject`: an
object in a store (a FLAME node's S3 data), fetched to the request's temporary folder
only when the pipeline is ready for it (:mod:`asyncflow.pipeline.fetching`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from asyncflow.case import Origin
from asyncflow.enums import InputFailure
from asyncflow.errors import RequestError

__all__ = ["Entry", "FetchFailed", "InputItem", "LocalFolder", "ObjectStore", "RemoteObject", "request_items"]


class FetchFailed(Exception):
    """An object that could not be fetched: why, as a kind, and how many tries were made.
    The message names no object key: it may reach the report that leaves a FLAME node."""

    def __init__(self, failure: InputFailure, message: str, tries: int) -> None:
        super().__init__(message)
        self.failure = failure
        self.tries = tries


class ObjectStore(Protocol):
    """Where :class:`RemoteObject` s come from (:class:`asyncflow.flame.gateway.GatewayStore`)."""

    async def fetch(self, obj: RemoteObject, target: Path) -> int:
        """Write the object's bytes to ``target``, retrying what is transient; return the
        number of tries it took. Raises :class:`FetchFailed`."""
        ...


@dataclass(frozen=True)
class RemoteObject:
    """An object to fetch when the pipeline is ready for it: its key, its size as listed, the
    data source that holds it and the store that fetches it."""

    key: str
    size: int
    source: str
    store: ObjectStore = field(repr=False, compare=False)


@dataclass(frozen=True)
class LocalFolder:
    """A folder whose files are one input, read where they are (never moved or deleted), as the
    members of an archive: a DICOM series in it becomes a case as soon as it is scanned."""

    path: Path


Entry = (
    bytes | bytearray | memoryview | Mapping[str, bytes] | str | os.PathLike[str] | RemoteObject | LocalFolder
)


@dataclass(frozen=True)
class InputItem:
    """One request input: bytes held in memory, a local file used in place, or an object in
    a store; once fetched, the latter is a file of the request's own (``fetched``), which
    unpacking moves into place or deletes."""

    index: int
    name: str  # object key, file path or ``input-N``: for the report, never logged
    data: bytes | None = None
    path: Path | None = None
    remote: RemoteObject | None = None
    fetched: bool = False  # ``path`` is the remote object's bytes, fetched for this request
    folder: bool = False  # ``path`` is a LocalFolder: its files are this one input

    @property
    def origin(self) -> Origin:
        """What a case or skipped file says it came from: this input, by index."""
        return Origin(self.index, self.name)

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        if self.remote is not None:  # as listed, or as fetched (unpacking may move the file)
            return self.remote.size
        assert self.path is not None
        if self.folder:
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return self.path.stat().st_size

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)  # shares the bytes, no copy
        if self.path is None:
            raise RuntimeError(f"input {self.index} is an object that has not been fetched")
        return self.path.open("rb")


def request_items(entries: Iterable[Entry]) -> list[InputItem]:
    """Flatten a request into numbered inputs; folders become one input per file."""
    if isinstance(entries, bytes | bytearray | memoryview | Mapping | str | os.PathLike):
        raise RequestError("a request is a list of entries, not a single entry: wrap it in a list")
    items: list[InputItem] = []

    def add(
        name: str, data: bytes | None = None, path: Path | None = None, remote: RemoteObject | None = None
    ) -> None:
        items.append(InputItem(index=len(items), name=name, data=data, path=path, remote=remote))

    for position, entry in enumerate(entries):
        if isinstance(entry, RemoteObject):
            add(entry.key, remote=entry)
        elif isinstance(entry, LocalFolder):
            if not entry.path.is_dir():
                raise RequestError(f"input {str(entry.path)!r} is not a folder")
            items.append(InputItem(index=len(items), name=entry.path.name, path=entry.path, folder=True))
        elif isinstance(entry, bytes | bytearray | memoryview):
            add(f"input-{position}", data=bytes(entry))
        elif isinstance(entry, Mapping):
            for key, value in entry.items():
                if not isinstance(value, bytes | bytearray | memoryview):
                    raise RequestError(
                        f"entry {position}: value of {key!r} is {type(value).__name__}, expected bytes"
                    )
                add(str(key), data=bytes(value))
        elif isinstance(entry, str | os.PathLike):
            path = Path(entry)
            if path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    add((path.name / file.relative_to(path)).as_posix(), path=file)
            elif path.is_file():
                add(path.name, path=path)
            else:
                raise RequestError(f"input {str(path)!r} does not exist")
        else:
            raise RequestError(
                f"entry {position} is {type(entry).__name__}; expected bytes, "
                "a {name: bytes} mapping, a path, a LocalFolder or a RemoteObject"
            )
    return items

"""A request's entries as numbered inputs, before anything is read.

An entry is ``bytes`` (an archive or a single file), a ``{name: bytes}`` mapping
(FLAME's s3 shape: names are full object keys and may contain ``/``), or a local
path (a file or a folder, from the CLI; a folder gives one input per file).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from asyncflow.errors import RequestError

__all__ = ["Entry", "InputItem", "request_items"]

Entry = bytes | bytearray | memoryview | Mapping[str, bytes] | str | os.PathLike[str]


@dataclass(frozen=True)
class InputItem:
    """One request input: bytes held in memory or a local file used in place."""

    index: int
    name: str  # object key, file path or ``input-N``: for the report, never logged
    data: bytes | None = None
    path: Path | None = None

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        assert self.path is not None
        return self.path.stat().st_size

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)  # shares the bytes, no copy
        assert self.path is not None
        return self.path.open("rb")


def request_items(entries: Iterable[Entry]) -> list[InputItem]:
    """Flatten a request into numbered inputs; folders become one input per file."""
    if isinstance(entries, bytes | bytearray | memoryview | Mapping | str | os.PathLike):
        raise RequestError("a request is a list of entries, not a single entry: wrap it in a list")
    items: list[InputItem] = []

    def add(name: str, data: bytes | None = None, path: Path | None = None) -> None:
        items.append(InputItem(index=len(items), name=name, data=data, path=path))

    for position, entry in enumerate(entries):
        if isinstance(entry, bytes | bytearray | memoryview):
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
                "a {name: bytes} mapping or a path"
            )
    return items

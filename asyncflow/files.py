"""Files written so that a crash leaves either the whole file or none of it."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

__all__ = ["fsync_folder", "write_durably"]


def fsync_folder(folder: Path) -> None:
    """Make the names in ``folder`` (a file renamed there) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(target: Path, data: bytes, partial_prefix: str) -> None:
    """``data`` as ``target``: written to a temporary name (``partial_prefix`` + a random part) in
    the same folder, fsync'd, renamed, and the folder fsync'd. A crash leaves no half file
    under ``target``; a temporary one, which a reader of the folder skips by its prefix."""
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f"{partial_prefix}{uuid.uuid4().hex}"
    try:
        with temporary.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    fsync_folder(folder)

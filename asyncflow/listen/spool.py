"""The listener's spool: every instance received, on disk before it is acknowledged.

::

    <spool>/
        incoming/<series>/<sop>.dcm   instances of series still arriving
        ready/<series>/<sop>.dcm      complete series, waiting for or in the pipeline

An instance is written to a temporary name, fsync'd, renamed, and its folder fsync'd
before :meth:`Spool.store` returns: a crash after the acknowledgement loses nothing. A
series folder is named after its SeriesInstanceUID (its SHA-256 when the UID is not a
plain UID), an instance after its SOPInstanceUID, so an instance sent twice is one file.
:meth:`Spool.complete` moves a series from ``incoming`` to ``ready`` in one rename (a later
instance of it starts a new ``incoming`` folder, which completes on its own); a restarted
listener finds both as they were. :meth:`Spool.done` removes a ready series once its cases
are journaled. The bytes held count against a budget: :meth:`Spool.store` refuses an
instance that would pass it (:class:`SpoolFull`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from asyncflow.files import fsync_folder, write_durably

__all__ = ["Arrival", "Spool", "SpoolFull"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PARTIAL = ".partial-"


class SpoolFull(Exception):
    """The spool's disk budget would be passed."""


@dataclass
class Arrival:
    """A series in ``incoming``: when its last instance came, how many came, over which
    associations (their ids), and the study it belongs to."""

    folder: Path
    last: float  # time.monotonic()
    instances: int = 0
    bytes: int = 0
    associations: set[int] = field(default_factory=set)
    refused: float | None = None  # when an instance of it was last refused (the spool was full)


def _name(uid: str) -> str:
    return uid if _UID.fullmatch(uid) and len(uid) <= 64 else hashlib.sha256(uid.encode()).hexdigest()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class Spool:
    """The spool folder, thread-safe (the DICOM receiver's threads store, the listener's loop
    completes and removes)."""

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root, self.budget = root, budget_bytes
        self.incoming, self.ready = root / "incoming", root / "ready"
        for folder in (self.incoming, self.ready):
            folder.mkdir(parents=True, exist_ok=True)
            for partial in folder.glob(f"*/{_PARTIAL}*"):
                partial.unlink()  # written, never acknowledged
        self._lock = threading.Lock()
        self.used = _size(root)
        # What a restart finds still arriving: complete once quiet, from now.
        now = time.monotonic()
        self.arriving: dict[str, Arrival] = {
            folder.name: Arrival(folder, now, sum(1 for _ in folder.iterdir()), _size(folder))
            for folder in self.incoming.iterdir()
            if folder.is_dir()
        }

    def store(self, series_uid: str, sop_uid: str, data: bytes, association: int) -> bool:
        """Write one instance, durably; True when it is the first of its series in ``incoming``.
        Raises :class:`SpoolFull` when it would pass the budget (nothing written; the series
        is then not complete before an instance of it is stored again: it lacks one)."""
        name = _name(series_uid)
        with self._lock:
            if self.used + len(data) > self.budget:
                if name in self.arriving:
                    self.arriving[name].refused = time.monotonic()
                raise SpoolFull(f"the spool holds {self.used} bytes of its budget of {self.budget}")
            self.used += len(data)
            arrival = self.arriving.get(name)
            first = arrival is None
            if arrival is None:
                arrival = self.arriving[name] = Arrival(self.incoming / name, time.monotonic())
            arrival.instances += 1
            arrival.bytes += len(data)
            arrival.associations.add(association)
            arrival.last = time.monotonic()
            folder = arrival.folder
        try:
            write_durably(folder / f"{_name(sop_uid)}.dcm", data, _PARTIAL)
        except OSError:
            with self._lock:
                self.used -= len(data)
                arrival.instances -= 1
            raise
        return first

    def receiving(self) -> None:
        """The receiver takes associations from now: series a restart found arriving are quiet
        from now on, not from when the spool was read (the model may take a while to load, and
        their senders resend what was not acknowledged only now)."""
        now = time.monotonic()
        with self._lock:
            for arrival in self.arriving.values():
                arrival.last = now

    def quiet(self, quiet_s: float) -> list[str]:
        """The series in ``incoming`` whose last instance came at least ``quiet_s`` ago, and none
        was refused since (that one is still to come)."""
        now = time.monotonic()
        with self._lock:
            return [
                name
                for name, arrival in self.arriving.items()
                if now - arrival.last >= quiet_s
                and (arrival.refused is None or arrival.refused < arrival.last)
            ]

    def of_association(self, association: int) -> list[str]:
        """The series in ``incoming`` that ``association`` sent instances of."""
        with self._lock:
            return [name for name, arrival in self.arriving.items() if association in arrival.associations]

    def complete(self, name: str) -> tuple[Path, Arrival] | None:
        """Move a series from ``incoming`` to ``ready`` (under a name of its own, should the same
        series complete twice): its folder there and what arrived; None when it is gone."""
        with self._lock:
            arrival = self.arriving.pop(name, None)
            if arrival is None or not arrival.folder.is_dir():
                return None
            target = self.ready / name
            n = 1
            while target.exists():
                n += 1
                target = self.ready / f"{name}-{n}"
            os.replace(arrival.folder, target)
            fsync_folder(self.ready)
            fsync_folder(self.incoming)
        return target, arrival

    def waiting(self) -> list[Path]:
        """The series in ``ready``, oldest first (a restart finds those it did not finish)."""
        folders = [p for p in self.ready.iterdir() if p.is_dir()]
        return sorted(folders, key=lambda p: p.stat().st_mtime)

    def done(self, folder: Path) -> None:
        """A ready series whose cases are journaled: its files go."""
        size = _size(folder) if folder.is_dir() else 0
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(folder)
        with self._lock:
            self.used -= size

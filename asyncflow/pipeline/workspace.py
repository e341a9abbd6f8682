"""One request's temporary folder: where inputs unpack and cases work, which unpacked files
cases still read, the free space it needs before work starts, and its removal.

::

    asyncflow-<request_id>-XXXX/
        owner.json              the process that owns it (pid, its start, host): see sweep_stale
        fetched/<index>         an object of a store, until it is unpacked (a window of them)
        inputs/<index>/...      what unpack wrote for input <index>
        cases/<case_id>/...     a case's working files, removed as the case ends
        restore/<index>-<n>/    scratch while files a grown series needs are unpacked again

Unpacked files are counted per case that reads them (:meth:`Workspace.hold` when a
case leaves assembly, :meth:`Workspace.end_case` when it ends; a case an earlier run
finished holds none, :meth:`Workspace.skip`) and deleted when the last reader ends,
so the folder holds the inputs being unpacked and the cases in flight, not the
whole request. A case that needs a file deleted since (its
series grew in a later archive), or one a resumed request never wrote
(:meth:`Workspace.withhold`), gets it unpacked again from its input (an object
of a store is fetched again for that).

The folder is removed when the request ends, however it ends; a process killed
outright (SIGKILL, power loss) cannot, so :func:`sweep_stale` removes at the next
start the folders whose owner no longer runs on this host.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import anyio

from asyncflow.case import Case
from asyncflow.errors import RequestError
from asyncflow.log import Stopwatch, get_logger
from asyncflow.pipeline.fetching import fetch_object
from asyncflow.reading.archives import ArchiveLimits, restore_files
from asyncflow.reading.request import FetchFailed, InputItem

__all__ = ["Workspace", "check_free_space", "sweep_stale"]

_OWNER = "owner.json"

log = get_logger(__name__)


class Workspace:
    """The temporary folder of one request; :meth:`close` removes it, whatever happened."""

    def __init__(
        self, request_id: str, parent: Path | None, items: Sequence[InputItem], limits: ArchiveLimits
    ) -> None:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=f"asyncflow-{request_id}-", dir=parent))
        owner = {"pid": os.getpid(), "started": _process_start(os.getpid()), "host": socket.gethostname()}
        (self.root / _OWNER).write_text(json.dumps(owner))
        self.items = {item.index: item for item in items}
        self.limits = limits
        self.holds: Counter[Path] = Counter()  # unpacked file -> cases that still read it
        self.released: set[Path] = set()  # unpacked files deleted since (or never written)
        # Files a resumed request did not write (inputs.Withhold), for cases not yet found finished.
        self.withheld: set[Path] = set()
        self._restores = 0

    def input_dir(self, index: int) -> Path:
        return self.root / "inputs" / f"{index:04d}"

    def case_dir(self, case: Case) -> Path:
        return self.root / "cases" / case.case_id

    def _unpacked(self, case: Case) -> list[Path]:
        """The files of ``case`` unpacked into this folder (not inputs used in place)."""
        inputs = self.root / "inputs"
        sources = [*case.files, *([case.label_file] if case.label_file else [])]
        return [p for p in dict.fromkeys(sources) if p.is_relative_to(inputs)]

    def withhold(self, files: Iterable[Path]) -> None:
        """Files unpack did not write, as a finished case used their content: held as deleted."""
        self.withheld.update(files)
        self.released.update(files)

    async def hold(self, case: Case) -> None:
        """Count ``case`` as a reader of its unpacked files; unpack again those already deleted
        (:class:`OSError` when its input no longer holds them).

        When one of them was withheld, every file withheld from that input and not yet known
        to be unneeded comes back in the same pass: its other cases (a label file added to
        an archive changes them all) then cost no further pass over the input."""
        sources = self._unpacked(case)
        self.holds.update(sources)
        missing: dict[int, set[Path]] = defaultdict(set)
        for path in sources:
            if path in self.released:
                missing[self._input_index(path)].add(path)
        for index, files in missing.items():
            if files & self.withheld:
                files |= {p for p in self.withheld if self._input_index(p) == index}
                self.withheld -= files
            watch = Stopwatch()
            scratch = self.root / "restore" / f"{index:04d}-{self._restores}"
            self._restores += 1
            item = self.items[index]
            if item.remote is not None:  # an object of a store: fetched again, outside the window
                item = await _fetch_again(item, scratch.with_name(f"{scratch.name}.object"))
            try:
                await anyio.to_thread.run_sync(
                    restore_files, item, self.input_dir(index), files, scratch, self.limits
                )
            finally:
                if item.fetched and item.path is not None:
                    item.path.unlink(missing_ok=True)
            self.released.difference_update(files)
            log.info(
                "input.restored",
                input_index=index,
                files=len(files),
                duration_s=watch.duration_s,
            )

    def _input_index(self, path: Path) -> int:
        return int(path.relative_to(self.root / "inputs").parts[0])

    def end_case(self, case: Case) -> None:
        """``case`` has ended: remove its working folder and the unpacked files no other case reads."""
        shutil.rmtree(self.case_dir(case), ignore_errors=True)
        for path in self._unpacked(case):
            self.holds[path] -= 1
            if self.holds[path] <= 0:
                del self.holds[path]
                path.unlink(missing_ok=True)
                self.released.add(path)

    def skip(self, case: Case) -> None:
        """``case`` needs no work (an earlier run finished it): its unpacked files that no case
        holds go now."""
        for path in self._unpacked(case):
            self.withheld.discard(path)
            if self.holds[path] <= 0 and path not in self.released:
                path.unlink(missing_ok=True)
                self.released.add(path)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


async def _fetch_again(item: InputItem, target: Path) -> InputItem:
    try:
        fetched, _ = await fetch_object(item, target)
    except FetchFailed as exc:
        raise OSError(f"input {item.index} could not be fetched again: {exc}") from None
    return fetched


def _process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot, /proc/<pid>/stat), so that a new process
    that got an old one's pid is told apart; None where /proc does not say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _runs(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return started is None or _process_start(pid) in (None, started)


def sweep_stale(parent: Path | None) -> tuple[int, int]:
    """Remove the request folders under ``parent`` (default: the system temp) whose owner no
    longer runs on this host; how many, and the bytes they held. A folder without an owner (an
    older asyncflow's), or of another host (a shared volume), is left alone."""
    parent = parent or Path(tempfile.gettempdir())
    removed, size = 0, 0
    for folder in parent.glob("asyncflow-*") if parent.is_dir() else []:
        try:
            owner = json.loads((folder / _OWNER).read_text())
            pid, started, host = int(owner["pid"]), owner.get("started"), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host != socket.gethostname() or _runs(pid, started):
            continue
        with contextlib.suppress(OSError):
            size += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed, size


def check_free_space(parent: Path | None, headroom: float, sizes: Sequence[int], at_once: int) -> None:
    """Fail before any work when the disk under ``parent`` (default: the system temp) cannot hold
    ``headroom`` x the largest ``at_once`` inputs (all of them for a small request)."""
    if not headroom:
        return
    parent = parent or Path(tempfile.gettempdir())
    largest = sorted(sizes, reverse=True)[:at_once]
    need = int(headroom * sum(largest))
    existing = next(p for p in (parent, *parent.parents) if p.exists())  # it may not exist yet
    free = shutil.disk_usage(existing).free
    if free < need:
        which = (
            "input"
            if len(largest) == len(sizes)
            else f"the {len(largest)} largest inputs, as many as can be unpacked at once"
        )
        raise RequestError(
            f"not enough free disk space in {parent}: about {need / 1e9:.1f} GB needed "
            f"({headroom:g} x the {sum(largest) / 1e9:.1f} GB of {which}), "
            f"{free / 1e9:.1f} GB free; free some space, choose another --work-dir, or lower disk_headroom"
        )

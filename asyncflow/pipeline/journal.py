"""The output folder a request writes case by case, and the journal a later ``--resume`` reads.

:class:`OutputFolder` (the command line's; ``run_request(sink=...)``) writes each
case's outputs as the case ends (to a temporary name in the same folder, fsync'd,
then renamed: a killed run leaves no partial file), then appends the case's journal
line (``journal.jsonl``, fsync'd): its key and the model key
(:mod:`asyncflow.pipeline.keys`), its artifacts (:class:`asyncflow.artifact.Artifact`, less
their bytes), its report and the sha256 of its source files. Its first line, written as the folder is taken, says that asyncflow started
there: a run stopped before any case ended can be resumed too. A resumed request does not write an archive member with one of those
hashes (:class:`asyncflow.reading.archives.Withhold`). A line that cannot be read,
or names outputs that are gone, is ignored: the case is done again, never resumed
wrongly.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from asyncflow.artifact import Artifact
from asyncflow.errors import SettingsError
from asyncflow.files import write_durably
from asyncflow.writing.registry import folders

__all__ = ["JOURNAL", "CaseSink", "OutputFolder", "done_entry"]

JOURNAL = "journal.jsonl"
JOURNAL_VERSION = 2  # 2: each line lists its case's artifacts
_TEMP_PREFIX = ".asyncflow-partial-"
# Files asyncflow writes into an output folder besides the case outputs.
_OWN_FILES = ("report.json", "statistics.csv", "manifest.json", JOURNAL)


class CaseSink(Protocol):
    """Where a request's outputs go as each case ends, and what an earlier run finished
    (:class:`OutputFolder`; a FLAME node's storage, :class:`asyncflow.flame.storage.NodeStorage`;
    ``run_request(sink=...)``). ``keeps_files``: the sink holds the files, so the Result's byte
    maps stay empty (an output folder); else the Result has them as well."""

    keeps_files: bool

    def finished(self, case: str, model: str) -> Mapping[str, Any] | None:
        """The journal line of a case finished with this model (``artifacts``, ``report``; from a
        sink that keeps no files, ``data``: each artifact's bytes), or None. Called in a worker
        thread."""

    def finished_sources(self, model: str) -> frozenset[str]:
        """The sha256 of every source file of the cases finished with this model: a resumed
        request does not write those files again (:class:`asyncflow.reading.archives.Withhold`)."""

    def data(self, entry: Mapping[str, Any]) -> list[bytes | None]:
        """The bytes of each artifact of a finished case's journal line (None: it has no file);
        called in a worker thread."""

    def finish_case(
        self,
        case: str | None,
        model: str,
        artifacts: Iterable[Artifact],
        report: Mapping[str, Any],
        sources: Iterable[str] = (),
    ) -> None:
        """A finished case's artifacts (those with bytes are its files), its report and the
        sha256 of its source files; called in a worker thread."""

    def withdraw(self, case: str | None, files: Iterable[tuple[str, str]]) -> None:
        """A finished case was withdrawn (its series grew): its (folder, name) files go."""


def done_entry(
    case: str, model: str, artifacts: Iterable[Artifact], report: Mapping[str, Any], **more: Any
) -> dict[str, Any]:
    """A finished case's journal entry: its key, the model key, its artifacts (less their bytes)
    and its report; ``more``: what its sink keeps besides."""
    records = [artifact.record() for artifact in artifacts]
    entry = {"journal": JOURNAL_VERSION, "case": case, "model": model, "status": "done", "artifacts": records}
    return {**entry, **more, "report": dict(report)}


class OutputFolder:
    """An output folder written case by case, with the journal a later ``--resume`` reads.

    Without ``resume`` or ``overwrite`` a folder that holds anything is refused. ``overwrite``
    removes what asyncflow wrote there (the files its journal names, its report, statistics
    and journal) and nothing else. ``resume`` keeps the journal's finished cases.
    """

    keeps_files = True

    def __init__(self, path: Path, *, resume: bool = False, overwrite: bool = False) -> None:
        if path.exists() and not path.is_dir():
            raise SettingsError(f"output {path} is a file: name a folder")
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        existing = list(path.iterdir()) if path.is_dir() else []
        for partial in [p for p in existing if p.name.startswith(_TEMP_PREFIX)]:
            partial.unlink()  # a killed run's file half written: never an output
        for folder in {folder for folder, _ in folders()}:
            for partial in (path / folder).glob(f"{_TEMP_PREFIX}*"):
                partial.unlink()
        existing = list(path.iterdir()) if path.is_dir() else []
        if existing and resume:
            if not (path / JOURNAL).is_file():
                raise SettingsError(f"--resume: {path} holds no asyncflow journal ({JOURNAL}) to resume from")
            self._entries = self._read_journal()
        elif existing and overwrite:
            self._remove_own_files()
        elif existing:
            raise SettingsError(
                f"output folder {path} is not empty (an earlier run?): --resume goes on with it, "
                "--overwrite replaces what asyncflow wrote there, or name another folder"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f"{_TEMP_PREFIX}probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SettingsError(f"output folder {path} cannot be written: {exc.strerror}") from None
        if not (path / JOURNAL).is_file():  # from the start: a run stopped before any case ends resumes
            self._append(
                {"journal": JOURNAL_VERSION, "started": datetime.now(UTC).isoformat(timespec="seconds")}
            )

    # -- the journal ------------------------------------------------------------------

    def _read_journal(self) -> dict[str, dict[str, Any]]:
        """The last valid line of each case key whose outputs are all present."""
        entries: dict[str, dict[str, Any]] = {}
        try:
            lines = (self.path / JOURNAL).read_text(errors="replace").splitlines()
        except OSError:
            return entries
        for line in lines:
            try:
                entry = json.loads(line)
                key, status = entry["case"], entry["status"]
                valid = entry["journal"] == JOURNAL_VERSION and isinstance(entry["model"], str)
                artifacts = [Artifact.from_record(record) for record in entry["artifacts"]]
                outputs = [(a.folder, a.name) for a in artifacts if a.name is not None]
                valid = valid and isinstance(entry["report"], dict)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill, or not ours: that case is done again
            if not valid:
                continue
            if status == "done" and all((self.path / f / n).is_file() for f, n in outputs):
                entries[key] = entry
            else:  # withdrawn, or its outputs are gone
                entries.pop(key, None)
        return entries

    def finished(self, case: str, model: str) -> dict[str, Any] | None:
        """The journal line of a case finished with this model, or None: then it is done again."""
        entry = self._entries.get(case)
        return entry if entry is not None and entry["model"] == model else None

    def finished_sources(self, model: str) -> frozenset[str]:
        """The sha256 of every source file of the cases finished with this model (a line without
        ``sources`` names none: its case still resumes, its files are written)."""
        return frozenset(
            str(digest)
            for entry in self._entries.values()
            if entry["model"] == model and isinstance(entry.get("sources"), list)
            for digest in entry["sources"]
        )

    def data(self, entry: Mapping[str, Any]) -> list[bytes | None]:
        """Each artifact's file, read back from the folder (None: it has no file)."""
        artifacts = [Artifact.from_record(record) for record in entry["artifacts"]]
        return [
            (self.path / a.folder / a.name).read_bytes() if a.name is not None else None for a in artifacts
        ]

    def _append(self, entry: Mapping[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock, (self.path / JOURNAL).open("a") as journal:
            journal.write(line)
            journal.flush()
            os.fsync(journal.fileno())

    # -- outputs ------------------------------------------------------------------------

    def write(self, folder: str, name: str, data: bytes) -> None:
        """One output file, atomically: a temporary name in the same folder, fsync, rename."""
        write_durably((self.path / folder if folder else self.path) / name, data, _TEMP_PREFIX)

    def finish_case(
        self,
        case: str | None,
        model: str,
        artifacts: Iterable[Artifact],
        report: Mapping[str, Any],
        sources: Iterable[str] = (),
    ) -> None:
        """A finished case: its files, then its journal line (not for a case without a key)."""
        artifacts = list(artifacts)
        written = []
        for artifact in artifacts:
            if artifact.name is not None and artifact.data is not None:
                self.write(artifact.folder, artifact.name, artifact.data)
                written.append([artifact.folder, artifact.name])
        if case is not None:
            self._append(done_entry(case, model, artifacts, report, outputs=written, sources=sorted(sources)))

    def withdraw(self, case: str | None, files: Iterable[tuple[str, str]]) -> None:
        """A case the assembly withdrew after it finished: its files go, its line is voided."""
        for folder, name in files:
            with contextlib.suppress(FileNotFoundError):
                (self.path / folder / name).unlink()
        if case is not None:
            entry = {"journal": JOURNAL_VERSION, "case": case, "model": "", "status": "withdrawn"}
            self._append({**entry, "outputs": [], "artifacts": [], "report": {}})

    def _remove_own_files(self) -> None:
        named: set[Path] = {self.path / name for name in _OWN_FILES}
        with contextlib.suppress(OSError):
            for line in (self.path / JOURNAL).read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    named.update(self.path / folder / name for folder, name in json.loads(line)["outputs"])
        for path in named:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for folder in {folder for folder, _ in folders()}:
            with contextlib.suppress(OSError):
                (self.path / folder).rmdir()  # only when empty: nothing of the user's goes

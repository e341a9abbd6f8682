"""Resume a request: what names a case and a model, and the output folder that keeps both.

A case is named by its *key*: its kind, its place (series UID and part, or its
input and path), the sha256 of every source file (taken as the bytes were
unpacked) and of a label file supplied with it. A model and everything that
changes a result is named by the *model key*: the model folder, configuration,
trainer, plans, folds, the sha256 of the checkpoints and of the folder's plans and
dataset files, and the settings that change what a case's outputs hold. A case whose key and model key match a journal line
of a finished case, and whose outputs are still there, is not done again.

:class:`OutputFolder` is the command line's output folder. It writes each case's
outputs as the case ends (to a temporary name in the same folder, fsync'd, then
renamed: a killed run leaves no partial file), then appends the case's journal
line (``journal.jsonl``, fsync'd). The line also lists the sha256 of the case's
source files: a resumed request does not write an archive member with one of
those hashes (:class:`asyncflow.reading.archives.Withhold`). A line that cannot be read, or
names outputs that are gone, is ignored: the case is done again, never resumed wrongly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from asyncflow.errors import SettingsError
from asyncflow.reading.archives import sha256_file

if TYPE_CHECKING:
    from asyncflow.backends.base import ModelInfo
    from asyncflow.case import Case
    from asyncflow.settings import Settings

__all__ = ["JOURNAL", "CaseSink", "OutputFolder", "case_key", "derived_uid", "model_key"]

JOURNAL = "journal.jsonl"
JOURNAL_VERSION = 1
_TEMP_PREFIX = ".asyncflow-partial-"
# Files asyncflow writes into an output folder besides the case outputs.
_OWN_FILES = ("report.json", "statistics.csv", JOURNAL)
# Settings that change what a case's outputs hold (the model's identity covers the rest).
_RESULT_SETTINGS = (
    "use_mirroring",
    "tile_step_size",
    "multi_modal",
    "seg_type",
    "seg_keep_empty_frames",
    "seg_compression",
    "deidentify",
    "opaque_names",
)
_UID_NAMESPACE = uuid.UUID("3f1b7c1e-9a0e-4d55-9d0c-5a9f1f1e2b61")  # asyncflow's, fixed


class CaseSink(Protocol):
    """Where a request's outputs go as each case ends, and what an earlier run finished
    (:class:`OutputFolder`; ``run_request(sink=...)``)."""

    def finished(self, case: str, model: str) -> Mapping[str, Any] | None:
        """The journal line of a case finished with this model (``report``, ``outputs``), or None."""

    def finished_sources(self, model: str) -> frozenset[str]:
        """The sha256 of every source file of the cases finished with this model: a resumed
        request does not write those files again (:class:`asyncflow.reading.archives.Withhold`)."""

    def finish_case(
        self,
        case: str | None,
        model: str,
        files: Iterable[tuple[str, str, bytes]],
        report: Mapping[str, Any],
        sources: Iterable[str] = (),
    ) -> None:
        """A finished case's (folder, name, bytes) files, its report and the sha256 of its
        source files; called in a worker thread."""

    def withdraw(self, case: str | None, files: Iterable[tuple[str, str]]) -> None:
        """A finished case was withdrawn (its series grew): its (folder, name) files go."""


def case_key(case: Case, hashes: Mapping[Path, str]) -> str | None:
    """The case's key, or None when a source file's content hash is unknown."""
    try:
        contents = sorted(hashes[path] for path in case.files)
        # From the hashes, not the file: a label file shared by an input's cases may be gone by
        # now (deleted when another of them was found finished).
        label_file = hashes[case.label_file] if case.label_file is not None else None
    except KeyError:
        return None
    source = case.source
    place = (
        [source.series_instance_uid, source.part]
        if source and source.series_instance_uid
        else [case.origin, source.location if source else case.output_name]
    )
    text = json.dumps([str(case.kind), place, contents, label_file, case.output_name])
    return hashlib.sha256(text.encode()).hexdigest()


_checkpoint_hashes: dict[tuple[str, int, int], str] = {}
_checkpoint_lock = threading.Lock()


def _checkpoint_sha256(path: Path) -> str:
    """A checkpoint's sha256, read once per process while its size and mtime stay the same."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _checkpoint_lock:
        if key not in _checkpoint_hashes:
            _checkpoint_hashes[key] = sha256_file(path)
        return _checkpoint_hashes[key]


def model_key(info: ModelInfo, settings: Settings) -> str:
    """The model's identity and every setting that changes a result, as one hex digest."""
    checkpoints = {}
    for fold in info.folds:
        folder = info.folder / f"fold_{fold}"
        for path in sorted(folder.glob(f"{info.checkpoint}*")) if folder.is_dir() else []:
            checkpoints[f"fold_{fold}/{path.name}"] = _checkpoint_sha256(path)
    label_config = sha256_file(settings.label_config) if settings.label_config else None
    # plans.json and dataset.json (v2), plans.pkl (v1): spacing, normalisation, labels
    plans = {path.name: sha256_file(path) for path in sorted(info.folder.glob("*.json"))}
    plans |= {path.name: sha256_file(path) for path in sorted(info.folder.glob("*.pkl"))}
    identity = {
        "folder": str(info.folder.resolve()) if info.folder.exists() else str(info.folder),
        "plans": plans,
        "model": [info.name, info.configuration, info.trainer, info.plans, info.generation],
        "folds": [str(f) for f in info.folds],
        "checkpoints": checkpoints,
        "settings": {name: _plain(getattr(settings, name)) for name in _RESULT_SETTINGS},
        "label_config": label_config,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _plain(value: Any) -> Any:
    return value if isinstance(value, bool | int | float | str | type(None)) else str(value)


def derived_uid(*parts: str) -> str:
    """A DICOM UID under 2.25 from a name-based (SHA-1) UUID of ``parts``: the same parts give
    the same UID, so a repeated or resumed run writes the same SEG identity."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(parts)).int}"


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputFolder:
    """An output folder written case by case, with the journal a later ``--resume`` reads.

    Without ``resume`` or ``overwrite`` a folder that holds anything is refused. ``overwrite``
    removes what asyncflow wrote there (the files its journal names, its report, statistics
    and journal) and nothing else. ``resume`` keeps the journal's finished cases.
    """

    def __init__(self, path: Path, *, resume: bool = False, overwrite: bool = False) -> None:
        if path.exists() and not path.is_dir():
            raise SettingsError(f"output {path} is a file: name a folder")
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        existing = list(path.iterdir()) if path.is_dir() else []
        for partial in [p for p in existing if p.name.startswith(_TEMP_PREFIX)]:
            partial.unlink()  # a killed run's file half written: never an output
        for folder in ("dicom_seg", "nifti_seg"):
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
                outputs = [(str(folder), str(name)) for folder, name in entry["outputs"]]
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
        """The sha256 of every source file of the cases finished with this model (lines of
        an earlier version name none: their files are written, and the cases still resume)."""
        return frozenset(
            str(digest)
            for entry in self._entries.values()
            if entry["model"] == model and isinstance(entry.get("sources"), list)
            for digest in entry["sources"]
        )

    def _append(self, entry: Mapping[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock, (self.path / JOURNAL).open("a") as journal:
            journal.write(line)
            journal.flush()
            os.fsync(journal.fileno())

    # -- outputs ------------------------------------------------------------------------

    def write(self, folder: str, name: str, data: bytes) -> None:
        """One output file, atomically: a temporary name in the same folder, fsync, rename."""
        target_folder = self.path / folder if folder else self.path
        target_folder.mkdir(parents=True, exist_ok=True)
        temporary = target_folder / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with temporary.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target_folder / name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        _fsync_folder(target_folder)

    def finish_case(
        self,
        case: str | None,
        model: str,
        files: Iterable[tuple[str, str, bytes]],
        report: Mapping[str, Any],
        sources: Iterable[str] = (),
    ) -> None:
        """A finished case: its files, then its journal line (not for a case without a key)."""
        written = []
        for folder, name, data in files:
            self.write(folder, name, data)
            written.append([folder, name])
        if case is not None:
            self._append(
                {
                    "journal": JOURNAL_VERSION,
                    "case": case,
                    "model": model,
                    "status": "done",
                    "outputs": written,
                    "sources": sorted(sources),
                    "report": dict(report),
                }
            )

    def withdraw(self, case: str | None, files: Iterable[tuple[str, str]]) -> None:
        """A case the assembly withdrew after it finished: its files go, its line is voided."""
        for folder, name in files:
            with contextlib.suppress(FileNotFoundError):
                (self.path / folder / name).unlink()
        if case is not None:
            entry = {"journal": JOURNAL_VERSION, "case": case, "model": "", "status": "withdrawn"}
            self._append({**entry, "outputs": [], "report": {}})

    def _remove_own_files(self) -> None:
        named: set[Path] = {self.path / name for name in _OWN_FILES}
        with contextlib.suppress(OSError):
            for line in (self.path / JOURNAL).read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    named.update(self.path / folder / name for folder, name in json.loads(line)["outputs"])
        for path in named:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for folder in ("dicom_seg", "nifti_seg"):
            with contextlib.suppress(OSError):
                (self.path / folder).rmdir()  # only when empty: nothing of the user's goes

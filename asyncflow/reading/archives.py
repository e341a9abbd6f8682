"""Unpack one input safely: archives recognised by content, members within limits, none outside.

Plain synchronous functions; the pipeline runs them off the event loop.

Archives are TAR, plain or gz/bz2/xz compressed, recognised by content and never
by name. Every archive member goes through Python's ``tarfile`` data filter (PEP
706): nothing is written outside the input's own folder, and links and special
files are not extracted. An input that is no archive is one file: used in place
when it is a local file, written as it is when it came as bytes, moved into place
when it is an object fetched for the request.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncflow.case import Found, SkippedFile
from asyncflow.digests import sha256_file
from asyncflow.enums import InputFailure, InputKind
from asyncflow.reading.dicom import series_uid
from asyncflow.reading.names import has_tar_suffix, sanitise_relpath
from asyncflow.reading.request import InputItem

__all__ = [
    "ArchiveLimits",
    "UnpackedInput",
    "Withhold",
    "restore_files",
    "unpack",
]

_COMPRESSED: dict[bytes, Callable[..., Any]] = {
    b"\x1f\x8b": gzip.open,
    b"BZh": bz2.open,
    b"\xfd7zXZ": lzma.open,
}
_PROBE_BYTES = 1 << 20  # how much of a compressed non-archive input is test-decompressed


@dataclass
class UnpackedInput:
    item: InputItem
    kind: InputKind
    root: Path  # files are reported relative to this folder
    files: list[Path] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    bytes_written: int = 0
    # sha256 of each file's content, taken as its bytes were written (or, for a file used in
    # place, read once here): what names a case's content in the resume journal.
    hashes: dict[Path, str] = field(default_factory=dict)
    # Files not written because a finished case already used their content (:class:`Withhold`),
    # with what their bytes were found to be; they are in ``files`` and ``hashes`` too.
    withheld: dict[Path, Found] = field(default_factory=dict)
    bytes_withheld: int = 0
    error: str | None = None  # why the input could not be used, for the report
    failure: InputFailure | None = None  # the same, as a kind
    # A failed archive: the DICOM series it had begun to deliver, now incomplete elsewhere.
    broken_series: set[str] = field(default_factory=set)

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.name


def _open_tar(item: InputItem) -> tarfile.TarFile | None:
    """The archive, or None when the content is not a TAR (plain, gz, bz2 or xz)."""
    stream = item.open()
    try:
        return tarfile.open(fileobj=stream, mode="r:*")
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError):
        # Not a TAR; a compressed stream cut short (a 2-byte gzip) raises EOFError here, which
        # _corrupt_compression then names.
        stream.close()
        return None


def _corrupt_compression(item: InputItem) -> str | None:
    """Why a gz/bz2/xz input cannot be decompressed, or None when it can (or is not compressed).

    Only the start is probed: enough to tell a truncated archive from a .nii.gz.
    """
    with item.open() as stream:
        head = stream.read(6)
        stream.seek(0)
        opener = next((o for magic, o in _COMPRESSED.items() if head.startswith(magic)), None)
        if opener is None:
            return None
        try:
            with opener(stream) as decompressed:
                decompressed.read(_PROBE_BYTES)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            return f"compressed input is truncated or corrupt: {type(exc).__name__}"
    return None


@dataclass(frozen=True)
class ArchiveLimits:
    """What one input may expand to; an archive over any limit fails as a whole, with the reason.

    ``max_ratio`` caps the extracted bytes at that multiple of the input's size,
    but never below ``ratio_floor_bytes``, so small archives of well-compressible
    files pass.
    """

    max_bytes: int = 100 << 30
    max_members: int = 200_000
    max_file_bytes: int = 16 << 30
    max_ratio: float = 100.0
    ratio_floor_bytes: int = 1 << 30
    max_depth: int = 2  # an archive inside an archive is unpacked; one level deeper is not

    def allowed_bytes(self, input_bytes: int) -> int:
        return min(self.max_bytes, max(int(self.max_ratio * input_bytes), self.ratio_floor_bytes))


@dataclass(frozen=True)
class Withhold:
    """What a resumed request need not write: the content of files a finished case used.

    A member (or a single-file input held in memory) of at most ``max_bytes`` is read
    into memory and hashed there; when its sha256 is one of ``hashes`` it is classified
    from those bytes by ``inspect`` and not written (:attr:`UnpackedInput.withheld`).
    Should a case need it after all, the workspace unpacks it again
    (:func:`restore_files`). Larger members are written as always.
    """

    hashes: frozenset[str]
    inspect: Callable[[Path, bytes], Found]
    max_bytes: int = 64 << 20


class _LimitExceeded(Exception):
    pass


def _size(value: int) -> str:
    return f"{value / (1 << 30):.1f} GiB" if value >= 1 << 30 else f"{value / (1 << 20):.1f} MiB"


class _Extraction:
    """One input's archive (and the archives inside it), member by member, within the limits."""

    def __init__(self, item: InputItem, dest: Path, limits: ArchiveLimits, withhold: Withhold | None) -> None:
        self.item, self.limits, self.withhold = item, limits, withhold
        self.allowed = limits.allowed_bytes(item.size)
        self.result = UnpackedInput(item, InputKind.ARCHIVE, dest)
        self.members = 0

    def refuse(self, name: str, reason: str) -> None:
        self.result.skipped.append(SkippedFile(self.item.origin, name, reason, refused=True))

    def extract(self, tar: tarfile.TarFile, into: Path, prefix: str, depth: int) -> None:
        for member in tar:
            name = f"{prefix}{member.name}"
            try:
                safe = tarfile.data_filter(member, str(into))
            except tarfile.FilterError as exc:
                self.refuse(name, f"refused by the tar data filter: {exc}")
                continue
            if safe.isdir():
                continue
            if not safe.isfile():
                self.refuse(name, "links and special files are not extracted")
                continue
            self.members += 1
            if self.members > self.limits.max_members:
                raise _LimitExceeded(f"more than {self.limits.max_members} members")
            if safe.size > self.limits.max_file_bytes:
                raise _LimitExceeded(
                    f"member of {_size(safe.size)}, over {_size(self.limits.max_file_bytes)}"
                )
            if self.result.bytes_written + self.result.bytes_withheld + safe.size > self.allowed:
                raise _LimitExceeded(
                    f"expands to more than {_size(self.allowed)} "
                    f"(from {_size(self.item.size)}: an archive bomb?)"
                )
            target = self._target(into, safe.name)
            source = tar.extractfile(safe)
            assert source is not None
            with source:
                if self.withhold is not None and safe.size <= self.withhold.max_bytes:
                    data = source.read()
                    if _withheld(self.result, self.withhold, target, data):
                        continue
                    self.result.hashes[target] = _write(target, data)
                else:
                    digest = hashlib.sha256()
                    with target.open("wb") as out:
                        while chunk := source.read(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                    self.result.hashes[target] = digest.hexdigest()
            self.result.withheld.pop(target, None)  # a repeated name: the last member wins
            self.result.bytes_written += safe.size
            self._unpack_nested(target, f"{name}/", depth)

    def _target(self, into: Path, name: str) -> Path:
        """A safe, short path for a member (names sanitised; a repeated name: the last one wins)."""
        target = into / sanitise_relpath(name, "member")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _unpack_nested(self, path: Path, prefix: str, depth: int) -> None:
        try:
            inner = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the with below
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError):
            self.result.files.append(path)
            return
        with inner:
            # No member: an empty TAR, or a run of zero bytes (which opens as one). Kept as a
            # file like any other, for scan to judge and the report to list.
            if inner.next() is None:
                self.result.files.append(path)
                return
            if depth >= self.limits.max_depth:
                self.refuse(prefix.rstrip("/"), f"archive nested deeper than {self.limits.max_depth} levels")
            else:
                self.extract(inner, path.parent / f"{path.name}.d", prefix, depth + 1)
        path.unlink()


def _write(target: Path, data: bytes) -> str:
    """Write ``data`` to ``target``; its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _withheld(result: UnpackedInput, withhold: Withhold, target: Path, data: bytes) -> bool:
    """Book ``data`` as withheld when a finished case used its content (True), else nothing."""
    digest = hashlib.sha256(data).hexdigest()
    if digest not in withhold.hashes:
        return False
    target.unlink(missing_ok=True)  # a repeated name: the last member wins
    result.withheld[target] = withhold.inspect(target, data)
    result.hashes[target] = digest
    result.files.append(target)
    result.bytes_withheld += len(data)
    return True


def unpack(
    item: InputItem, dest: Path, limits: ArchiveLimits | None = None, withhold: Withhold | None = None
) -> UnpackedInput:
    """Extract an archive into ``dest``, or place a single file there (bytes) or in place (path),
    or take a folder's files in place (a LocalFolder, as an archive's members); with
    ``withhold``, files a finished case used are classified in memory, not written.

    A failure leaves no files of this input behind: a half-extracted archive could
    otherwise turn into a silently incomplete DICOM series.
    """
    if item.size == 0:
        return _failed(item, dest, InputFailure.EMPTY, "empty input (0 bytes)")
    if item.folder:
        assert item.path is not None
        files = sorted(p for p in item.path.rglob("*") if p.is_file())
        hashes = {path: sha256_file(path) for path in files}
        return UnpackedInput(item, InputKind.ARCHIVE, item.path, files=files, hashes=hashes)
    tar = _open_tar(item)
    if tar is not None:
        return _extract(item, tar, dest, limits or ArchiveLimits(), withhold)
    reason = _corrupt_compression(item)
    if reason:
        return _failed(item, dest, InputFailure.TRUNCATED, reason)
    if has_tar_suffix(item.name):
        reason = "not a TAR archive, though its name says so: it cannot be read"
        return _failed(item, dest, InputFailure.NOT_AN_ARCHIVE, reason)
    return _single_file(item, dest, withhold)


def _failed(
    item: InputItem, dest: Path, failure: InputFailure, error: str, kind: InputKind = InputKind.FILE
) -> UnpackedInput:
    return UnpackedInput(item, kind, dest, error=error, failure=failure)


def _single_file(item: InputItem, dest: Path, withhold: Withhold | None) -> UnpackedInput:
    """An input that is no archive: a local file is used in place, bytes are written to ``dest``,
    a fetched object is moved there."""
    target = dest / sanitise_relpath(item.name)
    if item.fetched:
        assert item.path is not None
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(item.path, target)
        moved = UnpackedInput(item, InputKind.FILE, dest, files=[target], bytes_written=item.size)
        moved.hashes[target] = sha256_file(target)
        return moved
    if item.path is not None:
        hashes = {item.path: sha256_file(item.path)}
        return UnpackedInput(item, InputKind.FILE, item.path.parent, files=[item.path], hashes=hashes)
    assert item.data is not None
    single = UnpackedInput(item, InputKind.FILE, dest)
    if withhold is None or not _withheld(single, withhold, target, item.data):
        single.hashes[target] = _write(target, item.data)
        single.files.append(target)
        single.bytes_written = len(item.data)
    return single


def _extract(
    item: InputItem, tar: tarfile.TarFile, dest: Path, limits: ArchiveLimits, withhold: Withhold | None
) -> UnpackedInput:
    extraction = _Extraction(item, dest, limits, withhold)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tar:
            extraction.extract(tar, dest, "", 1)
    except _LimitExceeded as exc:
        shutil.rmtree(dest, ignore_errors=True)
        return _failed(item, dest, InputFailure.OVER_A_LIMIT, f"archive refused: {exc}", InputKind.ARCHIVE)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as exc:
        withheld = extraction.result.withheld.values()
        broken = {uid for uid in map(series_uid, extraction.result.files) if uid}
        broken |= {found.instance.series_instance_uid for found in withheld if found.instance}
        shutil.rmtree(dest, ignore_errors=True)
        reason = f"archive could not be read: {type(exc).__name__}: {exc}"
        failed = _failed(item, dest, InputFailure.UNREADABLE_ARCHIVE, reason, InputKind.ARCHIVE)
        failed.broken_series = broken
        return failed
    result = extraction.result
    # Several members may share a name; the last one wins, as in any extraction.
    result.files = list(dict.fromkeys(result.files))
    return result


def restore_files(
    item: InputItem, dest: Path, files: Iterable[Path], scratch: Path, limits: ArchiveLimits | None = None
) -> None:
    """Put back files that :func:`unpack` once wrote into ``dest`` and that were deleted since.

    The input is unpacked again into ``scratch`` (extraction is deterministic: a
    member always lands on the same path) and the wanted files are moved into
    place; nothing else in ``dest`` is touched. Raises :class:`FileNotFoundError`
    when the input no longer holds one of them.
    """
    try:
        again = unpack(item, scratch, limits)
        if again.error:
            raise FileNotFoundError(f"input {item.index} cannot be unpacked again: {again.error}")
        for file in files:
            fresh = scratch / file.relative_to(dest)
            if not fresh.is_file():
                raise FileNotFoundError(f"input {item.index} no longer holds {file.relative_to(dest)}")
            file.parent.mkdir(parents=True, exist_ok=True)
            os.replace(fresh, file)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

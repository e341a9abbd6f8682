"""What the files of one unpacked input are, by content: DICOM instances, NIfTI volumes, MITK
label files, or skipped with a reason.

:func:`scan` classifies every file of an input (run off the event loop, by the
unpack workers); :func:`classify` is the judgement for one file, from the file or
from its bytes held in memory (a member a resumed request withholds).
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from asyncflow.case import DicomInstance, Found, SkippedFile
from asyncflow.enums import FileKind
from asyncflow.labels.mitk import is_mitk_label_json
from asyncflow.reading.archives import UnpackedInput
from asyncflow.reading.dicom import NotAnImage, has_dicom_preamble, read_instance

__all__ = ["Scan", "classify", "is_nifti_header", "nifti_sizes", "scan"]


def is_nifti_header(head: bytes) -> bool:
    """NIfTI-1 (single file, 'n+1') or NIfTI-2 ('n+2') header at the start of ``head``."""
    if len(head) >= 348 and head[344:348] == b"n+1\0":
        return int.from_bytes(head[:4], "little") == 348 or int.from_bytes(head[:4], "big") == 348
    if len(head) >= 8 and head[4:8] == b"n+2\0":
        return int.from_bytes(head[:4], "little") == 540 or int.from_bytes(head[:4], "big") == 540
    return False


def _opener(path: Path, data: bytes | None) -> Callable[[], BinaryIO]:
    """Opens the file's content: ``data`` when given (a member held in memory), else the file."""
    if data is not None:
        return lambda: io.BytesIO(data)
    return lambda: path.open("rb")


def _head(open_: Callable[[], BinaryIO]) -> bytes:
    with open_() as f:
        head = f.read(544)
    if head[:2] == b"\x1f\x8b":
        try:
            with open_() as raw, gzip.open(raw, "rb") as f:
                return f.read(544)
        except (OSError, EOFError, zlib.error):
            return b""
    return head


@dataclass
class Scan:
    """What one unpacked input holds."""

    unpacked: UnpackedInput
    nifti: list[Path] = field(default_factory=list)
    dicom: list[DicomInstance] = field(default_factory=list)
    label_files: list[Path] = field(default_factory=list)  # *.mitklabel.json
    skipped: list[SkippedFile] = field(default_factory=list)


def nifti_sizes(head: bytes) -> tuple[int, int]:
    """(voxel data offset, voxel bytes) a NIfTI-1/2 header declares."""
    little = int.from_bytes(head[:4], "little") in (348, 540)
    order = "<" if little else ">"
    if head[344:348] == b"n+1\0":
        dims = struct.unpack(f"{order}8h", head[40:56])
        bitpix = struct.unpack(f"{order}h", head[72:74])[0]
        offset = int(struct.unpack(f"{order}f", head[108:112])[0])
    else:
        bitpix = struct.unpack(f"{order}h", head[14:16])[0]
        dims = struct.unpack(f"{order}8q", head[16:80])
        offset = struct.unpack(f"{order}q", head[168:176])[0]
    count = max(1, min(int(dims[0]), 7))
    voxels = np.prod([max(1, int(d)) for d in dims[1 : count + 1]], dtype=np.float64)
    return offset, int(voxels * max(bitpix, 1) // 8)


def _nifti_problem(open_: Callable[[], BinaryIO], head: bytes, max_file_bytes: int) -> str | None:
    """Why a NIfTI file must not be read: a decompression bomb, or fewer bytes than declared.

    Checked from the header and the file's size (a .gz trailer holds the size of
    the data mod 2**32), without decompressing: SimpleITK reads a truncated
    volume without complaint.
    """
    offset, declared = nifti_sizes(head)
    if declared > max_file_bytes:
        return f"NIfTI declares {declared / (1 << 30):.1f} GiB of voxels, over the {max_file_bytes / (1 << 30):.1f} GiB limit"
    needed = offset + declared
    with open_() as f:
        if f.read(2) == b"\x1f\x8b":
            f.seek(-4, 2)
            held = int.from_bytes(f.read(4), "little")
            if needed >= 1 << 32:
                return None
        else:
            held = f.seek(0, 2)
    if held < needed:
        return f"NIfTI is truncated: {held} bytes, its header declares {needed}"
    return None


def scan(unpacked: UnpackedInput, max_file_bytes: int = 16 << 30) -> Scan:
    """Classify every file of an input by content, never by name (a member unpack withheld
    was classified from its bytes then: :attr:`UnpackedInput.withheld`).

    The one exception: MITK label JSON is known by its ``.mitklabel.json`` suffix
    (and a JSON start), as MITK itself knows it.
    """
    result = Scan(unpacked, skipped=list(unpacked.skipped))
    for path in unpacked.files:
        found = unpacked.withheld.get(path) or classify(path, max_file_bytes=max_file_bytes)
        if found.kind is FileKind.LABEL:
            result.label_files.append(path)
        elif found.kind is FileKind.DICOM:
            assert found.instance is not None
            result.dicom.append(found.instance)
        elif found.kind is FileKind.NIFTI:
            result.nifti.append(path)
        else:
            reason = found.reason or "could not be classified"
            result.skipped.append(SkippedFile(unpacked.item.origin, unpacked.relative(path), reason))
    return result


def classify(path: Path, data: bytes | None = None, *, max_file_bytes: int = 16 << 30) -> Found:
    """What file ``path`` is, by its content (``data`` when given, else the file's)."""
    try:
        return _classify(path, _opener(path, data), data, max_file_bytes)
    except OSError as exc:
        return Found(None, reason=f"unreadable: {exc.strerror}")
    except Exception as exc:  # noqa: BLE001 - one odd file is skipped, never the request
        return Found(None, reason=f"could not be classified ({type(exc).__name__})")


def _classify(path: Path, open_: Callable[[], BinaryIO], data: bytes | None, max_file_bytes: int) -> Found:
    head = _head(open_)
    if is_mitk_label_json(path.name, head):
        return Found(FileKind.LABEL)
    if has_dicom_preamble(head):
        try:
            return Found(FileKind.DICOM, read_instance(path, data))
        except NotAnImage as exc:
            return Found(None, reason=str(exc))
        except Exception as exc:  # noqa: BLE001 - a malformed header skips its file, not the request
            return Found(None, reason=f"malformed DICOM header ({type(exc).__name__})")
    if is_nifti_header(head):
        problem = _nifti_problem(open_, head, max_file_bytes)
        return Found(None, reason=problem) if problem else Found(FileKind.NIFTI)
    return Found(None, reason="neither DICOM nor NIfTI")

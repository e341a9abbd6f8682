"""The values asyncflow's statuses, kinds and options take, as string enums.

A ``StrEnum`` member is its string: JSON, logs, reports and comparisons with plain
strings (``status == "done"``) stay as they were; code names the value it means.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "CaseStatus",
    "DeidentifyProfile",
    "InputKind",
    "RequestStatus",
    "SegCompression",
    "SegType",
    "SourceKind",
    "Stage",
]


class RequestStatus(StrEnum):
    """How a request ended (``Result.status``, ``request.finished``)."""

    DONE = "done"  # every case done, every input read
    PARTIAL = "partial"  # some cases failed, or an input was lost
    FAILED = "failed"  # every case failed
    ERROR = "error"  # ended early: no usable case, a model error, a crash
    CANCELLED = "cancelled"


class CaseStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    RESUMED = "resumed"  # done by an earlier run of the same request (asyncflow.pipeline.journal)


class SourceKind(StrEnum):
    """What a case was made from."""

    DICOM = "dicom"
    NIFTI = "nifti"


class InputKind(StrEnum):
    """What a request input turned out to be, by content."""

    ARCHIVE = "archive"
    FILE = "file"


class Stage(StrEnum):
    """The stages a case's failure is booked to (``error_stage``, ``case.failed``)."""

    PREPARE = "prepare"
    PREDICT = "predict"
    EXPORT = "export"


class SegType(StrEnum):
    """DICOM SEG segmentation types (LABELMAP is new; not every reader knows it yet)."""

    BINARY = "BINARY"
    FRACTIONAL = "FRACTIONAL"
    LABELMAP = "LABELMAP"


class SegCompression(StrEnum):
    """Lossless frame compression of FRACTIONAL and LABELMAP SEGs."""

    NONE = "none"
    RLE = "rle"
    JPEG2000 = "jpeg2000"
    JPEGLS = "jpegls"


class DeidentifyProfile(StrEnum):
    """What is done to a SEG before it leaves (asyncflow.writing.deidentify)."""

    NONE = "none"
    BASIC = "basic"  # PS3.15 Basic Application Level Confidentiality Profile, Retain UIDs Option

"""The values asyncflow's statuses, kinds and options take, as string enums.

A ``StrEnum`` member is its string: JSON, logs, reports and comparisons with plain
strings (``status == "done"``) work; code names the value it means.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "CaseStatus",
    "DeidentifyProfile",
    "FileKind",
    "Generation",
    "InputFailure",
    "InputKind",
    "ModelGeneration",
    "RequestStatus",
    "Resampling",
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


class InputFailure(StrEnum):
    """Why a request input could not be used (the report's input ``failure``, beside its
    ``error`` message); the FLAME Hub counts lost inputs by it, never by their messages."""

    EMPTY = "empty input"
    TRUNCATED = "truncated compressed input"  # a gz/bz2/xz stream that does not decompress
    NOT_AN_ARCHIVE = "not an archive"  # named like a TAR, holds none
    UNREADABLE_ARCHIVE = "unreadable archive"  # a TAR that breaks while it is read
    OVER_A_LIMIT = "archive over a limit"  # members, bytes, ratio (Settings' max_archive_*)
    # An object of a store (a FLAME node's S3 data) that could not be fetched:
    NOT_FOUND = "object not found"  # the store has no such object (a key the analyst named)
    FETCH_REFUSED = "object refused"  # the store answered 4xx: retrying would not help
    FETCH_FAILED = "object not fetched"  # transient errors (connect, timeout, 5xx) on every try
    NOT_READ = "not read"  # the request stopped before it read the input (or all of it)


class FileKind(StrEnum):
    """What a file of an input is, by its content."""

    DICOM = "dicom"
    NIFTI = "nifti"
    LABEL = "label"  # MITK label stack JSON (*.mitklabel.json)


class Generation(StrEnum):
    """The nnU-Net generation a model was trained with."""

    V1 = "v1"  # nnU-Net 1.x, run through nnUNet_predict
    V2 = "v2"  # nnunetv2, in process


class ModelGeneration(StrEnum):
    """Setting ``backend``: which generation the model is, or ``auto`` to tell them apart by files."""

    AUTO = "auto"
    V1 = "v1"
    V2 = "v2"


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


class Resampling(StrEnum):
    """Which resampling nnU-Net's steps use on either side of the network (setting ``resampling``;
    :mod:`asyncflow.backends.resampling`)."""

    MODEL = "model"  # what the model's plans name: voxel-identical to nnUNetv2_predict
    TORCH = "torch"  # nnU-Net's resample_torch_fornnunet, in the prepare and export workers
    TORCH_DEVICE = "torch-device"  # the same; the logits resampled by the prediction worker, on its device

"""The values that travel between stages, and the per-case report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from asyncflow.artifact import Artifact, Delivery
from asyncflow.enums import CaseStatus, FileKind, SourceKind

__all__ = [
    "Case",
    "CaseReport",
    "CaseSource",
    "DicomInstance",
    "Found",
    "Geometry",
    "PreparedCase",
    "Shear",
    "SkippedFile",
]


@dataclass(frozen=True)
class DicomInstance:
    """The header facts of one DICOM image file that grouping and sorting need."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str | None
    frame_of_reference_uid: str | None
    series_number: int | None
    position: tuple[float, float, float] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 values)
    rows: int
    columns: int
    image_type: tuple[str, ...] = ()  # ImageType values, upper case
    modality: str | None = None
    acquisition_number: int | None = None
    frames: int = 1
    # Multi-frame (enhanced) images: ImagePositionPatient of each frame, in frame order.
    frame_positions: tuple[tuple[float, float, float], ...] = ()
    # What tells the volumes of a 4D series apart (asyncflow.reading.volumes): attribute keyword
    # -> value as text, the attributes present and not empty. A multi-frame image: the same of
    # each frame, from its functional groups and dimension index.
    facts: tuple[tuple[str, str], ...] = ()
    frame_facts: tuple[tuple[tuple[str, str], ...], ...] = ()
    mosaic: int = 0  # a Siemens mosaic: the number of slices tiled in its one frame, else 0
    # What series selection reads (asyncflow.reading.select.KEYWORDS): keyword -> value as text.
    described: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Found:
    """What scanning found one file to be: its ``kind`` (DICOM with its ``instance``), or None
    when it is skipped, with the ``reason``."""

    kind: FileKind | None
    instance: DicomInstance | None = None
    reason: str | None = None


@dataclass(frozen=True)
class CaseSource:
    """Where a case comes from, in terms a user can find it by and that hold no patient data.

    ``location`` (the folder of a series inside its input, or a NIfTI's path
    there) is for the local report only: paths may hold names, so it is never logged.
    """

    location: str
    series_instance_uid: str | None = None  # DICOM only
    series_number: int | None = None
    modality: str | None = None
    part: str | None = None  # which stack of a series that holds several volumes
    files: int = 0  # DICOM instances, or NIfTI channels
    frames: int | None = None  # of a multi-frame image that holds several volumes: this one's frames

    def event_fields(self) -> dict[str, Any]:
        """The fields ``case.*`` events carry (no location: paths are never logged)."""
        fields = {
            "series_instance_uid": self.series_instance_uid,
            "series_number": self.series_number,
            "modality": self.modality,
            "part": self.part,
            "instances": self.files if self.series_instance_uid else None,
            "frames": self.frames,
        }
        return {key: value for key, value in fields.items() if value is not None}

    def as_dict(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "series_instance_uid": self.series_instance_uid,
            "series_number": self.series_number,
            "modality": self.modality,
            "part": self.part,
            "files": self.files,
            **({"frames": self.frames} if self.frames is not None else {}),
        }


@dataclass(frozen=True)
class Origin:
    """The request input a case or a file came from. Its index identifies it: two data sources
    may hold objects of the same key, so names alone can collide. The name (object key, file
    path) is for the local report only, never logged."""

    index: int
    name: str


@dataclass
class Case:
    """One volume to segment: a DICOM series or a NIfTI volume (one file per channel)."""

    case_id: str  # opaque and stable within the request: never patient data
    kind: SourceKind
    output_name: str  # unique stem of the output file
    origin: Origin  # the request input it came from
    files: list[Path]  # NIfTI: one per channel, in channel order; DICOM: unordered
    instances: list[DicomInstance] = field(default_factory=list)
    label_file: Path | None = None  # a *.mitklabel.json supplied with the case's input
    # What names the case without patient data (report and events): see :class:`CaseSource`.
    source: CaseSource | None = None
    # One volume of a 4D multi-frame image: its frames (0-based), in frame order; None: every frame.
    frames: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels lie: SimpleITK (x, y, z) size, origin, spacing, direction, and,
    for a NIfTI source, what its coordinates are relative to (qform_code, sform_code: 1 scanner,
    2 aligned, 3 Talairach, 4 MNI), which an output on this grid keeps."""

    size: tuple[int, ...]
    origin: tuple[float, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]
    xform_codes: tuple[int, int] | None = None

    @classmethod
    def of(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        codes = None
        if image.HasMetaDataKey("qform_code") and image.HasMetaDataKey("sform_code"):
            codes = (int(image.GetMetaData("qform_code")), int(image.GetMetaData("sform_code")))
        return cls(image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection(), codes)

    @classmethod
    def of_file(cls, path: Path) -> Geometry:
        """From an image file's header alone."""
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return cls.of(reader)

    def apply(self, image: sitk.Image) -> sitk.Image:
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image


@dataclass(frozen=True)
class Shear:
    """The grid of a gantry-tilted series (:mod:`asyncflow.reading.tilt`): the sideways step from
    one slice to the next, in pixels (rows, columns), and its tilt."""

    rows: float
    columns: float
    degrees: float

    def extent(self, shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
        """For a (z, y, x) ``shape`` on the sheared grid: the untilted grid's first row and column,
        counted in the first slice's pixels (0 or negative), and its rows and columns, which hold
        every source pixel of every slice."""
        slices = shape[0]
        extent = []
        for size, step in ((shape[1], self.rows), (shape[2], self.columns)):
            total = (slices - 1) * step
            first = math.floor(min(0.0, total) + 1e-6)
            last = math.ceil(size - 1 + max(0.0, total) - 1e-6)
            extent.append((first, last - first + 1))
        (row, rows), (column, columns) = extent
        return (row, column), (rows, columns)


@dataclass
class PreparedCase:
    """A case as model input: its channels in memory, and as files when the backend reads files."""

    case: Case
    workdir: Path
    images: list[sitk.Image]  # one per channel, in channel order; emptied once preprocessed or predicted
    geometry: Geometry  # of channel 0: the grid the prediction comes back on
    channel_files: list[Path]  # <case_id>_0000.nii.gz, _0001 ... (empty unless written)
    source_files: list[Path]  # DICOM: instances in slice order (index = z); NIfTI: as input
    # A multi-frame DICOM source: its frame index (0-based) of each slice, in slice order.
    frame_order: list[int] | None = None
    # A gantry-tilted source, prepared on an untilted grid (asyncflow.reading.tilt): its shear.
    shear: Shear | None = None
    # What the backend's CPU preprocessing made of ``images`` (``ModelSteps.preprocess``; v2:
    # nnU-Net's data on the model's grid and its properties): the prediction worker's input,
    # dropped once the case is predicted.
    model_input: Any = None
    # Channel 0 on ``geometry`` (CT in HU, the rescale applied, a tilted series untilted), kept
    # after ``images`` are dropped: the intensities the export's measurements read.
    intensities: sitk.Image | None = None


@dataclass
class CaseReport:
    case_id: str
    kind: SourceKind
    origin: Origin
    output: str | None = None  # the name of its output (its primary artifact)
    status: CaseStatus = CaseStatus.PENDING
    error: str | None = None  # "<stage>: <ErrorType>: <message>"
    error_stage: str | None = None
    error_type: str | None = None
    stage_s: dict[str, float] = field(default_factory=dict)
    labels_present: list[int] = field(default_factory=list)
    labels_absent: list[int] = field(default_factory=list)  # declared by the model, not found
    source: CaseSource | None = None
    # What its export made, without the bytes (asyncflow.writing.registry), in the writers' order,
    # and the fields they put in this report (statistics, fallback, measurement_report ...).
    artifacts: list[Artifact] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    delivery: Delivery | None = None  # what became of its DICOM objects at this run's PACS, when sent
    deliveries: list[Delivery] = field(default_factory=list)  # the last one to each PACS, this run's too
    # Several models: each one's output, labels and report fields (the fields above are the first's).
    models: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "kind": str(self.kind),
            "origin": self.origin.name,
            "input": self.origin.index,
            **(self.source.as_dict() if self.source else {}),
            "output": self.output,
            "status": str(self.status),
            "error": self.error,
            "error_stage": self.error_stage,
            "error_type": self.error_type,
            "stage_s": {k: round(v, 4) for k, v in self.stage_s.items()},
            "labels_present": self.labels_present,
            "labels_absent": self.labels_absent,
            **self.outputs,
            **({"delivery": self.delivery.as_dict()} if self.delivery is not None else {}),
            **({"deliveries": [d.as_dict() for d in self.deliveries]} if self.deliveries else {}),
            **({"models": self.models} if self.models is not None else {}),
        }


@dataclass(frozen=True)
class SkippedFile:
    """A file of the request that became no case, and why."""

    origin: Origin
    path: str  # relative to its input
    reason: str
    # Refused for safety (an archive member outside its folder, a link): a failure of the
    # request's input, unlike a file that is simply no image (an SR, a DICOMDIR).
    refused: bool = False
    kept: tuple[Origin, str] | None = None  # a duplicate: (input, path) of the copy that was kept

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "origin": self.origin.name,
            "input": self.origin.index,
            "path": self.path,
            "reason": self.reason,
            "refused": self.refused,
        }
        if self.kept is not None:
            entry["kept"] = {"origin": self.kept[0].name, "input": self.kept[0].index, "path": self.kept[1]}
        return entry

"""What every writer shares: the label map it writes from, how outputs are encoded, and the
writer interface (:class:`Writer`) that :mod:`asyncflow.writing.registry` lists.

A writer is given a :class:`LabelMap` (a case's label map on its prediction grid, its
sources, one merged set of label definitions, the source's intensities) and the
artifacts the writers before it made, and returns one :class:`~asyncflow.artifact.Artifact`.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk

from asyncflow.artifact import Artifact
from asyncflow.case import Geometry, PreparedCase
from asyncflow.enums import DeidentifyProfile, SegCompression, SegType
from asyncflow.labels.mitk import case_labels
from asyncflow.labels.segment import SegmentLabel, label_values
from asyncflow.reading.tilt import to_source_grid

__all__ = ["OUTPUT_SERIES", "Algorithm", "LabelMap", "OutputOptions", "Writer", "output_series", "uid_for"]

_UID_NAMESPACE = uuid.UUID("3f1b7c1e-9a0e-4d55-9d0c-5a9f1f1e2b61")  # asyncflow's, fixed


@dataclass(frozen=True)
class Algorithm:
    """AlgorithmIdentification of the segments: what produced them."""

    name: str  # e.g. "nnU-Net Dataset029_LiTS"
    version: str  # e.g. "nnunetv2 2.8.1"
    parameters: Mapping[str, str] = field(default_factory=dict)  # trainer, plans, folds...


@dataclass(frozen=True)
class OutputOptions:
    """How a case's outputs are encoded (see :class:`asyncflow.settings.Settings`)."""

    segmentation_type: SegType = SegType.BINARY
    keep_empty_frames: bool = False
    compression: SegCompression = SegCompression.NONE
    # A profile of asyncflow.writing.deidentify, applied to every DICOM object before it is written.
    deidentify: DeidentifyProfile = DeidentifyProfile.NONE
    # Names the case and the model (asyncflow.pipeline.keys): the DICOM objects' UIDs derive from it,
    # so the same case through the same model and settings gets the same identity. None: fresh UIDs.
    uid_seed: str | None = None
    # The optional writers asked for (their names: sr, rtstruct ...).
    extras: frozenset[str] = frozenset()


def uid_for(seed: str | None, role: str) -> str:
    """The UID of one ``role`` in a case's DICOM objects: a 2.25 UID of a name-based (SHA-1)
    UUID of the seed and the role, so the same case through the same model and settings gets the
    same UID; a fresh one without a seed."""
    if seed is None:
        return str(hd.UID())
    return str(hd.UID.from_uuid(str(uuid.uuid5(_UID_NAMESPACE, f"{seed}|{role}"))))


# The output series a case may get: kind -> (the digit of its SeriesNumber, its description's word).
OUTPUT_SERIES = {"seg": (1, "Segmentation"), "sr": (2, "Measurements"), "rtstruct": (3, "Structures")}


def output_series(
    source: pydicom.Dataset, kind: str, algorithm: Algorithm, seed: str | None
) -> tuple[int, str]:
    """SeriesNumber and SeriesDescription of a case's output series of ``kind`` (OUTPUT_SERIES),
    made from its ``source`` (the first source image's header).

    The number is the source's SeriesNumber (0 without one; its last 4 digits), the kind's
    digit, and 4 digits of a hash of the case and model (``seed``; without one, the source
    series and the model): source series 3 gives ``3_1_xxxx`` for its SEG, ``3_2_xxxx`` for its
    SR, ``3_3_xxxx`` for its RT Structure Set, the same ``xxxx`` for all three. So outputs of
    one case never share a number, nor outputs of sources numbered alike (two series numbered 3;
    the same series through two models) but by a 1 in 10,000 chance, nor a source numbered below
    10,000. The description says what it is, of which source series (its number and
    description), made by which model, in at most 64 characters."""
    digit, word = OUTPUT_SERIES[kind]
    number = source.get("SeriesNumber")
    number = int(number) if number not in (None, "") else None
    identity = seed or f"{source.get('SeriesInstanceUID', '')}|{algorithm.name}"
    case = int(hashlib.sha256(identity.encode()).hexdigest()[:8], 16) % 10_000
    series_number = ((number or 0) % 10_000) * 100_000 + digit * 10_000 + case
    described = str(source.get("SeriesDescription", "") or "").strip()
    of = " ".join(part for part in (f"#{number}" if number is not None else "", described) if part)
    return series_number, f"{word} of {of or 'series'}, {algorithm.name}"[:64]


@dataclass(frozen=True)
class LabelMap:
    """One case's label map on its prediction grid (``prepared.geometry``), with what the writers
    need beside it: ``present`` (its foreground values) and ``absent`` (declared, not found),
    ``definitions`` (the model's labels, the user's configuration and the case's MITK label file,
    merged once), and the source's ``intensities`` on the same grid (None: not at hand);
    ``suffix`` follows the case's name in its files' names (one of several models: its tag)."""

    prepared: PreparedCase
    labels: np.ndarray
    present: list[int]
    absent: list[int]
    definitions: Mapping[int, SegmentLabel]
    algorithm: Algorithm
    options: OutputOptions
    intensities: sitk.Image | None = None
    suffix: str = ""

    @classmethod
    def of(
        cls,
        prepared: PreparedCase,
        labels: np.ndarray,
        declared: Mapping[int, SegmentLabel],
        config: Mapping[int, Mapping[str, Any]],
        algorithm: Algorithm,
        options: OutputOptions,
    ) -> LabelMap:
        """A case's label map with what the writers need: its values, the labels ``declared`` by
        the model merged once with the user's ``config`` and the case's MITK label file, and the
        intensities its preparation kept."""
        present = label_values(labels)
        absent = sorted(set(declared) - set(present))
        definitions = case_labels(declared, config, prepared.case.label_file)
        return cls(prepared, labels, present, absent, definitions, algorithm, options, prepared.intensities)

    @property
    def stem(self) -> str:
        return self.prepared.case.output_name + self.suffix

    @functools.cached_property
    def on_source(self) -> tuple[np.ndarray, Geometry | None]:
        """The label map on the DICOM source's own images, and None; or, for a volume whose slices
        are not the source's frames (one volume of a 4D multi-frame image, a mosaic), the label
        map as it is and the grid it lies on."""
        prepared, labels = self.prepared, self.labels
        first = prepared.case.instances[0]
        if prepared.case.frames is not None or first.mosaic:
            return labels, prepared.geometry
        if prepared.shear is not None:  # a tilted series: back onto its sheared grid
            shape = (len(prepared.source_files), first.rows, first.columns)
            return to_source_grid(labels, prepared.shear, shape), None
        if prepared.frame_order is not None:  # a multi-frame source: its frames in their own order
            on_source = np.empty_like(labels)
            on_source[prepared.frame_order] = labels
            return on_source, None
        return labels, None


class Writer:
    """One kind of output. A subclass sets the class attributes and :meth:`applies` and
    :meth:`write`; :mod:`asyncflow.writing.registry` lists it once.

    ``name`` is the artifact's kind; ``title`` what people call it; ``folder`` where its files go;
    ``result_key`` the result map that holds them; ``report_field`` the case report's field that
    names its file (its error: ``<report_field>_error``); ``report_defaults`` fields every case's
    report holds before anything is written; ``beside``: the writer whose output this one goes
    with (it applies once that one is made, unless :meth:`applies` says otherwise); ``primary``: it is the case's output; ``deliver``:
    sent to a PACS with the case. An ``optional`` writer runs only when asked for by ``name``
    (setting ``outputs``), by the command-line ``flag`` or by the boolean ``setting`` that named it
    before; ``help`` says what it writes.
    """

    name: str = ""
    title: str = ""
    folder: str = ""
    result_key: str | None = None
    report_field: str | None = None
    report_defaults: ClassVar[Mapping[str, object]] = {}
    beside: str | None = None
    primary: bool = False
    deliver: bool = False
    optional: bool = False
    flag: str | None = None
    setting: str | None = None
    help: str = ""

    def applies(self, job: LabelMap, made: Mapping[str, Artifact]) -> bool:
        """Whether this case gets this output, given what the writers before made (by name)."""
        if self.beside is None:
            return True
        companion = made.get(self.beside)
        return companion is not None and companion.made

    def write(self, job: LabelMap, made: Mapping[str, Artifact]) -> Artifact:
        """The output; raising means it is missing, with the error as the reason."""
        raise NotImplementedError

    def artifact(self, name: str | None, data: bytes | None, **report: object) -> Artifact:
        """An output this writer made: its file ``name`` and ``data``, and its report fields
        (by default ``report_field``: the file's name)."""
        fields = dict(report) or ({self.report_field: name} if self.report_field else {})
        return Artifact(
            self.name,
            self.folder,
            name,
            data,
            self.result_key,
            fields,
            primary=self.primary,
            deliver=self.deliver,
        )

    def missing(self, reason: str, **report: object) -> Artifact:
        """This output was asked for and not made: why (by default in ``<report_field>_error``)."""
        fields = dict(report) or ({f"{self.report_field}_error": reason} if self.report_field else {})
        return Artifact(self.name, self.folder, result_key=self.result_key, report=fields, error=reason)

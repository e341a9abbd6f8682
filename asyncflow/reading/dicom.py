"""DICOM input: recognise files by content, read headers, order a series in space."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from asyncflow.case import DicomInstance
from asyncflow.reading.select import KEYWORDS as SELECTION_KEYWORDS
from asyncflow.reading.tilt import TILT_TOLERANCE
from asyncflow.reading.volumes import FRAME_RULES, IMAGE_RULES, SAME_POSITION_MM, Facts, position_indices

with warnings.catch_warnings():  # nibabel.nicom warns, on import, that its readers are experimental
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader, dicomwrappers

__all__ = [
    "ORIENTATION_TOLERANCE",
    "SPACING_TOLERANCE",
    "NotAnImage",
    "frame_pixel_spacing",
    "frame_rescale",
    "has_dicom_preamble",
    "mosaic_tiles",
    "order_positions",
    "order_series",
    "read_instance",
    "series_uid",
    "slice_normal",
]

# Headers a spatially ordered single-frame image series cannot do without.
_REQUIRED = ("SOPInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
ORIENTATION_TOLERANCE = 1e-4
SPACING_TOLERANCE = 0.01  # relative deviation of slice gaps accepted as uniform


class NotAnImage(Exception):
    """A DICOM file that is not a segmentable image (SR, SEG, presentation state...)."""


def has_dicom_preamble(head: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def read_instance(path: Path, data: bytes | None = None) -> DicomInstance:
    """Header facts of one image instance (read from ``data`` when given, the file's content);
    :class:`NotAnImage` says why a file is skipped."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data) if data is not None else path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise NotAnImage(f"unreadable DICOM header ({type(exc).__name__})") from exc
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    if "Image Storage" not in sop_class.name:
        raise NotAnImage(f"not an image storage class ({sop_class.name or 'no SOPClassUID'})")
    missing = [k for k in _REQUIRED if k not in ds]
    if missing:
        raise NotAnImage(f"image without {', '.join(missing)}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    frame_positions: tuple[tuple[float, float, float], ...] = ()
    frame_facts: tuple[Facts, ...] = ()
    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    if frames > 1:
        orientation, frame_positions = _frame_geometry(ds, frames)
        position = frame_positions[0]
        frame_facts = tuple(_frame_facts(ds, k) for k in range(frames))
    return DicomInstance(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=_optional(ds, "StudyInstanceUID"),
        frame_of_reference_uid=_optional(ds, "FrameOfReferenceUID"),
        series_number=_integer(ds, "SeriesNumber"),
        position=tuple(float(v) for v in position) if position else None,  # type: ignore[arg-type]
        orientation=tuple(float(v) for v in orientation) if orientation else None,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        image_type=tuple(str(v).upper() for v in _values(ds.get("ImageType"))),
        modality=_optional(ds, "Modality"),
        acquisition_number=_integer(ds, "AcquisitionNumber"),
        frames=frames,
        frame_positions=frame_positions,
        facts=_facts(ds),
        frame_facts=frame_facts,
        mosaic=_mosaic_slices(ds),
        described=_described(ds),
    )


def _described(ds: pydicom.Dataset) -> Facts:
    """The attributes series selection reads (a multi-frame image's SliceThickness from its
    shared functional groups)."""
    found = {keyword: _text(ds.get(keyword)) for keyword in SELECTION_KEYWORDS}
    if not found["SliceThickness"]:
        shared = ds.get("SharedFunctionalGroupsSequence")
        measures = shared[0].get("PixelMeasuresSequence") if shared else None
        found["SliceThickness"] = _text(measures[0].get("SliceThickness")) if measures else ""
    return tuple((keyword, text) for keyword, text in found.items() if text)


def _text(value: object) -> str:
    """An attribute's value as text: numbers as written, several values joined by a backslash."""
    values = _values(value)
    return "\\".join(f"{v:.6g}" if isinstance(v, float) else str(v).strip() for v in values)


def _facts(ds: pydicom.Dataset) -> Facts:
    """The attributes of :data:`asyncflow.reading.volumes.IMAGE_RULES` an image holds."""
    found = []
    for rule in IMAGE_RULES:
        for keyword in rule.keywords:
            text = _text(ds.get(keyword))
            if text:
                found.append((keyword, text))
    return tuple(found)


_SPATIAL_DIMENSIONS = {0x00209056, 0x00209057, 0x00200032}  # StackID, InStackPositionNumber, position


def _frame_facts(ds: pydicom.Dataset, frame: int) -> Facts:
    """The attributes of :data:`asyncflow.reading.volumes.FRAME_RULES` one frame holds."""
    found = []
    content = _functional(ds, frame, "FrameContentSequence")
    if content is not None:
        pointers = [int(d.DimensionIndexPointer) for d in ds.get("DimensionIndexSequence", [])]
        values = _values(content.get("DimensionIndexValues"))
        other = [
            f"{keyword_for_tag(p) or f'({p >> 16:04X},{p & 0xFFFF:04X})'}={v}"
            for p, v in zip(pointers, values, strict=False)
            if p not in _SPATIAL_DIMENSIONS
        ]
        if other and len(values) == len(pointers):
            found.append(("DimensionIndexValues", "\\".join(other)))
        for keyword in ("TemporalPositionIndex", "FrameAcquisitionDateTime"):
            if _text(content.get(keyword)):
                found.append((keyword, _text(content.get(keyword))))
    diffusion = _functional(ds, frame, "MRDiffusionSequence")
    if diffusion is not None and _text(diffusion.get("DiffusionBValue")):
        found.append(("DiffusionBValue", _text(diffusion.DiffusionBValue)))
        gradient = diffusion.get("DiffusionGradientDirectionSequence")
        if gradient and _text(gradient[0].get("DiffusionGradientOrientation")):
            found.append(("DiffusionGradientOrientation", _text(gradient[0].DiffusionGradientOrientation)))
    for sequence, keyword in (
        ("MREchoSequence", "EffectiveEchoTime"),
        ("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime"),
    ):
        item = _functional(ds, frame, sequence)
        if item is not None and _text(item.get(keyword)):
            found.append((keyword, _text(item.get(keyword))))
    return tuple(found)


def mosaic_tiles(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A Siemens mosaic's tiles as nibabel.nicom reads them: a (row, column, slice) array, scaled,
    and the affine from those indices to patient coordinates (DICOM's, LPS)."""
    wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
    return np.asarray(wrapper.get_data()), np.asarray(wrapper.affine, dtype=np.float64)


def _mosaic_slices(ds: pydicom.Dataset) -> int:
    """A Siemens mosaic's slice count from its CSA image header (as nibabel.nicom reads it):
    0 for an image that is no mosaic, -1 for a mosaic that does not say."""
    if "MOSAIC" not in (str(v).upper() for v in _values(ds.get("ImageType"))):
        return 0
    try:
        count = csareader.get_n_mosaic(csareader.get_csa_header(ds, "image"))
    except Exception:  # noqa: BLE001 - a private header of any shape: unknown, and said so
        return -1
    return int(count) if count else -1


def _functional(ds: pydicom.Dataset, frame: int, sequence: str) -> pydicom.Dataset | None:
    """A functional group item for one frame: per-frame first, then shared."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > index and sequence in items[index] and items[index][sequence]:
            return items[index][sequence][0]
    return None


def _frame_geometry(
    ds: pydicom.Dataset, frames: int
) -> tuple[tuple[float, ...], tuple[tuple[float, float, float], ...]]:
    """Orientation and per-frame positions of an enhanced multi-frame image."""
    orientation = _functional(ds, 0, "PlaneOrientationSequence")
    positions = [_functional(ds, k, "PlanePositionSequence") for k in range(frames)]
    if orientation is None or any(p is None for p in positions):
        raise NotAnImage("multi-frame image without plane orientation and positions per frame")
    return (
        tuple(float(v) for v in orientation.ImageOrientationPatient),
        tuple(tuple(float(v) for v in p.ImagePositionPatient) for p in positions),  # type: ignore[union-attr,misc]
    )


def frame_pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float]:
    """(row spacing, column spacing) of an enhanced multi-frame image (its first frame)."""
    item = _functional(ds, 0, "PixelMeasuresSequence")
    if item is None or "PixelSpacing" not in item:
        raise ValueError("multi-frame image without PixelSpacing in its functional groups")
    return float(item.PixelSpacing[0]), float(item.PixelSpacing[1])


def frame_rescale(ds: pydicom.Dataset, frame: int) -> tuple[float, float]:
    """(slope, intercept) of one frame: functional groups, else the top level, else identity."""
    item = _functional(ds, frame, "PixelValueTransformationSequence")
    source = item if item is not None and "RescaleSlope" in item else ds
    return float(source.get("RescaleSlope", 1) or 1), float(source.get("RescaleIntercept", 0) or 0)


def series_uid(path: Path) -> str | None:
    """The SeriesInstanceUID of a DICOM file, or None when it is not one."""
    try:
        with path.open("rb") as f:
            if not has_dicom_preamble(f.read(132)):
                return None
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    uid = ds.get("SeriesInstanceUID")
    return str(uid) if uid else None


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]


def _integer(ds: pydicom.Dataset, keyword: str) -> int | None:
    """An IS attribute as int; None when absent, empty or not a number (real headers hold all three)."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _optional(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value else None


def slice_normal(orientation: Sequence[float] | np.ndarray) -> np.ndarray:
    """The slice normal of an ImageOrientationPatient (row cosines x column cosines)."""
    values = np.asarray(orientation, dtype=np.float64)
    return np.cross(values[:3], values[3:6])


def repeated_positions(places: np.ndarray, what: str = "images") -> str:
    """Why a stack with repeated positions (``places``: :func:`~asyncflow.reading.volumes.position_indices`)
    is refused, naming its shape and what to do."""
    counts = np.bincount(places)
    head = f"series has {len(places)} {what} at {len(counts)} positions"
    rules = IMAGE_RULES if what == "images" else FRAME_RULES
    checked = ", ".join(rule.name for rule in rules)
    if counts.min() == counts.max():
        return (
            f"{head}, {counts[0]} at each: a 4D series of {counts[0]} volumes that no attribute tells "
            f"apart ({checked} checked); export each volume as a series of its own"
        )
    return (
        f"{head}, {counts.min()} to {counts.max()} at each: an overlapping stack or a partial re-scan "
        f"that no attribute tells apart ({checked} checked); remove the repeated images"
    )


def order_positions(
    positions: Sequence[Sequence[float]],
    orientation: Sequence[float],
    what: str = "images",
    *,
    tilted: bool = False,
) -> list[int]:
    """Indices of slices (or frames) sorted along the slice normal of ``orientation``.

    Raises ValueError with a reason when they do not form one regular volume:
    two at one place, uneven gaps (missing slices), or, unless ``tilted`` (the caller
    resamples them, :mod:`asyncflow.reading.tilt`), a sideways shift from slice to slice.
    """
    normal = slice_normal(orientation)
    if np.linalg.norm(normal) < 0.5:
        raise ValueError("invalid ImageOrientationPatient")
    points = np.asarray(positions, dtype=np.float64)
    distances = points @ normal
    order = np.argsort(distances, kind="stable")
    if len(order) > 1:
        gaps = np.diff(distances[order])
        if gaps.min() <= SAME_POSITION_MM:
            raise ValueError(repeated_positions(position_indices(points, normal), what))
        if (gaps.max() - gaps.min()) > SPACING_TOLERANCE * gaps.mean():
            raise ValueError(
                f"series has non-uniform slice spacing (missing slices?): gaps from {gaps.min():.3g} "
                f"to {gaps.max():.3g} mm, more than {SPACING_TOLERANCE:.0%} apart"
            )
        steps = np.diff(points[order], axis=0)
        sideways = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
        if not tilted and sideways.max() > TILT_TOLERANCE * gaps.mean():
            degrees = float(np.degrees(np.arctan(sideways.max() / gaps.mean())))
            raise ValueError(
                f"slices are not stacked along their normal (gantry tilt of about {degrees:.1f} degrees); "
                "resample the series to an untilted grid before segmenting it"
            )
    return [int(k) for k in order]


def order_series(instances: Sequence[DicomInstance], *, tilted: bool = False) -> list[DicomInstance]:
    """Instances of one series sorted by position along the slice normal.

    Never by file name or InstanceNumber. Raises ValueError with a reason when
    the series is not one regular volume (a tilted one is, with ``tilted``).
    """
    if not instances:
        raise ValueError("empty series")
    if any(i.position is None or i.orientation is None for i in instances):
        raise ValueError("series lacks ImagePositionPatient/ImageOrientationPatient")
    if len({(i.rows, i.columns) for i in instances}) > 1:
        raise ValueError("series mixes image sizes")
    # One volume, one SEG: its slices must agree on study and frame of reference.
    for attribute in ("study_instance_uid", "frame_of_reference_uid"):
        if len({getattr(i, attribute) for i in instances}) > 1:
            keyword = "StudyInstanceUID" if attribute.startswith("study") else "FrameOfReferenceUID"
            raise ValueError(f"series mixes {keyword}s (an inconsistent export)")
    orientations = np.array([i.orientation for i in instances], dtype=np.float64)
    if orientations.shape[1] != 6 or np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise ValueError("series mixes image orientations")
    positions = [i.position for i in instances]
    order = order_positions(positions, orientations[0], tilted=tilted)  # type: ignore[arg-type]
    return [instances[k] for k in order]

"""DICOM input: recognise files by content, read headers, order a series in space."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from asyncflow.case import DicomInstance

__all__ = [
    "ORIENTATION_TOLERANCE",
    "SPACING_TOLERANCE",
    "NotAnImage",
    "frame_pixel_spacing",
    "frame_rescale",
    "has_dicom_preamble",
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
_TILT_TOLERANCE = 0.01  # sideways shift between slices, relative to the gap, accepted as untilted


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
    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    if frames > 1:
        orientation, frame_positions = _frame_geometry(ds, frames)
        position = frame_positions[0]
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
    )


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


def order_positions(positions: Sequence[Sequence[float]], orientation: Sequence[float]) -> list[int]:
    """Indices of slices (or frames) sorted along the slice normal of ``orientation``.

    Raises ValueError with a reason when they do not form one regular volume:
    two at one place, uneven gaps (missing slices), or a sideways shift from slice
    to slice (gantry tilt).
    """
    normal = slice_normal(orientation)
    if np.linalg.norm(normal) < 0.5:
        raise ValueError("invalid ImageOrientationPatient")
    points = np.asarray(positions, dtype=np.float64)
    distances = points @ normal
    order = np.argsort(distances, kind="stable")
    if len(order) > 1:
        gaps = np.diff(distances[order])
        if gaps.min() <= 1e-3:
            positions_count = 1 + int(np.count_nonzero(gaps > 1e-3))
            raise ValueError(
                f"series has {len(order)} images at {positions_count} positions "
                "(an overlapping stack, or acquisitions that AcquisitionNumber does not tell apart)"
            )
        if (gaps.max() - gaps.min()) > SPACING_TOLERANCE * gaps.mean():
            raise ValueError(
                f"series has non-uniform slice spacing (missing slices?): gaps from {gaps.min():.3g} "
                f"to {gaps.max():.3g} mm, more than {SPACING_TOLERANCE:.0%} apart"
            )
        steps = np.diff(points[order], axis=0)
        sideways = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
        if sideways.max() > _TILT_TOLERANCE * gaps.mean():
            degrees = float(np.degrees(np.arctan(sideways.max() / gaps.mean())))
            raise ValueError(
                f"slices are not stacked along their normal (gantry tilt of about {degrees:.1f} degrees); "
                "resample the series to an untilted grid before segmenting it"
            )
    return [int(k) for k in order]


def order_series(instances: Sequence[DicomInstance]) -> list[DicomInstance]:
    """Instances of one series sorted by position along the slice normal.

    Never by file name or InstanceNumber. Raises ValueError with a reason when
    the series is not one regular volume.
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
    return [instances[k] for k in order_positions(positions, orientations[0])]  # type: ignore[arg-type]

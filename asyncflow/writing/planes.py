"""A DICOM SEG on a grid of its own: frames placed by position, not on source frames.

The slices of some volumes are not their source's frames one for one: one volume
of a 4D enhanced multi-frame image (its other volumes' frames lie at the same
positions) or a Siemens mosaic (whose one frame tiles every slice). Their SEG's
frames lie on the prediction's grid (:func:`seg_planes`, highdicom's
``plane_positions``, ``plane_orientation`` and ``pixel_measures``) and reference the
source instance; :func:`decode_on_grid` reads such a SEG back onto the grid.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np

from asyncflow.case import Geometry
from asyncflow.errors import SegCheckError

__all__ = ["decode_on_grid", "seg_planes"]


def seg_planes(grid: Geometry) -> dict[str, Any]:
    """highdicom's arguments that place a SEG's frames on ``grid``'s slices."""
    origin, spacing = np.asarray(grid.origin, dtype=np.float64), grid.spacing
    direction = np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)
    return {
        "plane_positions": [
            hd.PlanePositionSequence(
                hd.CoordinateSystemNames.PATIENT, (origin + k * spacing[2] * direction[:, 2]).tolist()
            )
            for k in range(grid.size[2])
        ],
        "plane_orientation": hd.PlaneOrientationSequence(
            hd.CoordinateSystemNames.PATIENT, [*direction[:, 0], *direction[:, 1]]
        ),
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=(spacing[1], spacing[0]),
            slice_thickness=spacing[2],
            spacing_between_slices=spacing[2],
        ),
    }


def decode_on_grid(seg: hd.seg.Segmentation, grid: Geometry) -> np.ndarray:
    """Segment numbers (z, y, x) of a SEG on ``grid``, each frame placed by its
    PlanePositionSequence; SegCheckError for a frame off the grid's planes."""
    origin = np.asarray(grid.origin, dtype=np.float64)
    normal = np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)[:, 2]
    gap = grid.spacing[2]
    shape = (grid.size[2], grid.size[1], grid.size[0])
    frames = np.asarray(seg.pixel_array).reshape(-1, shape[1], shape[2])
    labelmap = seg.segmentation_type is hd.seg.SegmentationTypeValues.LABELMAP
    threshold = float(seg.get("MaximumFractionalValue", 1)) / 2
    out = np.zeros(shape, dtype=np.uint16)
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        k = round(float((position - origin) @ normal) / gap)
        if not 0 <= k < shape[0] or np.linalg.norm(position - origin - k * gap * normal) > 1e-3:
            raise SegCheckError(f"SEG frame at {position.tolist()} lies on no slice of the prediction's grid")
        if labelmap:
            out[k] = np.where(frame > 0, frame, out[k])
        else:  # one segment per frame, named per frame or, for a SEG of one segment, shared
            identification = item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
            inside = frame > (threshold if seg.segmentation_type.value == "FRACTIONAL" else 0)
            out[k][inside] = int(identification[0].ReferencedSegmentNumber)
    return out

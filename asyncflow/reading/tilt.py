"""Gantry tilt: a CT series whose slices step sideways, segmented on an untilted grid.

A CT scanner whose gantry was tilted writes slices that are parallel but not stacked
along their normal: each slice's position moves by the same sideways step ``s`` (in
the slice plane) beside the gap ``g`` along the normal, a tilt of ``atan(|s| / g)``. The
voxels form a sheared grid, which nnU-Net (and NIfTI, and SimpleITK) cannot hold.

Like dcm2niix, asyncflow shifts each slice ``k`` in its own plane by ``k * s``
(linear interpolation; what comes in from outside the field of view is the series'
lowest value): the stack then lies on an orthogonal grid with the source's in-plane
spacing and the gap ``g`` between slices, widened (as dcm2niix widens it) so that it
holds every source pixel of every slice.
The label map comes back onto the source's own sheared grid by the opposite shift
(nearest neighbour), so that the DICOM SEG's frames lie exactly on the source images.
Each label voxel then lies within half a pixel of where the untilted label map has it.

Tilts above :data:`MAX_TILT_DEGREES`, and sideways steps that differ from slice to
slice by more than :data:`TILT_TOLERANCE` of the gap, are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from asyncflow.case import Shear

__all__ = ["MAX_TILT_DEGREES", "TILT_TOLERANCE", "shear_of", "to_source_grid", "untilted"]

MAX_TILT_DEGREES = 30.0  # gantries tilt up to about 30 degrees
TILT_TOLERANCE = 0.01  # sideways step, relative to the gap, taken as no tilt (and its variation)


def shear_of(
    points: Sequence[Sequence[float]], orientation: Sequence[float], pixel_spacing: tuple[float, float]
) -> Shear | None:
    """The shear of slices at ``points`` (in slice order) with ``orientation`` and
    ``pixel_spacing`` (between rows, between columns); None for an untilted stack.
    ValueError when the tilt is too large or not one uniform step."""
    cosines = np.asarray(orientation, dtype=np.float64)
    row, column = cosines[:3], cosines[3:6]
    normal = np.cross(row, column)
    steps = np.diff(np.asarray(points, dtype=np.float64), axis=0)
    if len(steps) == 0:
        return None
    gap = float((steps @ normal).mean())
    sideways = steps - np.outer(steps @ normal, normal)
    if np.linalg.norm(sideways, axis=1).max() <= TILT_TOLERANCE * gap:
        return None
    step = sideways.mean(axis=0)
    degrees = float(np.degrees(np.arctan(np.linalg.norm(step) / gap)))
    if np.linalg.norm(sideways - step, axis=1).max() > TILT_TOLERANCE * gap:
        raise ValueError(
            f"slices are not stacked along their normal, and their sideways steps differ (a tilt of "
            f"about {degrees:.1f} degrees that changes within the series): not one sheared volume"
        )
    if degrees > MAX_TILT_DEGREES:
        raise ValueError(
            f"gantry tilt of about {degrees:.1f} degrees, more than the {MAX_TILT_DEGREES:.0f} degrees "
            "asyncflow resamples; resample the series to an untilted grid before segmenting it"
        )
    return Shear(float(step @ column) / pixel_spacing[0], float(step @ row) / pixel_spacing[1], degrees)


def untilted(volume: np.ndarray, shear: Shear) -> np.ndarray:
    """The (z, y, x) ``volume`` on the untilted grid of :meth:`Shear.extent` (linear
    interpolation; outside the source, its lowest value)."""
    (row, column), size = shear.extent(volume.shape)
    fill = float(volume.min())
    integral = volume.dtype.kind in "iu"
    out = np.empty((volume.shape[0], *size), dtype=volume.dtype if integral else np.float32)
    for k, plane in enumerate(volume):
        offset = (row - k * shear.rows, column - k * shear.columns)
        moved = ndimage.affine_transform(
            plane.astype(np.float32), np.eye(2), offset, output_shape=size, order=1, cval=fill
        )
        out[k] = np.rint(moved) if integral else moved
    return out


def to_source_grid(labels: np.ndarray, shear: Shear, shape: tuple[int, ...]) -> np.ndarray:
    """A (z, y, x) label map on the untilted grid, on the source's sheared grid of ``shape``
    (nearest neighbour)."""
    (row, column), _ = shear.extent(shape)
    out = np.empty(shape, dtype=labels.dtype)
    for k, plane in enumerate(labels):
        offset = (k * shear.rows - row, k * shear.columns - column)
        out[k] = ndimage.affine_transform(plane, np.eye(2), offset, output_shape=shape[1:], order=0, cval=0)
    return out

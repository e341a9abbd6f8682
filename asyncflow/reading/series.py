"""The volumes in one DICOM series: how a real series' images split into stacks, and what is not one.

A series as scanners and PACS export it is not always one volume. Following
dcm2niix's rules where it has them:

- images whose ImageType says LOCALIZER are scouts, PROJECTION IMAGE are MIPs, and images
  without position or orientation (secondary captures) have no place in space: never volumes;
- a series whose images lie in several orientations or sizes (a multi-plane
  localizer, a scout beside its axial stack) splits by geometry; a stack of at
  most :data:`LOCALIZER_MAX_IMAGES` images in such a series is a localizer,
  every larger stack a volume of its own;
- a stack with two images at one position holds two acquisitions (or an
  overlapping re-scan): it splits by AcquisitionNumber when that gives stacks
  with one image per position, else it stays one stack, which
  :func:`asyncflow.reading.dicom.order_series` refuses with the reason;
- gaps and gantry tilt are left to :func:`~asyncflow.reading.dicom.order_series`, which
  refuses them; small jitter in the positions is accepted there (gaps may differ
  by :data:`asyncflow.reading.dicom.SPACING_TOLERANCE` of their mean).

Plain functions of header facts; :class:`asyncflow.reading.assemble.CaseBuilder` calls
:func:`split_series` for each series before it makes cases.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from asyncflow.case import DicomInstance
from asyncflow.reading.dicom import ORIENTATION_TOLERANCE, slice_normal

__all__ = ["LOCALIZER_MAX_IMAGES", "SeriesSplit", "Stack", "split_series"]

# A stack this small beside another geometry in one series is a localizer, not a volume.
LOCALIZER_MAX_IMAGES = 3
_SAME_POSITION_MM = 1e-3


@dataclass
class Stack:
    """Images of one series that can form one volume; ``part`` names it when the series held several."""

    instances: list[DicomInstance]
    part: str | None = None


@dataclass
class SeriesSplit:
    """What :func:`split_series` made of a series: its volumes, and a reason for every other image."""

    stacks: list[Stack] = field(default_factory=list)
    skipped: list[tuple[DicomInstance, str]] = field(default_factory=list)


def _geometry_groups(instances: list[DicomInstance]) -> list[list[DicomInstance]]:
    """Images (each with an orientation) grouped by size and orientation, within the orientation
    tolerance, in order of appearance."""
    groups: list[tuple[tuple[int, int], np.ndarray, list[DicomInstance]]] = []
    for instance in instances:
        size = (instance.rows, instance.columns)
        orientation = np.asarray(instance.orientation, dtype=np.float64)
        for group_size, group_orientation, members in groups:
            if (
                group_size == size
                and orientation.shape == group_orientation.shape
                and np.abs(orientation - group_orientation).max() <= ORIENTATION_TOLERANCE
            ):
                members.append(instance)
                break
        else:
            groups.append((size, orientation, [instance]))
    return [members for _, _, members in groups]


def _has_repeated_positions(instances: list[DicomInstance]) -> bool:
    if len(instances) < 2:  # every image here has a position and an orientation
        return False
    normal = slice_normal(instances[0].orientation)  # type: ignore[arg-type]
    distances = np.sort(np.asarray([i.position for i in instances], dtype=np.float64) @ normal)
    return bool(np.diff(distances).min() <= _SAME_POSITION_MM)


def _by_acquisition(instances: list[DicomInstance]) -> list[Stack] | None:
    """The stack split by AcquisitionNumber, when that leaves one image per position in each part."""
    parts: dict[int | None, list[DicomInstance]] = defaultdict(list)
    for instance in instances:
        parts[instance.acquisition_number].append(instance)
    if len(parts) < 2 or None in parts:
        return None
    if any(len(p) < 2 or _has_repeated_positions(p) for p in parts.values()):
        return None
    return [Stack(members, f"acquisition {number}") for number, members in sorted(parts.items())]


def split_series(instances: list[DicomInstance]) -> SeriesSplit:
    """The volumes among the single-frame images of one series, and why each other image is none."""
    split = SeriesSplit()
    images = []
    for instance in instances:
        if "LOCALIZER" in instance.image_type:
            split.skipped.append((instance, "localizer (ImageType LOCALIZER)"))
        elif "PROJECTION IMAGE" in instance.image_type:
            split.skipped.append(
                (instance, "projection image (ImageType PROJECTION IMAGE: a MIP), not a volume")
            )
        elif instance.position is None or instance.orientation is None:
            reason = "image without ImagePositionPatient/ImageOrientationPatient (a secondary capture?): not a volume"
            split.skipped.append((instance, reason))
        else:
            images.append(instance)
    groups = _geometry_groups(images)
    volumes = []
    for group in groups:
        if len(groups) > 1 and len(group) <= LOCALIZER_MAX_IMAGES:
            reason = (
                f"not a volume (a localizer?): {len(group)} image(s) in an orientation or size of "
                f"their own, in a series of {len(groups)} orientations or sizes"
            )
            split.skipped += [(instance, reason) for instance in group]
        elif len(group) < 2:
            split.skipped.append((group[0], "single-slice series (a localizer?) is not a volume"))
        else:
            volumes.append(group)
    for number, group in enumerate(volumes, start=1):
        part = f"orientation {number} of {len(volumes)}" if len(volumes) > 1 else None
        acquisitions = _by_acquisition(group) if _has_repeated_positions(group) else None
        if acquisitions is None:
            split.stacks.append(Stack(group, part))
        else:
            split.stacks += [
                Stack(s.instances, f"{part}, {s.part}" if part else s.part) for s in acquisitions
            ]
    return split

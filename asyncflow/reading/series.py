"""The volumes in one DICOM series: how a real series' images split into stacks, and what is not one.

A series as scanners and PACS export it is not always one volume. Following
dcm2niix's rules where it has them:

- images whose ImageType says LOCALIZER are scouts, PROJECTION IMAGE are MIPs, and images
  without position or orientation (secondary captures) have no place in space: never volumes;
- a series whose images lie in several orientations or sizes (a multi-plane
  localizer, a scout beside its axial stack) splits by geometry; a stack of at
  most :data:`LOCALIZER_MAX_IMAGES` images in such a series is a localizer,
  every larger stack a volume of its own;
- a stack whose positions repeat holds several volumes (a 4D series: time points,
  phases, diffusion directions, echoes, or two acquisitions): it splits into them by the
  first attribute that tells them apart (:mod:`asyncflow.reading.volumes`), else it
  stays one stack, which :func:`asyncflow.reading.dicom.order_series` refuses with
  the reason; :func:`split_frames` does the same for the frames of one enhanced
  multi-frame image;
- a Siemens mosaic (ImageType MOSAIC) holds a whole volume in its one frame: each is a
  volume of its own, the series' mosaics its time points or diffusion directions;
- gaps are left to :func:`~asyncflow.reading.dicom.order_series`, which refuses them, and
  gantry tilt to :mod:`asyncflow.reading.tilt`; small jitter in the positions is
  accepted (gaps may differ by :data:`asyncflow.reading.dicom.SPACING_TOLERANCE` of their mean).

Plain functions of header facts; :class:`asyncflow.reading.assemble.CaseBuilder` calls
:func:`split_series` for each series, and :func:`split_frames` for each multi-frame image,
before it makes cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from asyncflow.case import DicomInstance
from asyncflow.reading.dicom import ORIENTATION_TOLERANCE, slice_normal
from asyncflow.reading.volumes import FRAME_RULES, IMAGE_RULES, Volume, position_indices, split_volumes

__all__ = ["LOCALIZER_MAX_IMAGES", "SeriesSplit", "Stack", "split_frames", "split_series"]

# A stack this small beside another geometry in one series is a localizer, not a volume.
LOCALIZER_MAX_IMAGES = 3


@dataclass
class Stack:
    """Images of one series that can form one volume; ``part`` names it when the series held several."""

    instances: list[DicomInstance]
    part: str | None = None
    frames: tuple[int, ...] | None = None  # a volume of one multi-frame image: its frames (0-based)
    volume: Volume | None = None  # one of the volumes of a 4D series (asyncflow.reading.volumes)


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


def _places(instances: list[DicomInstance]) -> np.ndarray:
    """The position index of each image (each has a position and an orientation)."""
    normal = slice_normal(instances[0].orientation)  # type: ignore[arg-type]
    return position_indices([i.position for i in instances], normal)  # type: ignore[misc]


def _volumes(instances: list[DicomInstance], part: str | None) -> list[Stack]:
    """A stack of images, or its volumes when its positions repeat and an attribute tells them apart."""
    places = _places(instances)
    found = (
        split_volumes(places, [i.facts for i in instances], IMAGE_RULES)
        if places.max() + 1 < len(places)
        else None
    )
    if found is None:
        return [Stack(instances, part)]
    return [
        Stack(
            [instances[k] for k in volume.members],
            f"{part}, {volume.part}" if part else volume.part,
            volume=volume,
        )
        for volume in found[1]
    ]


def _mosaics(instances: list[DicomInstance]) -> list[Stack]:
    """Siemens mosaics: each image a volume of its own, the series' volumes told apart as a 4D
    series' are (by AcquisitionNumber, time ...) or else in the order of their SOPInstanceUIDs."""
    if len(instances) == 1:
        return [Stack(instances, None)]
    places = np.zeros(len(instances), dtype=np.int64)  # each mosaic holds every position
    found = split_volumes(places, [i.facts for i in instances], IMAGE_RULES, whole=True)
    if found is not None and all(len(v.members) == 1 for v in found[1]):
        return [Stack([instances[v.members[0]]], v.part, volume=v) for v in found[1]]
    ordered = sorted(instances, key=lambda i: i.sop_instance_uid)
    return [
        Stack(
            [instance], f"volume {n} of {len(ordered)} (mosaic)", volume=Volume((n - 1,), n, len(ordered), ())
        )
        for n, instance in enumerate(ordered, start=1)
    ]


def split_frames(instance: DicomInstance) -> list[Stack]:
    """The volumes of one enhanced multi-frame image: itself, or when its frames' positions repeat
    and a frame attribute tells them apart, one stack per volume holding its frames."""
    assert instance.orientation is not None
    places = position_indices(instance.frame_positions, slice_normal(instance.orientation))
    found = (
        split_volumes(places, instance.frame_facts, FRAME_RULES) if places.max() + 1 < len(places) else None
    )
    if found is None:
        return [Stack([instance], None)]
    return [Stack([instance], volume.part, frames=volume.members, volume=volume) for volume in found[1]]


def split_series(instances: list[DicomInstance]) -> SeriesSplit:
    """The volumes among the single-frame images of one series, and why each other image is none."""
    split = SeriesSplit()
    images, mosaics = [], []
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
        elif instance.mosaic:
            mosaics.append(instance)
        else:
            images.append(instance)
    split.stacks += _mosaics(mosaics) if mosaics else []
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
        split.stacks += _volumes(
            group, f"orientation {number} of {len(volumes)}" if len(volumes) > 1 else None
        )
    return split

"""A segment's label: its name, coded concepts, colour and tracking ids, and the labels a model
declares.

A model's ``dataset.json`` names its labels (nnU-Net v2 ``{name: value}`` or v1
``{"value": name}``); :func:`labels_from_dataset_json` gives each the standard codes
:mod:`asyncflow.labels.vocabulary` finds for its name in DICOM's code dictionaries.
Unknown labels keep their name and get a generic but valid concept (Tissue).
Colours are deterministic: a fixed colour for known structures, otherwise one
derived from the label's name, so a structure looks the same in every SEG. A
user's label configuration and a supplied MITK label file change them field by
field (:mod:`asyncflow.labels.config`).
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from asyncflow.labels.vocabulary import concept_for

__all__ = [
    "RGB",
    "TISSUE",
    "Code",
    "SegmentLabel",
    "color_for",
    "label_for",
    "label_values",
    "labels_from_dataset_json",
    "named_label",
    "segment_values",
]

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Code:
    """A coded concept: (value, scheme designator, meaning)."""

    value: str
    scheme: str
    meaning: str


# Categories from CID 7150 (Segmentation Property Categories). 123037004 "Body structure"
# is not one of them and is never used as a category.
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
TISSUE = Code("85756007", "SCT", "Tissue")

# Fixed colours of the structures the demo and LiTS-like models show (codes come from
# :mod:`asyncflow.labels.vocabulary`; other names get a colour derived from the name).
_COLORS: dict[str, RGB] = {
    "liver": (0.867, 0.510, 0.396),
    "tumor": (0.961, 0.835, 0.204),
    "tumour": (0.961, 0.835, 0.204),
    "lesion": (0.941, 0.353, 0.157),
}


@dataclass(frozen=True)
class SegmentLabel:
    value: int  # value in the predicted label map
    name: str
    category: Code
    type: Code
    anatomic_region: Code | None = None
    type_modifier: Code | None = None  # laterality (CID 244) of a paired structure
    color: RGB | None = None  # sRGB, 0..1; None: derived from the name
    description: str | None = None
    tracking_id: str | None = None
    tracking_uid: str | None = None
    opacity: float | None = None
    # A plausible volume in ml (low, high): a measured volume outside it is flagged (statistics).
    volume_ml: tuple[float, float] | None = None

    @property
    def rgb(self) -> RGB:
        return self.color or color_for(self.name)


def color_for(name: str) -> RGB:
    """The colour of a structure: fixed for known names, else stable per name."""
    known = _COLORS.get(name.lower())
    if known:
        return known
    hue = int.from_bytes(hashlib.sha256(name.lower().encode()).digest()[:2], "big") / 65536
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.9)
    return (round(r, 3), round(g, 3), round(b, 3))


def named_label(value: int, name: str) -> SegmentLabel:
    """A label with the standard concept its name stands for, else the generic Tissue."""
    concept = concept_for(name)
    if concept is None:
        return SegmentLabel(value, name, TISSUE, TISSUE)
    return SegmentLabel(
        value,
        name,
        Code(*concept.category),
        Code(*concept.type),
        anatomic_region=Code(*concept.anatomic_region) if concept.anatomic_region else None,
        type_modifier=Code(*concept.modifier) if concept.modifier else None,
    )


def labels_from_dataset_json(dataset: Mapping[str, Any]) -> dict[int, SegmentLabel]:
    """Foreground labels of an nnU-Net ``dataset.json`` keyed by label value.

    v2 writes ``{"liver": 1}``, v1 ``{"1": "liver"}``; both are read. In a model
    whose labels name one anatomical structure, a finding without a region of its
    own (a tumour, a cyst) lies in that structure (LiTS: liver and tumour; KiTS:
    kidney, tumour, cyst) and gets it as anatomic region.
    """
    raw = dict(dataset.get("labels", {}))
    if raw and all(str(k).isdigit() and isinstance(v, str) for k, v in raw.items()):
        raw = {name: int(value) for value, name in raw.items()}  # nnU-Net v1
    result: dict[int, SegmentLabel] = {}
    for name, value in raw.items():
        if isinstance(value, list | tuple):  # region-based training: not a plain label map value
            continue
        if int(value) == 0 or name == "ignore":
            continue
        result[int(value)] = named_label(int(value), name)
    organs = {label.type for label in result.values() if label.category == ANATOMICAL_STRUCTURE}
    if len(organs) == 1:
        (organ,) = organs
        for value, label in result.items():
            if label.category == MORPHOLOGICALLY_ABNORMAL_STRUCTURE and label.anatomic_region is None:
                result[value] = replace(label, anatomic_region=organ)
    return result


def label_for(labels: Mapping[int, SegmentLabel], value: int) -> SegmentLabel:
    """The label of a value, or a generic one named after the value."""
    return labels.get(value) or SegmentLabel(value, f"Label {value}", TISSUE, TISSUE)


def label_values(labels: np.ndarray) -> list[int]:
    """The foreground values (not 0) of a label map, ascending.

    Non-negative integer maps are counted one slice at a time (np.bincount): three
    times faster than ``np.unique`` on a 512x512x200 map, without a full-size copy.
    """
    if labels.size == 0:
        return []
    countable = labels.dtype.kind in "ui" and labels.dtype.itemsize <= 4  # bincount casts to int64
    if countable and int(labels.min()) >= 0 and (top := int(labels.max())) < 1 << 16:
        counts = np.zeros(top + 1, np.int64)
        for plane in labels.reshape(labels.shape[0], -1):
            counts += np.bincount(plane, minlength=counts.size)
        return [int(v) for v in np.flatnonzero(counts) if v]
    return [int(v) for v in np.unique(labels) if v != 0]


def segment_values(present: Sequence[int], declared: Mapping[int, SegmentLabel]) -> list[int]:
    """Label values that become segments: those ``present``, or every declared one when none is."""
    return list(present) or sorted(declared)

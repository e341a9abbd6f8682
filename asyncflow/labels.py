"""Label metadata for segments: names from the model, coded concepts for DICOM SEG.

The model's ``dataset.json`` names the labels. Coded concepts come from a small
table of known names; every other label gets a generic but valid concept
(Tissue) under its own name. Later sources (a user label file, MITK label JSON)
can override entries of the mapping this module returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Code", "SegmentLabel", "label_for", "labels_from_dataset_json"]


@dataclass(frozen=True)
class Code:
    """A coded concept: (value, scheme designator, meaning)."""

    value: str
    scheme: str
    meaning: str


ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
TISSUE = Code("85756007", "SCT", "Tissue")

# name (lower case) -> (category, type)
_KNOWN: dict[str, tuple[Code, Code]] = {
    "liver": (ANATOMICAL_STRUCTURE, Code("10200004", "SCT", "Liver")),
    "tumor": (MORPHOLOGICALLY_ABNORMAL_STRUCTURE, Code("108369006", "SCT", "Neoplasm")),
    "tumour": (MORPHOLOGICALLY_ABNORMAL_STRUCTURE, Code("108369006", "SCT", "Neoplasm")),
    "lesion": (MORPHOLOGICALLY_ABNORMAL_STRUCTURE, Code("52988006", "SCT", "Lesion")),
}


@dataclass(frozen=True)
class SegmentLabel:
    value: int  # value in the predicted label map
    name: str
    category: Code
    type: Code


def labels_from_dataset_json(dataset: Mapping[str, Any]) -> dict[int, SegmentLabel]:
    """Foreground labels of an nnU-Net v2 ``dataset.json`` keyed by label value."""
    result: dict[int, SegmentLabel] = {}
    for name, value in dict(dataset.get("labels", {})).items():
        if isinstance(value, list | tuple):  # region-based training: not a plain label map value
            continue
        if int(value) == 0 or name == "ignore":
            continue
        category, concept = _KNOWN.get(name.lower(), (TISSUE, TISSUE))
        result[int(value)] = SegmentLabel(int(value), name, category, concept)
    return result


def label_for(labels: Mapping[int, SegmentLabel], value: int) -> SegmentLabel:
    """The label of a value, or a generic one named after the value."""
    return labels.get(value) or SegmentLabel(value, f"Label {value}", TISSUE, TISSUE)

"""Label metadata for segments: names, coded concepts, colours, tracking ids.

Sources, merged in this order (later wins, field by field):

1. the model's ``dataset.json`` (names; nnU-Net v2 ``{name: value}`` or v1
   ``{"value": name}``), with built-in SNOMED CT codes for known names;
2. a label configuration file given by the user (JSON or YAML), see
   :func:`load_label_config`;
3. a ``*.mitklabel.json`` supplied with the case's input (:mod:`asyncflow.mitk`).

Unknown labels keep their name and get a generic but valid concept (Tissue).
Colours are deterministic: a fixed colour for known structures, otherwise one
derived from the label's name, so a structure looks the same in every SEG.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = [
    "Code",
    "LabelError",
    "SegmentLabel",
    "color_for",
    "label_for",
    "labels_from_dataset_json",
    "load_label_config",
    "merge_labels",
    "parse_label_overrides",
]

RGB = tuple[float, float, float]


class LabelError(ValueError):
    """A label configuration that cannot be used, with the reason."""


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
LIVER = Code("10200004", "SCT", "Liver")
NEOPLASM = Code("108369006", "SCT", "Neoplasm")

# name (lower case) -> (category, type, colour)
_KNOWN: dict[str, tuple[Code, Code, RGB]] = {
    "liver": (ANATOMICAL_STRUCTURE, LIVER, (0.867, 0.510, 0.396)),
    "tumor": (MORPHOLOGICALLY_ABNORMAL_STRUCTURE, NEOPLASM, (0.961, 0.835, 0.204)),
    "tumour": (MORPHOLOGICALLY_ABNORMAL_STRUCTURE, NEOPLASM, (0.961, 0.835, 0.204)),
    "lesion": (MORPHOLOGICALLY_ABNORMAL_STRUCTURE, Code("52988006", "SCT", "Lesion"), (0.941, 0.353, 0.157)),
}
_ABNORMAL_IN_ORGAN = {"tumor", "tumour", "lesion"}


@dataclass(frozen=True)
class SegmentLabel:
    value: int  # value in the predicted label map
    name: str
    category: Code
    type: Code
    anatomic_region: Code | None = None
    color: RGB | None = None  # sRGB, 0..1; None: derived from the name
    description: str | None = None
    tracking_id: str | None = None
    tracking_uid: str | None = None
    opacity: float | None = None

    @property
    def rgb(self) -> RGB:
        return self.color or color_for(self.name)


def color_for(name: str) -> RGB:
    """The colour of a structure: fixed for known names, else stable per name."""
    known = _KNOWN.get(name.lower())
    if known:
        return known[2]
    hue = int.from_bytes(hashlib.sha256(name.lower().encode()).digest()[:2], "big") / 65536
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.9)
    return (round(r, 3), round(g, 3), round(b, 3))


def _named(value: int, name: str) -> SegmentLabel:
    category, concept, _ = _KNOWN.get(name.lower(), (TISSUE, TISSUE, (0, 0, 0)))
    return SegmentLabel(value, name, category, concept)


def labels_from_dataset_json(dataset: Mapping[str, Any]) -> dict[int, SegmentLabel]:
    """Foreground labels of an nnU-Net ``dataset.json`` keyed by label value.

    v2 writes ``{"liver": 1}``, v1 ``{"1": "liver"}``; both are read. In a model
    with a liver label, a tumour or lesion label lies in the liver (as in LiTS)
    and gets that anatomic region.
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
        result[int(value)] = _named(int(value), name)
    if any(label.type == LIVER for label in result.values()):
        for value, label in result.items():
            if label.name.lower() in _ABNORMAL_IN_ORGAN:
                result[value] = replace(label, anatomic_region=LIVER)
    return result


def label_for(labels: Mapping[int, SegmentLabel], value: int) -> SegmentLabel:
    """The label of a value, or a generic one named after the value."""
    return labels.get(value) or SegmentLabel(value, f"Label {value}", TISSUE, TISSUE)


# -- overrides ------------------------------------------------------------------------

_OVERRIDABLE = {f.name for f in fields(SegmentLabel)} - {"value"}


def _code(value: object, where: str) -> Code:
    if isinstance(value, Mapping):
        try:
            return Code(str(value["value"]), str(value["scheme"]), str(value["meaning"]))
        except KeyError as exc:
            raise LabelError(f"{where}: a code needs value, scheme and meaning (missing {exc})") from None
    if isinstance(value, list | tuple) and len(value) == 3:
        return Code(*(str(v) for v in value))
    raise LabelError(f"{where}: a code is {{value, scheme, meaning}} or [value, scheme, meaning]")


def _color(value: object, where: str) -> RGB:
    if isinstance(value, str) and value.startswith("#") and len(value) == 7:
        channels = [int(value[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    elif isinstance(value, list | tuple) and len(value) == 3:
        channels = [float(v) for v in value]
    else:
        raise LabelError(f"{where}: a colour is [r, g, b] with values 0..1, or '#rrggbb'")
    if not all(0 <= c <= 1 for c in channels):
        raise LabelError(f"{where}: colour values must lie in 0..1")
    return (channels[0], channels[1], channels[2])


def parse_label_overrides(labels: Mapping[Any, Any], source: str) -> dict[int, dict[str, Any]]:
    """``{value: {field: value}}`` from plain data, checked, with typed codes and colours."""
    result: dict[int, dict[str, Any]] = {}
    for key, entry in labels.items():
        where = f"{source}: label {key}"
        if not str(key).lstrip("-").isdigit() or int(key) <= 0:
            raise LabelError(f"{where}: label values are positive integers")
        if not isinstance(entry, Mapping):
            raise LabelError(f"{where}: expected a mapping of fields")
        unknown = sorted(set(entry) - _OVERRIDABLE)
        if unknown:
            raise LabelError(
                f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_OVERRIDABLE))}"
            )
        parsed: dict[str, Any] = {}
        for name, value in entry.items():
            if value is None:
                continue
            if name in ("category", "type", "anatomic_region"):
                parsed[name] = _code(value, f"{where} {name}")
            elif name == "color":
                parsed[name] = _color(value, f"{where} color")
            elif name == "opacity":
                parsed[name] = float(value)
            else:
                parsed[name] = str(value)
        result[int(key)] = parsed
    return result


def load_label_config(path: Path) -> dict[int, dict[str, Any]]:
    """A user's label configuration (JSON, or YAML when PyYAML is installed)::

    labels:
      2:
        name: metastasis
        type: {value: "14799000", scheme: SCT, meaning: "Neoplasm, metastatic"}
        color: "#f5d533"
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise LabelError(f"label configuration {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError:
        try:
            import yaml
        except ImportError:
            raise LabelError(f"label configuration {path} is not JSON (install PyYAML for YAML)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise LabelError(f"label configuration {path} is neither JSON nor YAML: {exc}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("labels"), Mapping):
        raise LabelError(f"label configuration {path} needs a 'labels' mapping of value -> fields")
    return parse_label_overrides(data["labels"], str(path.name))


def merge_labels(
    base: Mapping[int, SegmentLabel], *overrides: Mapping[int, Mapping[str, Any]]
) -> dict[int, SegmentLabel]:
    """``base`` with each override applied in turn, field by field.

    A label renamed without codes takes the built-in codes of its new name when
    there are some, and keeps its previous codes otherwise.
    """
    merged = dict(base)
    for override in overrides:
        for value, changes in override.items():
            label = label_for(merged, value)
            name = changes.get("name")
            if name and name != label.name and "type" not in changes and name.lower() in _KNOWN:
                known = _named(value, name)
                label = replace(label, category=known.category, type=known.type)
            merged[value] = replace(label, **dict(changes))
    return merged

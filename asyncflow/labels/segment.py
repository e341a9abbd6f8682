"""Label metadata for segments: names, coded concepts, colours, tracking ids.

Sources, merged in this order (later wins, field by field):

1. the model's ``dataset.json`` (names; nnU-Net v2 ``{name: value}`` or v1
   ``{"value": name}``), with the standard codes :mod:`asyncflow.labels.vocabulary` finds
   for the names in DICOM's code dictionaries;
2. a label configuration file given by the user (JSON or YAML), see
   :func:`load_label_config`;
3. a ``*.mitklabel.json`` supplied with the case's input (:mod:`asyncflow.labels.mitk`).

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

from asyncflow.errors import LabelError
from asyncflow.labels.vocabulary import concept_for

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


def _named(value: int, name: str) -> SegmentLabel:
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
        result[int(value)] = _named(int(value), name)
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


def _volume_range(value: object, where: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise LabelError(f"{where}: a plausible volume is [low, high] in ml") from None
    if not 0 <= low <= high:
        raise LabelError(f"{where}: a plausible volume needs 0 <= low <= high, not [{low}, {high}]")
    return low, high


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
            if name in ("category", "type", "anatomic_region", "type_modifier"):
                parsed[name] = _code(value, f"{where} {name}")
            elif name == "color":
                parsed[name] = _color(value, f"{where} color")
            elif name == "opacity":
                parsed[name] = float(value)
            elif name == "volume_ml":
                parsed[name] = _volume_range(value, f"{where} volume_ml")
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
        volume_ml: [0.5, 3000]   # outside it, a case's measured volume is flagged
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
            if name and name != label.name and "type" not in changes and concept_for(name):
                known = _named(value, name)
                label = replace(
                    label,
                    category=known.category,
                    type=known.type,
                    anatomic_region=known.anatomic_region or label.anatomic_region,
                    type_modifier=known.type_modifier,
                )
            merged[value] = replace(label, **dict(changes))
    return merged

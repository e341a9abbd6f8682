"""Changes to the model's labels, field by field: a user's label configuration and a supplied
MITK label file.

Sources, merged in this order (later wins, field by field):

1. the model's ``dataset.json`` (:func:`asyncflow.labels.segment.labels_from_dataset_json`);
2. a label configuration file given by the user (JSON or YAML), see
   :func:`load_label_config`;
3. a ``*.mitklabel.json`` supplied with the case's input (:mod:`asyncflow.labels.mitk`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from asyncflow.errors import LabelError
from asyncflow.labels.segment import RGB, Code, SegmentLabel, label_for, named_label
from asyncflow.labels.vocabulary import concept_for

__all__ = ["load_label_config", "merge_labels", "parse_label_overrides"]


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
                known = named_label(value, name)
                label = replace(
                    label,
                    category=known.category,
                    type=known.type,
                    anatomic_region=known.anatomic_region or label.anatomic_region,
                    type_modifier=known.type_modifier,
                )
            merged[value] = replace(label, **dict(changes))
    return merged

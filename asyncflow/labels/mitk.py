"""MITK label stack JSON (``*.mitklabel.json``, format version 3).

Read as a label metadata source (names, colours, tracking ids, description and
DICOM segment codes of ``groups[].labels[]``), and written beside every DICOM SEG
as provenance, as the reference pipeline did through MITK. Label-level DICOM
properties use MITK's tag-path names, e.g. ``DICOM.0062.0002.0062.000F.0008.0100``
for the CodeValue of the SegmentedPropertyTypeCodeSequence of the segment, with
a TemporoSpatialStringProperty value ``{"values": [{"t": 0, "z": 0, "value": ...}]}``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from asyncflow.errors import LabelError
from asyncflow.labels.config import merge_labels, parse_label_overrides
from asyncflow.labels.segment import SegmentLabel

__all__ = [
    "MITK_SUFFIX",
    "MITK_TYPE",
    "case_labels",
    "is_mitk_label_json",
    "mitk_label_json",
    "read_mitk_labels",
]

MITK_TYPE = "org.mitk.multilabel.segmentation.stack"
MITK_SUFFIX = ".mitklabel.json"
MITK_VERSION = 3

_SEGMENT = "DICOM.0062.0002"
_CODE_SEQUENCES = {
    "category": f"{_SEGMENT}.0062.0003",  # SegmentedPropertyCategoryCodeSequence
    "type": f"{_SEGMENT}.0062.000F",  # SegmentedPropertyTypeCodeSequence
    "anatomic_region": f"{_SEGMENT}.0008.2218",  # AnatomicRegionSequence
}
_CODE_PARTS = {"value": "0008.0100", "scheme": "0008.0102", "meaning": "0008.0104"}
_ALGORITHM_TYPE = f"{_SEGMENT}.0062.0008"


def is_mitk_label_json(name: str, head: bytes) -> bool:
    """A file named ``*.mitklabel.json`` whose start looks like JSON."""
    return name.lower().endswith(MITK_SUFFIX) and head.lstrip()[:1] == b"{"


def _text(value: object) -> str | None:
    """A property value: plain, or MITK's TemporoSpatialStringProperty form."""
    if isinstance(value, Mapping):
        values = value.get("values") or []
        return str(values[0].get("value")) if values and isinstance(values[0], Mapping) else None
    return None if value is None else str(value)


def read_mitk_labels(data: bytes, source: str) -> dict[int, dict[str, Any]]:
    """Label overrides ``{value: {field: value}}`` from a MITK label stack JSON."""
    try:
        stack = json.loads(data)
    except ValueError as exc:
        raise LabelError(f"{source}: not JSON ({exc})") from None
    if not isinstance(stack, Mapping) or stack.get("type") != MITK_TYPE:
        raise LabelError(f"{source}: not a MITK label stack (type is not {MITK_TYPE})")
    raw: dict[int, dict[str, Any]] = {}
    for group in stack.get("groups") or []:
        for label in (group or {}).get("labels") or []:
            if not isinstance(label, Mapping) or "value" not in label:
                raise LabelError(f"{source}: every label needs a value")
            entry = {
                key: label.get(key)
                for key in ("name", "color", "opacity", "tracking_id", "tracking_uid", "description")
            }
            properties = {k.upper(): v for k, v in label.items() if k.upper().startswith("DICOM.")}
            for field, sequence in _CODE_SEQUENCES.items():
                parts = {
                    p: _text(properties.get(f"{sequence}.{tag}".upper())) for p, tag in _CODE_PARTS.items()
                }
                if all(parts.values()):
                    entry[field] = parts
            raw[int(label["value"])] = entry
    return parse_label_overrides(raw, source)


def _string_property(value: str) -> dict[str, Any]:
    return {"values": [{"t": 0, "z": 0, "value": value}]}


def mitk_label_json(
    labels: Sequence[SegmentLabel], reference_files: Sequence[str], *, series_description: str
) -> bytes:
    """A label stack JSON describing ``labels`` (in label-map values) for one case."""
    entries = []
    for label in labels:
        entry: dict[str, Any] = {
            "name": label.name,
            "value": label.value,
            "color": list(label.rgb),
            "opacity": 0.6 if label.opacity is None else label.opacity,
            "locked": True,
            "visible": True,
            "tracking_id": label.tracking_id or str(label.value),
        }
        if label.tracking_uid:
            entry["tracking_uid"] = label.tracking_uid
        if label.description:
            entry["description"] = label.description
        entry[_ALGORITHM_TYPE] = _string_property("AUTOMATIC")
        for field, sequence in _CODE_SEQUENCES.items():
            code = getattr(label, field)
            if code is not None:
                for part, tag in _CODE_PARTS.items():
                    entry[f"{sequence}.{tag}"] = _string_property(getattr(code, part))
        entries.append(entry)
    stack = {
        "version": MITK_VERSION,
        "type": MITK_TYPE,
        "uid": str(uuid.uuid4()),
        "groups": [{"labels": entries}],
        "properties": {
            "StringLookupTableProperty": {"referenceFiles": list(reference_files)},
            "TemporoSpatialStringProperty": {
                "DICOM.0008.0060": _string_property("SEG"),
                "DICOM.0008.103E": _string_property(series_description),
            },
        },
    }
    return (json.dumps(stack, indent=4) + "\n").encode()


def case_labels(
    model: Mapping[int, SegmentLabel], config: Mapping[int, Mapping[str, Any]], label_file: Path | None
) -> dict[int, SegmentLabel]:
    """A case's label definitions, merged once for all its outputs: the model's labels, the user's
    label configuration, then a MITK label file supplied with the case's input."""
    overrides: list[Mapping[int, Mapping[str, Any]]] = [config]
    if label_file is not None:
        overrides.append(read_mitk_labels(label_file.read_bytes(), label_file.name))
    return merge_labels(model, *overrides)

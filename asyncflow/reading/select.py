"""Series selection rules: which DICOM series a model is for (``--select rules.toml``).

A rules file (TOML or JSON) lists rules; a series is selected when it meets every condition
of at least one rule, and every other series is excluded with the first condition it failed
of each rule. The conditions, after MONAI Deploy's series selector (attribute -> regular
expression, a list of values that must all be present, a numeric range) and mercure's
routing rules (modality, descriptions, "newest of the study"), without their expression
languages (nothing from a file is evaluated)::

    [[rule]]
    name = "abdomen CT, portal venous"
    modality = ["CT"]                       # one of
    body_part = "ABDOMEN|CHEST"             # regular expressions: searched, case ignored
    series_description = "venous|portal"
    protocol_name = "abdomen"
    image_type = ["ORIGINAL", "PRIMARY"]    # every one present
    not_image_type = ["LOCALIZER", "DERIVED"]  # none present
    slice_thickness_mm = [0.5, 5.0]         # inclusive range
    min_slices = 40                         # images (frames of a multi-frame image)
    contrast = true                         # ContrastBolusAgent given (false: not given)
    newest = true                           # only the newest series of its study that meets the rule

A missing attribute fails a condition on it (a series without BodyPartExamined does not
match ``body_part``). "Newest" compares SeriesDate and SeriesTime, then SeriesNumber.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncflow.case import DicomInstance
from asyncflow.errors import SettingsError

__all__ = ["KEYWORDS", "Rule", "Selection", "SeriesFacts"]

# The header attributes the rules read (asyncflow.reading.dicom keeps them with each image).
KEYWORDS = (
    "BodyPartExamined",
    "SeriesDescription",
    "ProtocolName",
    "SliceThickness",
    "ContrastBolusAgent",
    "SeriesDate",
    "SeriesTime",
)
_PATTERNS = {
    "body_part": "BodyPartExamined",
    "series_description": "SeriesDescription",
    "protocol_name": "ProtocolName",
}
_FIELDS = frozenset(
    {"name", "modality", *_PATTERNS, "image_type", "not_image_type", "slice_thickness_mm", "min_slices"}
    | {"contrast", "newest"}
)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules see of one series: its first image's header and its number of images."""

    modality: str | None
    image_type: tuple[str, ...]
    attributes: Mapping[str, str]  # KEYWORDS present, as text
    images: int
    study: str | None
    series_number: int | None

    @classmethod
    def of(cls, instances: Sequence[DicomInstance]) -> SeriesFacts:
        first = instances[0]
        images = sum(instance.frames for instance in instances)
        attributes = dict(first.described)
        return cls(
            first.modality,
            first.image_type,
            attributes,
            images,
            first.study_instance_uid,
            first.series_number,
        )

    @property
    def acquired(self) -> tuple[str, int]:
        """What orders a study's series in time: SeriesDate and SeriesTime, then SeriesNumber."""
        when = self.attributes.get("SeriesDate", "") + self.attributes.get("SeriesTime", "").split(".")[
            0
        ].ljust(6, "0")
        return when, self.series_number or 0


@dataclass(frozen=True)
class Rule:
    """One rule: every condition given must hold."""

    name: str
    modality: tuple[str, ...] = ()
    patterns: tuple[tuple[str, re.Pattern[str]], ...] = ()  # (attribute keyword, expression)
    image_type: tuple[str, ...] = ()
    not_image_type: tuple[str, ...] = ()
    slice_thickness_mm: tuple[float, float] | None = None
    min_slices: int | None = None
    contrast: bool | None = None
    newest: bool = False

    def failure(self, series: SeriesFacts) -> tuple[str, str] | None:
        """The first condition ``series`` fails: (its name, what is wrong, in words); None when
        it meets them all (newest aside: that compares it with its study's other series)."""
        if self.modality and (series.modality or "").upper() not in self.modality:
            return "modality", f"Modality {series.modality or '(none)'} is not {' or '.join(self.modality)}"
        for condition, (keyword, pattern) in zip(self.conditions, self.patterns, strict=True):
            value = series.attributes.get(keyword)
            if value is None or not pattern.search(value):
                found = (
                    f"{keyword} {value!r} does not match {pattern.pattern!r}" if value else f"no {keyword}"
                )
                return condition, found
        missing = [value for value in self.image_type if value not in series.image_type]
        if missing:
            return (
                "image_type",
                f"ImageType {'/'.join(series.image_type) or '(none)'} lacks {', '.join(missing)}",
            )
        banned = [value for value in self.not_image_type if value in series.image_type]
        if banned:
            return "not_image_type", f"ImageType is {', '.join(banned)}"
        if self.slice_thickness_mm is not None:
            low, high = self.slice_thickness_mm
            thickness = _number(series.attributes.get("SliceThickness"))
            if thickness is None:
                return "slice_thickness_mm", "no SliceThickness"
            if not low <= thickness <= high:
                return "slice_thickness_mm", f"SliceThickness {thickness:g} mm is outside {low:g}-{high:g} mm"
        if self.min_slices is not None and series.images < self.min_slices:
            return "min_slices", f"{series.images} images, fewer than {self.min_slices}"
        if self.contrast is not None and bool(series.attributes.get("ContrastBolusAgent")) != self.contrast:
            return "contrast", (
                "no contrast agent (ContrastBolusAgent)" if self.contrast else "a contrast agent was given"
            )
        return None

    @property
    def conditions(self) -> tuple[str, ...]:
        """The names of the pattern conditions, in the order of ``patterns``."""
        names = {keyword: name for name, keyword in _PATTERNS.items()}
        return tuple(names[keyword] for keyword, _ in self.patterns)

    @classmethod
    def parse(cls, entry: Mapping[str, Any], number: int) -> Rule:
        """A rule from a rules file's entry; SettingsError says what is wrong with it."""
        where = f"rule {number}"
        if not isinstance(entry, Mapping):
            raise SettingsError(f"{where} is not a table of conditions")
        unknown = sorted(set(entry) - _FIELDS)
        if unknown:
            raise SettingsError(
                f"{where}: {', '.join(unknown)} is no condition (known: {', '.join(sorted(_FIELDS))})"
            )
        try:
            patterns = tuple(
                (_PATTERNS[key], re.compile(str(entry[key]), re.IGNORECASE))
                for key in _PATTERNS
                if key in entry
            )
        except re.error as exc:
            raise SettingsError(f"{where}: a regular expression that does not compile: {exc}") from None
        thickness = entry.get("slice_thickness_mm")
        if thickness is not None and (
            not isinstance(thickness, list)
            or len(thickness) != 2
            or not all(isinstance(v, int | float) for v in thickness)
        ):
            raise SettingsError(f"{where}: slice_thickness_mm is [low, high] in mm")
        for key, kind in (("min_slices", int), ("contrast", bool), ("newest", bool)):
            if key in entry and (
                not isinstance(entry[key], kind) or (kind is int and isinstance(entry[key], bool))
            ):
                raise SettingsError(
                    f"{where}: {key} is {'a whole number' if kind is int else 'true or false'}"
                )
        lists = {}
        for key in ("modality", "image_type", "not_image_type"):
            value = entry.get(key, [])
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SettingsError(f"{where}: {key} is a list of values")
            lists[key] = tuple(v.upper() for v in value)
        return cls(
            name=str(entry.get("name") or where),
            modality=lists["modality"],
            patterns=patterns,
            image_type=lists["image_type"],
            not_image_type=lists["not_image_type"],
            slice_thickness_mm=(float(thickness[0]), float(thickness[1])) if thickness is not None else None,
            min_slices=entry.get("min_slices"),
            contrast=entry.get("contrast"),
            newest=bool(entry.get("newest", False)),
        )


@dataclass(frozen=True)
class Selection:
    """The rules of a rules file, and where it came from."""

    rules: tuple[Rule, ...]
    source: str  # the file, for the manifest

    def __str__(self) -> str:
        return self.source

    @classmethod
    def load(cls, path: Path | str) -> Selection:
        """The rules in a TOML or JSON file (``rule``: a list of tables); SettingsError says
        what is wrong with it."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"select: {path} cannot be read: {exc.strerror}") from None
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(
                f"select: {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {exc}"
            ) from None
        entries = data.get("rule") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise SettingsError(f"select: {path} has no rules (a list 'rule' of tables: [[rule]] in TOML)")
        try:
            rules = tuple(Rule.parse(entry, number) for number, entry in enumerate(entries, start=1))
        except SettingsError as exc:
            raise SettingsError(f"select: {path}: {exc}") from None
        return cls(rules, str(path))

    def verdict(self, series: SeriesFacts) -> tuple[list[Rule], dict[str, tuple[str, str]]]:
        """The rules ``series`` meets (newest aside), and the first condition it fails of each
        other rule (rule name -> (condition, in words))."""
        met, failed = [], {}
        for rule in self.rules:
            failure = rule.failure(series)
            if failure is None:
                met.append(rule)
            else:
                failed[rule.name] = failure
        return met, failed

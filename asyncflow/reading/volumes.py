"""The volumes of a 4D series, and which of them a model gets.

A series (or an enhanced multi-frame image) whose images lie at repeated positions,
each position k times, holds k volumes: time points of a dynamic or functional study,
cardiac phases, the phases of a multi-phase CT, diffusion directions, echoes. Like
dcm2niix, asyncflow splits it by the first attribute, in the order of :data:`IMAGE_RULES`
(single-frame images) or :data:`FRAME_RULES` (the frames of one multi-frame image),
that tells the volumes apart:

- a *value* rule (AcquisitionNumber, TemporalPositionIdentifier, the diffusion b-value
  and gradient, EchoNumbers, ImageType; a multi-frame image's DimensionIndexValues outside
  its stack and in-stack position, TemporalPositionIndex...) puts the images with one value
  together: it explains the series when every value has one image per position and at least
  two images, the volumes ordered by value;
- a *time* rule (TriggerTime, AcquisitionTime, ContentTime; a frame's
  FrameAcquisitionDateTime) ranks the k images of each position: the j-th of every
  position forms volume j. It explains the series when each position holds k images
  at k distinct times.

A series that no rule explains is left whole, and
:func:`asyncflow.reading.dicom.order_positions` refuses it, naming the shape.

:func:`parse_choice` and :func:`choose` apply the ``volumes`` setting: which of a
4D series' volumes become cases (all, first, last, the n-th, or those where an
attribute has a value).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

__all__ = [
    "FRAME_RULES",
    "IMAGE_RULES",
    "Choice",
    "Rule",
    "Volume",
    "choose",
    "parse_choice",
    "position_indices",
    "split_volumes",
]

SAME_POSITION_MM = 1e-3

Facts = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Rule:
    """Attributes that, together, may tell the volumes of a 4D series apart."""

    keywords: tuple[str, ...]
    ranked: bool = False  # a time: the images of each position in order, not equal values

    @property
    def name(self) -> str:
        return " and ".join(self.keywords)


IMAGE_RULES = (
    Rule(("AcquisitionNumber",)),
    Rule(("TemporalPositionIdentifier",)),
    Rule(("TriggerTime",), ranked=True),
    Rule(("DiffusionBValue", "DiffusionGradientOrientation")),
    Rule(("EchoNumbers",)),
    Rule(("AcquisitionTime",), ranked=True),
    Rule(("ContentTime",), ranked=True),
    Rule(("ImageType",)),
)
FRAME_RULES = (
    Rule(("DimensionIndexValues",)),  # the dimensions other than stack and in-stack position
    Rule(("TemporalPositionIndex",)),
    Rule(("DiffusionBValue", "DiffusionGradientOrientation")),
    Rule(("EffectiveEchoTime",)),
    Rule(("NominalCardiacTriggerDelayTime",), ranked=True),
    Rule(("FrameAcquisitionDateTime",), ranked=True),
)


@dataclass(frozen=True)
class Volume:
    """One volume of a 4D series: its members (indices of images or frames), its place among
    the series' volumes, and the attribute values that tell it apart."""

    members: tuple[int, ...]
    number: int  # 1-based
    count: int
    facts: Facts

    @property
    def part(self) -> str:
        told = ", ".join(f"{keyword} {value}" for keyword, value in self.facts)
        return f"volume {self.number} of {self.count} ({told})"


def position_indices(points: Sequence[Sequence[float]] | np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The place (0, 1, ...) along ``normal`` of each point; points within
    :data:`SAME_POSITION_MM` of their neighbour share one."""
    distances = np.asarray(points, dtype=np.float64) @ normal
    order = np.argsort(distances, kind="stable")
    steps = np.concatenate([[0], (np.diff(distances[order]) > SAME_POSITION_MM).astype(np.int64)])
    places = np.empty(len(order), dtype=np.int64)
    places[order] = np.cumsum(steps)
    return places


def _sort_key(value: tuple[str, ...]) -> tuple[tuple[int, tuple[float, ...], str], ...]:
    """Numbers (and backslash-separated lists of them) in numeric order, before text."""
    key = []
    for part in value:
        try:
            key.append((0, tuple(float(v) for v in part.split("\\")), part))
        except ValueError:
            key.append((1, (), part))
    return tuple(key)


def _by_value(
    rule: Rule, values: list[tuple[str, ...]], places: np.ndarray, smallest: int = 2
) -> list[Volume] | None:
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for index, value in enumerate(values):
        groups[value].append(index)
    if len(groups) < 2:
        return None
    for members in groups.values():
        if len(members) < smallest or len(set(places[members].tolist())) < len(members):
            return None
    ordered = sorted(groups, key=_sort_key)
    return [
        Volume(tuple(groups[value]), number, len(ordered), tuple(zip(rule.keywords, value, strict=True)))
        for number, value in enumerate(ordered, start=1)
    ]


def _by_time(rule: Rule, values: list[tuple[str, ...]], places: np.ndarray) -> list[Volume] | None:
    at: dict[int, list[int]] = defaultdict(list)
    for index, place in enumerate(places.tolist()):
        at[place].append(index)
    counts = {len(members) for members in at.values()}
    if len(counts) != 1 or (k := counts.pop()) < 2:
        return None
    try:
        times = [float(value[0]) for value in values]
    except ValueError:
        return None
    ranked = []
    for place in sorted(at):
        members = sorted(at[place], key=lambda index: times[index])
        if any(times[a] >= times[b] for a, b in pairwise(members)):
            return None  # two images of one position at one time: the time does not tell them apart
        ranked.append(members)
    return [
        Volume(
            tuple(members[j] for members in ranked),
            j + 1,
            k,
            tuple(zip(rule.keywords, values[ranked[0][j]], strict=True)),
        )
        for j in range(k)
    ]


def split_volumes(
    places: np.ndarray, facts: Sequence[Facts], rules: Sequence[Rule], *, whole: bool = False
) -> tuple[Rule, list[Volume]] | None:
    """The volumes of images (or frames) at ``places`` (:func:`position_indices`), split by the
    first of ``rules`` that explains them, and that rule; None when none does. With ``whole``,
    each image is a volume of its own (Siemens mosaics): the rules only order them."""
    for rule in rules:
        known = [dict(f) for f in facts]
        if any(keyword not in f for f in known for keyword in rule.keywords[:1]):
            continue  # a rule applies when every image has its first attribute
        values = [tuple(f.get(keyword, "") for keyword in rule.keywords) for f in known]
        if rule.ranked:
            volumes = _by_time(rule, values, places)
        else:
            volumes = _by_value(rule, values, places, 1 if whole else 2)
        if volumes is not None:
            return rule, volumes
    return None


@dataclass(frozen=True)
class Choice:
    """The ``volumes`` setting, parsed: ``all``, ``first``, ``last``, a volume's number, or
    ``KEYWORD=VALUE``."""

    text: str
    keyword: str | None = None
    value: str | None = None
    number: int | None = None

    def __str__(self) -> str:
        return self.text


def parse_choice(text: str) -> Choice:
    """The ``volumes`` setting; ValueError says what is accepted."""
    text = text.strip()
    if text in ("all", "first", "last"):
        return Choice(text)
    if text.isdigit() and int(text) >= 1:
        return Choice(text, number=int(text))
    keyword, _, value = text.partition("=")
    if keyword.strip().isidentifier() and value.strip():
        return Choice(text, keyword=keyword.strip(), value=value.strip())
    raise ValueError(
        f"volumes must be all, first, last, a volume's number (1, 2 ...) or KEYWORD=VALUE "
        f"(e.g. TemporalPositionIdentifier=2, DiffusionBValue=0), got {text!r}"
    )


def _equal(found: str, wanted: str) -> bool:
    try:
        return float(found.split("\\")[0]) == float(wanted) and "\\" not in found
    except ValueError:
        return found.strip().upper() == wanted.strip().upper()


def choose(volumes: Sequence[Volume], choice: Choice) -> tuple[list[Volume], str]:
    """The volumes ``choice`` keeps, in order, and the reason the others are skipped."""
    reason = f"not chosen (volumes={choice.text})"
    if choice.text == "all":
        return list(volumes), reason
    if choice.text in ("first", "last"):
        return [volumes[0] if choice.text == "first" else volumes[-1]], reason
    if choice.number is not None:
        return [v for v in volumes if v.number == choice.number], reason
    assert choice.keyword is not None and choice.value is not None
    kept = [
        v for v in volumes if any(k == choice.keyword and _equal(value, choice.value) for k, value in v.facts)
    ]
    if not kept:
        told = ", ".join(sorted({k for v in volumes for k, _ in v.facts}))
        reason = (
            f"{reason}: no volume of this series has {choice.keyword} {choice.value} (told apart by {told})"
        )
    return kept, reason

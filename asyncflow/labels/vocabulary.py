"""Label names to standard codes, from the DICOM code dictionaries pydicom ships.

A model's ``dataset.json`` names its labels as its authors wrote them: ``liver``,
``cancer`` (MSD Task03), ``kidney_left`` or ``heart_atrium_left``
(TotalSegmentator), ``enhancing tumour`` (BraTS). DICOM SEG wants a segmented
property category and type from CID 7150 and the per-category CIDs 7191-7198
(PS3.16), and, for a paired organ, a laterality modifier from CID 244.
:func:`concept_for` finds them in :mod:`pydicom.sr.codedict` (SNOMED CT and
DICOM codes, maintained with the standard), matching names as bags of words:

- case, ``_``, ``-`` and spaces do not matter, nor does word order
  (``atrium_left`` is the concept "Left atrium"); ``of``, ``and``, ``the`` are ignored;
- British spellings (tumour, oesophagus, haemorrhage, oedema) read as American,
  plurals as singulars (vertebrae, vessels, arteries);
- a few common synonyms (:data:`SYNONYMS`): cancer, carcinoma, tumour and tumor
  read as neoplasm (and tumor as lesion where only that fits: "enhancing
  tumor"), bowel as intestine, vena as vein, urinary bladder as bladder, thyroid
  gland as thyroid, pleural as pleura;
- ``left``/``right`` that no concept carries become the laterality modifier;
- a leading organ that is a concept of its own (``liver_tumor``,
  ``heart_myocardium``, ``colon cancer primaries``) becomes the anatomic region
  of the rest, when the rest is a concept;
- as a last resort, numbers are dropped (``rib_left_1`` is a left rib: the
  vocabulary has no concept per rib), and a finding or tissue after a word the
  vocabulary does not know is that finding or tissue (``intracerebral_hemorrhage``,
  ``torso_fat``).

Names it cannot place return None: the caller keeps the name with the generic
Tissue concept. This is a reader of the dictionary, not a table of codes.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import cache

from pydicom.sr.codedict import codes

__all__ = ["SYNONYMS", "Concept", "concept_for"]

# The category of each per-category type group of PS3.16 (CID 7191-7198), most specific first:
# a concept listed under several (Background, Tissue) takes the first.
_TYPE_GROUPS = (
    (7192, "AnatomicalStructure"),
    (7194, "MorphologicallyAbnormalStructure"),
    (7191, "Tissue"),
    (7193, "PhysicalObject"),
    (7197, "BodySubstance"),
    (7198, "Substance"),
    (7195, "Function"),
    (7196, "SpatialAndRelationalConcept"),
)
_LATERALITY = {"left": "Left", "right": "Right"}  # CID 244
_STOPWORDS = frozenset({"of", "and", "the", "structure"})
# Word -> the words it may also mean (each tried in turn).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "tumor": ("neoplasm", "lesion"),
    "cancer": ("neoplasm",),
    "carcinoma": ("neoplasm",),
    "malignancy": ("neoplasm",),
    "bowel": ("intestine",),
    "vena": ("vein",),
    "vessel": ("blood vessel",),
    "clavicula": ("clavicle",),
    "urinary": ("",),  # urinary bladder: the vocabulary says bladder
    "gland": ("",),  # thyroid gland: the vocabulary says thyroid (and keeps adrenal gland)
    "bronchia": ("bronchus",),
    "pleural": ("pleura",),
}
_BRITISH = ((re.compile(r"^tumour"), "tumor"), (re.compile(r"^oe"), "e"), (re.compile(r"aem"), "em"))
_CAMEL = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


@dataclass(frozen=True)
class Concept:
    """What a label name means in DICOM terms."""

    category: tuple[str, str, str]  # (value, scheme designator, meaning)
    type: tuple[str, str, str]
    modifier: tuple[str, str, str] | None = None  # laterality of the type
    anatomic_region: tuple[str, str, str] | None = None


def _singular(word: str) -> str:
    if word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]  # masses
    if word.endswith("ae"):
        return word[:-1]  # vertebrae
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"  # arteries
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    return word


def _words(text: str) -> list[str]:
    words = []
    for word in re.split(r"[^a-z0-9]+", text.lower()):
        for pattern, replacement in _BRITISH:
            word = pattern.sub(replacement, word)
        if word and word not in _STOPWORDS:
            words.append(_singular(word))
    return words


def _key(words: list[str] | tuple[str, ...]) -> frozenset[str]:
    return frozenset(w for w in words if w)


@cache
def _index() -> dict[frozenset[str], tuple[tuple[str, str, str], tuple[str, str, str]]]:
    """Bag of words of each concept's meaning and keyword -> (category, type)."""
    categories = codes.cid7150.concepts
    index: dict[frozenset[str], tuple[tuple[str, str, str], tuple[str, str, str]]] = {}
    for cid, category_keyword in _TYPE_GROUPS:
        category = categories[category_keyword]
        category_code = (category.value, category.scheme_designator, category.meaning)
        for keyword, code in getattr(codes, f"cid{cid}").concepts.items():
            entry = (category_code, (code.value, code.scheme_designator, code.meaning))
            for words in (_words(code.meaning), _words(" ".join(_CAMEL.findall(keyword)))):
                index.setdefault(_key(words), entry)
    return index


def _variants(words: list[str]) -> list[frozenset[str]]:
    """The word bag of ``words`` and of every reading of its synonyms, the literal one first."""
    options = [(word, *SYNONYMS.get(word, ())) for word in words]
    bags = []
    for choice in itertools.product(*options):
        bag = _key([part for phrase in choice for part in phrase.split()])
        if bag and bag not in bags:
            bags.append(bag)
    return bags


def _lookup(words: list[str]) -> tuple[tuple[str, str, str], tuple[str, str, str]] | None:
    index = _index()
    return next((index[bag] for bag in _variants(words) if bag in index), None)


def concept_for(name: str) -> Concept | None:
    """The standard concept a label name stands for, or None when the vocabulary has none."""
    words = _words(name)
    if not words:
        return None
    found = _lookup(words)
    if found:  # the laterality is part of the concept ("Left atrium"), or there is none
        return Concept(*found)
    sides = [w for w in words if w in _LATERALITY]
    rest = [w for w in words if w not in _LATERALITY]
    modifier = None
    if len(sides) == 1 and rest:
        side = codes.cid244.concepts[_LATERALITY[sides[0]]]
        modifier = (side.value, side.scheme_designator, side.meaning)
    concept = _with_region(words)
    if concept:
        return concept
    for candidate in (rest, [w for w in rest if not w.isdigit()]):
        found = _lookup(candidate) if candidate else None
        if found:
            return Concept(*found, modifier=modifier)
        concept = _with_region(candidate)
        if concept:
            return Concept(concept.category, concept.type, modifier, concept.anatomic_region)
    # "intracerebral haemorrhage", "torso fat": a finding or tissue qualified by a word the
    # vocabulary does not hold is still that finding or tissue.
    found = _lookup(rest[-1:])
    if len(rest) > 1 and found and found[0][2] in ("Morphologically Abnormal Structure", "Tissue"):
        return Concept(*found, modifier=modifier)
    return None


def _with_region(words: list[str]) -> Concept | None:
    """``<organ> <concept>``: the concept, in the organ's region (``liver tumor``, ``heart atrium left``)."""
    if len(words) < 2:
        return None
    region = _lookup(words[:1])
    rest = _lookup(words[1:])
    if region is None or rest is None or region[0][2] != "Anatomical Structure":
        return None
    return Concept(rest[0], rest[1], anatomic_region=region[1])

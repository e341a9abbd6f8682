"""De-identification of what leaves a FLAME node: DICOM PS3.15's Basic Application Level
Confidentiality Profile, with the Retain UIDs Option.

Which attribute gets which action is PS3.15 Table E.1-1, as ``dicom-anonymizer``
(KitwareMedical/dicom-anonymizer) carries it: generated from the standard and
updated with its editions (here 2026c), so asyncflow keeps no attribute list of
its own. Chosen over ``deid`` (recipes one writes oneself; its default recipe is
not the profile) and ``dicognito`` (always replaces UIDs, which the Retain UIDs
Option keeps: the SEG references its source instances by UID, and resumed runs
rely on UIDs staying put). The actions are applied here, not with the library's
own, because its dummy date 00010101 is invalid for dicom3tools and it empties
instead of deleting or keeps dates where the profile allows zero length:

- X: removed; Z (and X/Z): zero length; D (and Z/D, X/D, X/Z/D): a dummy value
  valid for the VR, so Type 1 attributes stay present;
- U and X/Z/U* (the Retain UIDs Option): kept, UIDs and sequences of references;
- private attributes: removed;
- applied at every depth of the dataset; a Type 1C attribute whose condition the
  profile removed goes too (a ResponsiblePersonRole without ResponsiblePerson);
- PatientIdentityRemoved is YES, DeidentificationMethod and its code sequence
  (CID 7050: 113100 Basic Application Confidentiality Profile, 113110 Retain
  UIDs Option) say what was done (PS3.15 E.1.1).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pydicom
from pydicom.dataelem import DataElement
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag

from asyncflow.enums import DeidentifyProfile

__all__ = ["PROFILES", "deidentify"]

PROFILES = tuple(DeidentifyProfile)  # none; basic: the Basic Profile with the Retain UIDs Option
_TABLE = "dicomfields_2026c"  # the edition of PS3.15 Table E.1-1 used
_METHOD = "PS3.15 Basic Profile, Retain UIDs Option"  # LO: at most 64 characters

_DUMMY = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
    "PN": "Anonymized^",
    "UR": "http://anonymized.invalid",
}
_NUMBERS = ("FD", "FL", "SS", "US", "SL", "UL", "SV", "UV")
# Type 1C attributes that PS3.3 allows only beside another one, which the profile may remove.
_ONLY_BESIDE = {
    "ResponsiblePersonRole": "ResponsiblePerson",
    "ClinicalTrialProtocolEthicsCommitteeName": "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
}


def _remove(ds: pydicom.Dataset, element: DataElement) -> None:
    del ds[element.tag]


def _empty(ds: pydicom.Dataset, element: DataElement) -> None:
    element.value = [] if element.VR == "SQ" else None


def _dummy(ds: pydicom.Dataset, element: DataElement) -> None:
    if element.VR == "SQ":
        element.value = []
    elif element.VR in _NUMBERS:
        element.value = 0
    elif element.VR in ("OB", "OW", "UN"):
        element.value = b"\0\0"
    else:
        element.value = _DUMMY.get(element.VR, "ANONYMIZED")


def _keep(ds: pydicom.Dataset, element: DataElement) -> None:
    return None


Action = Callable[[pydicom.Dataset, DataElement], None]


@cache
def _actions() -> tuple[dict[int, Action], list[tuple[int, int, int, int, Action]]]:
    """(action per tag, actions of masked tag ranges such as the overlay groups 60xx)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    table = dicom_anonymization_database_selector(_TABLE)
    by_category: dict[str, Action] = {
        "X_TAGS": _remove,
        "Z_TAGS": _empty,
        "X_Z_TAGS": _empty,  # zero length keeps a Type 2 attribute valid, and says nothing
        "D_TAGS": _dummy,
        "Z_D_TAGS": _dummy,  # D where Type 1 needs a value: a dummy does no harm elsewhere
        "X_D_TAGS": _dummy,
        "X_Z_D_TAGS": _dummy,
        "U_TAGS": _keep,  # the Retain UIDs Option
        "X_Z_U_STAR_TAGS": _keep,
    }
    single: dict[int, Action] = {}
    masked = []
    for category, action in by_category.items():
        for tag in table[category]:
            if len(tag) == 2:
                single[int(BaseTag((tag[0] << 16) | tag[1]))] = action
            else:
                masked.append((tag[0], tag[1], tag[2], tag[3], action))
    return single, masked


def _action_for(tag: BaseTag) -> Action | None:
    single, masked = _actions()
    action = single.get(int(tag))
    if action is not None:
        return action
    for group, element, group_mask, element_mask, ranged in masked:
        if (
            tag.group & group_mask == group & group_mask
            and tag.element & element_mask == element & element_mask
        ):
            return ranged
    return None


def _apply(ds: pydicom.Dataset) -> None:
    for element in list(ds):
        action = _action_for(element.tag)
        if action is not None:
            action(ds, element)
        if element.tag in ds and element.VR == "SQ" and action is not _keep:
            for item in element.value:
                _apply(item)


def deidentify(ds: pydicom.Dataset, profile: str) -> None:
    """Apply ``profile`` (one of :data:`PROFILES`) to ``ds`` in place."""
    if profile == DeidentifyProfile.NONE:
        return
    if profile != DeidentifyProfile.BASIC:
        raise ValueError(f"unknown de-identification profile {profile!r}; known: {', '.join(PROFILES)}")
    ds.remove_private_tags()  # at every depth
    _apply(ds)
    for keyword, condition in _ONLY_BESIDE.items():
        if keyword in ds and not ds.get(condition):
            del ds[keyword]
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = _METHOD
    methods = []
    for concept in (codes.cid7050.BasicApplicationConfidentialityProfile, codes.cid7050.RetainUidsOption):
        item = pydicom.Dataset()
        item.CodeValue = concept.value
        item.CodingSchemeDesignator = concept.scheme_designator
        item.CodeMeaning = concept.meaning
        methods.append(item)
    ds.DeidentificationMethodCodeSequence = methods

"""De-identification: a value planted in every attribute of PS3.15 Table E.1-1 that a CT source
carries, and in private attributes, reaches no byte of a de-identified SEG, which stays valid."""

from __future__ import annotations

import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from helpers import dciodvfy_lines, dcmqi_meta
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import FileDataset

from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.enums import DeidentifyProfile
from asyncflow.labels.segment import labels_from_dataset_json
from asyncflow.writing.base import Algorithm, OutputOptions
from asyncflow.writing.deidentify import deidentify
from asyncflow.writing.seg import dicom_seg_bytes

LABELS = labels_from_dataset_json({"labels": {"background": 0, "liver": 1, "tumor": 2}})
# Text values are unique and delimited (so that one is never part of another); dates and times
# are one value each, looked for as such.
_TEXT = {"PN": "Planted^Name{k}Q", "LO": "PLANTLO{k}Q", "SH": "PLSH{k}Q", "LT": "planted lt {k}Q",
         "ST": "planted st {k}Q", "UT": "planted ut {k}Q", "UC": "planted uc {k}Q", "AE": "PLAE{k}Q",
         "UR": "http://planted{k}q.example"}  # fmt: skip
_WHEN = {"DA": "19230405", "TM": "101112", "DT": "19230405101112", "AS": "087Y"}
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PAT-123456", "PatientBirthDate": "19230405"}
PRIVATE = "private-secret-Jane"


def _candidates() -> dict[str, str]:
    """A value for every attribute of the table with a text, date or age VR."""
    table = dicom_anonymization_database_selector("dicomfields_2026c")
    values = {}
    for number, tag in enumerate(t for t in table["ALL_TAGS"] if len(t) == 2):
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        keyword = keyword_for_tag(tag)
        if tag[0] == 0x0002 or not keyword or keyword.endswith("UID"):
            continue
        if vr in _TEXT:
            values[keyword] = _TEXT[vr].format(k=number)
        elif vr in _WHEN:
            values[keyword] = _WHEN[vr]
    return values


def _planted_series(folder: Path) -> tuple[list[Path], np.ndarray, dict[str, str]]:
    """A CT series carrying a planted value in every table attribute a CT image may carry (those
    dciodvfy accepts in the source), the patient's identity, and a private block."""
    phantom = make_phantom(np.random.default_rng(7), (6, 16, 16))
    values = _candidates()

    def plant(ds: FileDataset, planted: dict[str, str]) -> None:
        for keyword, value in {**planted, **PATIENT}.items():
            setattr(ds, keyword, value)
        ds.PatientSex = "F"
        if "ResponsiblePerson" in planted:
            ds.ResponsiblePersonRole = "PARENT"  # ResponsiblePerson comes with its role
        for keyword in [k for k in ds.dir() if k.startswith(("Container", "Specimen"))]:
            del ds[keyword]  # they would make a specimen image, with sequences a CT has not
        block = ds.private_block(0x0011, "ASYNCFLOW TEST", create=True)
        block.add_new(0x01, "LO", PRIVATE)

    folder.mkdir()
    probe = folder / "probe.dcm"
    carried = dict(values)
    for _ in range(5):  # drop what dciodvfy flags in the source, until it flags nothing
        ds = dicom_series_datasets(phantom)[0]
        plant(ds, carried)
        ds.save_as(probe, enforce_file_format=True)
        flagged = set()
        for line in dciodvfy_lines(probe):
            flagged.update(re.findall(r"Element=<(\w+)>", line))
            for group, element in re.findall(r"\(0x([0-9a-f]{4}),0x([0-9a-f]{4})\)", line):
                flagged.add(keyword_for_tag((int(group, 16) << 16) | int(element, 16)))
        # A flagged companion (ResponsiblePersonRole) names the attribute that brought it.
        drop = {k for k in carried if any(f.startswith(k) for f in flagged)}
        if not drop:
            break
        carried = {k: v for k, v in carried.items() if k not in drop}
    assert len(carried) > 40  # the Patient, Study, Series, Equipment, Clinical Trial modules...
    paths = []
    for number, ds in enumerate(dicom_series_datasets(phantom)):
        plant(ds, carried)
        paths.append(folder / f"{number}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    assert dciodvfy_lines(paths[0]) == []  # the planted source itself is valid
    return paths, phantom.labels.astype(np.uint8), carried


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_no_planted_value_reaches_a_deidentified_seg_and_it_stays_valid(tmp_path: Path) -> None:
    sources, labels, planted = _planted_series(tmp_path / "series")
    data = dicom_seg_bytes(
        sources, labels, LABELS, Algorithm("m", "v"), OutputOptions(deidentify=DeidentifyProfile.BASIC)
    )
    seg_path = tmp_path / "seg.dcm"
    seg_path.write_bytes(data)
    leaked = sorted({k for k, v in {**planted, **PATIENT}.items() if v.encode() in data})
    assert leaked == [] and PRIVATE.encode() not in data
    seg = pydicom.dcmread(seg_path)
    assert seg.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in seg.DeidentificationMethodCodeSequence] == ["113100", "113110"]
    # The Retain UIDs Option: the SEG still references its sources, in their study.
    source = pydicom.dcmread(sources[0])
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    referenced = {
        i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence
    }
    assert referenced == {pydicom.dcmread(p).SOPInstanceUID for p in sources}
    assert hd.seg.segread(seg_path).number_of_segments == 2
    # Valid: no error (the empty Study Date, Time and ID the profile asks for draw DICOMDIR warnings).
    findings = dciodvfy_lines(seg_path)
    assert [
        f
        for f in findings
        if not f.startswith("Warning - Missing attribute or value that would be needed to build DICOMDIR")
    ] == []
    dcmqi_meta(seg_path, tmp_path / "dcmqi")  # dcmqi reads it


def test_without_a_profile_the_seg_keeps_the_source_identity(tmp_path: Path) -> None:
    sources, labels, _ = _planted_series(tmp_path / "series")
    data = dicom_seg_bytes(sources, labels, LABELS, Algorithm("m", "v"), OutputOptions())
    seg = pydicom.dcmread(__import__("io").BytesIO(data))
    assert (seg.PatientName, seg.PatientID, seg.PatientBirthDate) == ("Doe^Jane", "PAT-123456", "19230405")


def test_an_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown de-identification profile 'strict'"):
        deidentify(pydicom.Dataset(), "strict")


def test_nifti_outputs_carry_no_text_of_their_source(tmp_path: Path) -> None:
    """A NIfTI header has free-text fields (descrip, aux_file, intent_name): the label map's are
    not taken from the source."""
    import nibabel

    from asyncflow.case import Geometry
    from asyncflow.writing.nifti import nifti_seg_bytes

    source = nibabel.Nifti1Image(np.zeros((8, 9, 10), np.int16), np.diag([0.8, 0.8, 2.0, 1.0]))
    source.header["descrip"] = b"Doe^Jane 19230405"
    source.header["aux_file"] = b"PAT-123456"
    source.header.set_intent("none", name="Jane")
    source.set_qform(source.affine, 2)
    path = tmp_path / "source.nii"
    nibabel.save(source, path)
    labels = np.ones((10, 9, 8), np.uint8)
    data = nifti_seg_bytes(labels, Geometry.of_file(path), tmp_path / "out.nii.gz")
    (tmp_path / "out.nii.gz").write_bytes(data)
    header = nibabel.load(tmp_path / "out.nii.gz").header
    text = bytes(header["descrip"]) + bytes(header["aux_file"]) + bytes(header["intent_name"])
    assert b"Jane" not in text and b"PAT-123456" not in text and b"19230405" not in text
    assert int(header["qform_code"]) == 2

"""Outputs as artifacts: every writer in the registry resumes as it was written, every output of a
case names its labels alike, and a request's folder never outlives it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from helpers import dicom_bytes, make_tar, phantom_backend, phantom_nifti

import asyncflow.pipeline.run
import asyncflow.writing.rtstruct
from asyncflow import run_request
from asyncflow.case import CaseReport
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.labels.mitk import MITK_TYPE
from asyncflow.pipeline.journal import OutputFolder
from asyncflow.writing.registry import OPTIONAL, WRITERS

pytestmark = pytest.mark.anyio


def _series_tar(rng: np.random.Generator, label_json: dict[str, Any] | None = None) -> bytes:
    members = {
        f"DICOM/{k:03d}.dcm": dicom_bytes(ds)
        for k, ds in enumerate(dicom_series_datasets(make_phantom(rng, (12, 32, 32))))
    }
    if label_json is not None:
        members["DICOM/study.mitklabel.json"] = json.dumps(label_json).encode()
    return make_tar(members, mode="w")


def _as_booked(case: CaseReport) -> dict[str, Any]:
    """Every field of a case's report but the two that describe the run itself."""
    report = case.as_dict()
    del report["status"], report["stage_s"]
    return report


async def test_a_resumed_case_reports_every_output_as_the_run_that_wrote_it(
    tmp_path: Path, fake_settings, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*args: object) -> bytes:
        raise ValueError("the structure set was refused")

    monkeypatch.setattr(asyncflow.writing.rtstruct, "rtstruct_bytes", refused)  # one missing output
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "ct.tar").write_bytes(_series_tar(rng))
    (inputs / "mr.nii.gz").write_bytes(phantom_nifti(rng, (12, 32, 32)))
    settings = fake_settings(tmp_path / "work", outputs=tuple(OPTIONAL))

    first = await run_request([inputs], settings, backend=phantom_backend(), sink=OutputFolder(out))
    again = await run_request(
        [inputs], settings, backend=phantom_backend(), sink=OutputFolder(out, resume=True)
    )

    # Every writer of the registry ran: a writer added later is held by this test too.
    assert {a.writer for case in first.cases for a in case.artifacts} == {w.name for w in WRITERS}
    assert [a.error for case in first.cases for a in case.artifacts if not a.made] == [
        "ValueError: the structure set was refused"
    ]
    assert [case.status for case in again.cases] == ["resumed", "resumed"]
    assert [_as_booked(case) for case in again.cases] == [_as_booked(case) for case in first.cases]
    assert [case.artifacts for case in again.cases] == [case.artifacts for case in first.cases]


async def test_every_output_of_a_case_names_its_labels_alike(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    """A MITK label file supplied with the series renames the liver: the SEG, the label file, the
    statistics, the SR and the RT Structure Set all say so."""
    renamed = {"version": 3, "type": MITK_TYPE, "groups": [{"labels": [{"name": "Leber", "value": 1}]}]}
    result = await run_request(
        [_series_tar(rng, renamed)],
        fake_settings(tmp_path / "work", outputs=("rtstruct", "sr")),
        backend=phantom_backend(),
    )
    (case,) = result.cases
    assert case.status == "done", case.error

    def only(files: dict[str, bytes]) -> bytes:
        (data,) = files.values()
        return data

    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(only(result.dicom_seg_bytes)))
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["Leber"]
    label_file = json.loads(only(result.label_json_bytes))
    assert [label["name"] for label in label_file["groups"][0]["labels"]] == ["Leber"]
    assert {row["label"]: row["name"] for row in case.outputs["statistics"]} == {1: "Leber", 2: "tumor"}
    sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(only(result.dicom_sr_bytes)))
    assert "segment 1: Leber" in _texts(sr)
    rtstruct = pydicom.dcmread(pydicom.filebase.DicomBytesIO(only(result.dicom_rtstruct_bytes)))
    assert [roi.ROIName for roi in rtstruct.StructureSetROISequence] == ["Leber"]


def _texts(dataset: pydicom.Dataset) -> set[str]:
    """Every TextValue in an SR's content tree."""
    found = set()
    for item in dataset.get("ContentSequence", []):
        if "TextValue" in item:
            found.add(str(item.TextValue))
        found |= _texts(item)
    return found


async def test_the_request_folder_is_removed_when_the_stages_cannot_even_be_built(
    tmp_path: Path, fake_settings, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken:
        def __init__(self, *args: object) -> None:
            raise RuntimeError("the export stage could not be built")

    monkeypatch.setattr(asyncflow.pipeline.run, "Export", Broken)
    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="could not be built"):
        await run_request([phantom_nifti(rng, (8, 16, 16))], fake_settings(work), backend=phantom_backend())
    assert list(work.iterdir()) == []

"""Label metadata in the SEG: built-in codes, a user label file, a supplied MITK label JSON."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers import dciodvfy_findings

from asyncflow import LabelError, run_request
from asyncflow.backends import Backend
from asyncflow.case import Case, Geometry, PreparedCase
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom, nifti_bytes
from asyncflow.enums import SourceKind
from asyncflow.labels.config import load_label_config, merge_labels
from asyncflow.labels.mitk import MITK_TYPE, mitk_label_json, read_mitk_labels
from asyncflow.labels.segment import Code, color_for, labels_from_dataset_json
from asyncflow.writing.base import Algorithm, LabelMap, OutputOptions
from asyncflow.writing.registry import write_outputs

LIVER = Code("10200004", "SCT", "Liver")
LITS_V1 = {"labels": {"0": "background", "1": "liver", "2": "tumor"}}  # Task029_LiTS, nnU-Net v1


def _codes(item: pydicom.Dataset) -> dict[str, tuple[str, str, str]]:
    def code(sequence: pydicom.Sequence) -> tuple[str, str, str]:
        return (sequence[0].CodeValue, sequence[0].CodingSchemeDesignator, sequence[0].CodeMeaning)

    result = {
        "category": code(item.SegmentedPropertyCategoryCodeSequence),
        "type": code(item.SegmentedPropertyTypeCodeSequence),
    }
    if "AnatomicRegionSequence" in item:
        result["region"] = code(item.AnatomicRegionSequence)
    return result


def test_lits_labels_carry_the_snomed_codes() -> None:
    labels = labels_from_dataset_json(LITS_V1)
    liver, tumour = labels[1], labels[2]
    assert (liver.name, liver.category.value, liver.type.value, liver.anatomic_region) == (
        "liver", "91723000", "10200004", None
    )  # fmt: skip
    assert (tumour.category.value, tumour.type.value, tumour.anatomic_region) == (
        "49755003",
        "108369006",
        LIVER,
    )
    # The same names in v2's {name: value} form give the same labels.
    assert labels_from_dataset_json({"labels": {"background": 0, "liver": 1, "tumor": 2}}) == labels
    # A tumour label without a liver label is not placed in the liver.
    assert labels_from_dataset_json({"labels": {"background": 0, "tumor": 1}})[1].anatomic_region is None
    assert all("123037004" not in (label.category.value, label.type.value) for label in labels.values())


def test_colours_are_stable_per_name_and_distinct() -> None:
    assert color_for("spleen") == color_for("Spleen") == color_for("spleen")
    assert color_for("spleen") != color_for("kidney")
    assert color_for("liver") == (0.867, 0.510, 0.396)


def test_a_label_file_overrides_names_codes_and_colours(tmp_path: Path) -> None:
    config = tmp_path / "labels.yaml"
    config.write_text(
        "labels:\n"
        "  2:\n"
        "    name: metastasis\n"
        "    type: {value: '14799000', scheme: SCT, meaning: 'Neoplasm, metastatic'}\n"
        "    color: '#00ff00'\n"
        "  3:\n"
        "    name: spleen\n"
        "    description: not in the model\n"
    )
    merged = merge_labels(labels_from_dataset_json(LITS_V1), load_label_config(config))
    assert merged[2].name == "metastasis" and merged[2].type.value == "14799000"
    assert merged[2].category.value == "49755003" and merged[2].rgb == (0.0, 1.0, 0.0)
    assert (merged[3].name, merged[3].type.value, merged[3].description) == (
        "spleen",
        "78961009",
        "not in the model",
    )
    # A rename to a known name takes that name's codes.
    renamed = merge_labels(
        labels_from_dataset_json({"labels": {"background": 0, "organ": 1}}), {1: {"name": "liver"}}
    )
    assert renamed[1].type == LIVER

    bad = tmp_path / "bad.json"
    for content, message in [
        ('{"labels": {"1": {"colour": [1, 0, 0]}}}', "unknown field.*colour"),
        ('{"labels": {"1": {"color": [2, 0, 0]}}}', "colour values must lie in 0..1"),
        ('{"labels": {"0": {"name": "x"}}}', "positive integers"),
        ('{"labels": {"1": {"type": {"value": "1"}}}}', "needs value, scheme and meaning"),
        ("[1, 2]", "needs a 'labels' mapping"),
    ]:
        bad.write_text(content)
        with pytest.raises(LabelError, match=message):
            load_label_config(bad)


def test_mitk_label_json_round_trips() -> None:
    labels = merge_labels(
        labels_from_dataset_json(LITS_V1),
        {
            1: {
                "tracking_id": "liver-1",
                "tracking_uid": "1.2.3.4",
                "description": "whole liver",
                "opacity": 0.3,
            }
        },
    )
    data = mitk_label_json(list(labels.values()), ["IM0001", "IM0002"], series_description="test")
    stack = json.loads(data)
    assert (stack["version"], stack["type"]) == (3, MITK_TYPE)
    assert stack["properties"]["StringLookupTableProperty"]["referenceFiles"] == ["IM0001", "IM0002"]
    first = stack["groups"][0]["labels"][0]
    assert (first["name"], first["value"], first["tracking_id"]) == ("liver", 1, "liver-1")
    assert first["DICOM.0062.0002.0062.000F.0008.0100"] == {"values": [{"t": 0, "z": 0, "value": "10200004"}]}
    back = merge_labels({}, read_mitk_labels(data, "x.mitklabel.json"))
    for value, label in labels.items():
        again = back[value]
        assert (again.name, again.category, again.type, again.anatomic_region) == (
            label.name, label.category, label.type, label.anatomic_region
        )  # fmt: skip
        assert (again.rgb, again.description, again.tracking_uid) == (
            label.rgb,
            label.description,
            label.tracking_uid,
        )
    assert (back[1].tracking_id, back[1].opacity) == ("liver-1", 0.3)
    assert back[2].tracking_id == "2"  # MITK needs one: the label value when none is known


@pytest.mark.anyio
async def test_a_supplied_mitk_label_json_renames_and_recolours_the_segments(
    tmp_path: Path, settings_factory, loaded_backend: Backend, rng: np.random.Generator
) -> None:
    mitk = {
        "version": 3,
        "type": MITK_TYPE,
        "groups": [
            {
                "labels": [
                    {"name": "Leber", "value": 1, "color": [0.0, 1.0, 0.0], "opacity": 0.5, "tracking_id": "L1",
                     "tracking_uid": "1.2.826.0.1.3680043.8.498.1"},
                ]
            }
        ],
    }  # fmt: skip
    series = dicom_series_datasets(make_phantom(rng, (32, 48, 48)))
    with_json = dicom_series_tar([series])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(with_json)) as source, tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in source.getmembers():
            tar.addfile(member, source.extractfile(member))
        payload = json.dumps(mitk).encode()
        info = tarfile.TarInfo("DICOM/study.mitklabel.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    plain = dicom_series_datasets(make_phantom(rng, (32, 48, 48)))
    entries = [{"with_json.tar": buffer.getvalue()}, {"plain.tar": dicom_series_tar([plain])}]
    result = await run_request(entries, settings_factory(tmp_path / "work"), backend=loaded_backend)
    assert result.status == "done"
    assert sorted(result.label_json_bytes) == ["plain.mitklabel.json", "with_json.mitklabel.json"]

    segs = {name: hd.seg.segread(io.BytesIO(data)) for name, data in result.dicom_seg_bytes.items()}
    renamed = {int(s.SegmentNumber): s for s in segs["with_json.dcm"].SegmentSequence}
    default = {int(s.SegmentNumber): s for s in segs["plain.dcm"].SegmentSequence}
    assert (renamed[1].SegmentLabel, renamed[1].TrackingID, renamed[1].TrackingUID) == (
        "Leber", "L1", "1.2.826.0.1.3680043.8.498.1"
    )  # fmt: skip
    assert list(renamed[1].RecommendedDisplayCIELabValue) == list(
        hd.color.CIELabColor.from_rgb(0, 255, 0).value
    )
    assert _codes(renamed[1]) == _codes(default[1])  # the codes stay the liver's
    assert (default[1].SegmentLabel, default[2].SegmentLabel) == ("liver", "tumor")
    assert _codes(default[2])["region"] == ("10200004", "SCT", "Liver")
    expected = hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in color_for("liver"))).value
    assert list(default[1].RecommendedDisplayCIELabValue) == list(expected)
    written = json.loads(result.label_json_bytes["with_json.mitklabel.json"])
    assert written["groups"][0]["labels"][0]["name"] == "Leber"
    # The SEG header describes its producer, for viewers and PACS.
    seg = segs["plain.dcm"]
    assert (seg.ContentLabel, seg.Manufacturer, seg.SeriesNumber // 10_000, seg.InstanceNumber) == (
        "NNUNET",
        "asyncflow",
        11,  # source series 1, the SEG
        1,
    )
    assert seg.SoftwareVersions.startswith("asyncflow")
    for data in result.dicom_seg_bytes.values():
        assert dciodvfy_findings(data, tmp_path) == []


def test_declared_labels_not_found_are_reported_not_renumbered(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    phantom = make_phantom(rng, (8, 10, 12))
    source = tmp_path / "v.nii.gz"
    source.write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    case = Case("case-0001", SourceKind.NIFTI, "v", "v.nii.gz", [source])
    only_liver = (phantom.labels > 0).astype(np.uint8)
    prepared = PreparedCase(case, tmp_path, [], Geometry.of_file(source), [], [source])
    declared = labels_from_dataset_json(LITS_V1)
    job = LabelMap.of(prepared, only_liver, declared, {}, Algorithm("m", "v"), OutputOptions())
    (output,) = [artifact for artifact in write_outputs(job) if artifact.primary]
    assert (output.name, job.present, job.absent) == ("v.nii.gz", [1], [2])


@pytest.mark.anyio
async def test_the_label_file_beside_a_deidentified_seg_names_its_sources_by_uid_not_by_file_name(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """Hospital exports often name files after the patient; a de-identified SEG's MITK label file
    lists its sources by SOPInstanceUID (the SEG keeps those), without, by file name."""
    from helpers import dicom_bytes, make_tar

    from asyncflow import Settings
    from asyncflow.testing import FakeBackend

    series = dicom_series_datasets(make_phantom(rng, (8, 16, 16)))
    members = {
        f"Mustermann_Erika/Mustermann_Erika_CT_{k:03d}.dcm": dicom_bytes(ds) for k, ds in enumerate(series)
    }
    entries = [{"study.tar": make_tar(members)}]
    work = tmp_path / "work"
    for profile, expected in (
        ("basic", [str(ds.SOPInstanceUID) for ds in series]),
        ("none", [f"Mustermann_Erika_CT_{k:03d}.dcm" for k in range(len(series))]),
    ):
        result = await run_request(
            entries, Settings(work_dir=work, deidentify=profile), backend=FakeBackend()
        )
        (label_file,) = result.label_json_bytes.values()
        references = json.loads(label_file)["properties"]["StringLookupTableProperty"]["referenceFiles"]
        assert references == expected  # in slice order, as the SEG's frames
        assert (b"Mustermann" in label_file) is (profile == "none")

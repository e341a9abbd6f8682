"""Label names of real public models get standard codes from DICOM's code dictionaries, and the
SEG carries them (laterality included) as validators and other readers expect."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from helpers import dciodvfy_findings, dcmqi_meta, dicom_bytes, make_tar

from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.labels.segment import TISSUE, labels_from_dataset_json
from asyncflow.labels.vocabulary import concept_for
from asyncflow.reading.archives import unpack
from asyncflow.reading.assemble import CaseBuilder
from asyncflow.reading.prepare import prepare_case
from asyncflow.reading.request import InputItem
from asyncflow.reading.scan import scan
from asyncflow.writing.base import Algorithm, LabelMap, OutputOptions
from asyncflow.writing.registry import write_outputs

PUBLIC = json.loads((Path(__file__).parents[1] / "data" / "public_label_names.json").read_text())
NAMES = [(model, name, codes) for model, names in PUBLIC["models"].items() for name, codes in names.items()]


@pytest.mark.parametrize(("model", "name", "codes"), NAMES, ids=[f"{m}:{n}" for m, n, _ in NAMES])
def test_public_label_names_get_their_standard_codes(model: str, name: str, codes: list[str] | None) -> None:
    concept = concept_for(name)
    if codes is None:  # the vocabulary has no concept: documented, and the generic Tissue stays
        assert name in PUBLIC["no_concept"]
        assert concept is None
        assert labels_from_dataset_json({"labels": {"background": 0, name: 1}})[1].type == TISSUE
        return
    assert concept is not None
    assert [concept.type[0], *([concept.modifier[0]] if concept.modifier else [])] == codes


def test_the_documented_exceptions_are_still_exceptions() -> None:
    """A documented name that the vocabulary comes to know must leave the list, not linger in it."""
    listed = {name for names in PUBLIC["models"].values() for name, codes in names.items() if codes is None}
    assert listed == set(PUBLIC["no_concept"])
    ours = PUBLIC["models"]["TotalSegmentator"]
    for name, entry in PUBLIC["differs_from_totalsegmentator"].items():
        assert ours[name] == entry["expected"] != entry["totalsegmentator"], name


def test_a_finding_in_a_model_of_one_organ_lies_in_that_organ() -> None:
    kits = labels_from_dataset_json({"labels": {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}})
    assert kits[2].anatomic_region == kits[3].anatomic_region == kits[1].type
    assert kits[2].category.meaning == "Morphologically Abnormal Structure"
    two_organs = labels_from_dataset_json({"labels": {"background": 0, "liver": 1, "spleen": 2, "tumor": 3}})
    assert two_organs[3].anatomic_region is None
    # A region in the name wins over the model's organ.
    named = labels_from_dataset_json({"labels": {"background": 0, "liver": 1, "kidney_cyst_left": 2}})
    assert named[2].anatomic_region.meaning == "Kidney" and named[2].type_modifier.meaning == "Left"


def test_the_seg_carries_types_laterality_and_regions_that_readers_accept(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    phantom = make_phantom(rng, (10, 24, 24))
    tar_members = {f"s/{k}": dicom_bytes(ds) for k, ds in enumerate(dicom_series_datasets(phantom))}
    builder = CaseBuilder()
    (case,) = builder.add(scan(unpack(InputItem(0, "ct.tar", data=make_tar(tar_members)), tmp_path / "in")))
    prepared = prepare_case(case, tmp_path / "work", write_files=False)
    labels = np.zeros((10, 24, 24), np.uint8)
    labels[2:8, 2:10, 2:10] = 1
    labels[2:8, 2:10, 14:22] = 2
    labels[4:6, 4:6, 4:6] = 3
    model = labels_from_dataset_json(
        {"labels": {"background": 0, "kidney_left": 1, "kidney_right": 2, "kidney_cyst_left": 3}}
    )
    job = LabelMap.of(prepared, labels, model, {}, Algorithm("m", "v"), OutputOptions())
    (exported,) = [artifact for artifact in write_outputs(job) if artifact.primary]
    assert exported.writer == "dicom_seg" and exported.data is not None
    path = tmp_path / exported.name
    path.write_bytes(exported.data)
    seg = hd.seg.segread(path)
    described = {}
    for item in seg.SegmentSequence:
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        modifier = kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning
        region = item.AnatomicRegionSequence[0].CodeMeaning if "AnatomicRegionSequence" in item else None
        described[item.SegmentLabel] = (kind.CodeValue, modifier, region)
    assert described == {
        "kidney_left": ("64033007", "Left", None),
        "kidney_right": ("64033007", "Right", None),
        "kidney_cyst_left": ("367643001", "Left", "Kidney"),
    }
    assert dciodvfy_findings(exported.data, tmp_path) == []
    meta = dcmqi_meta(path, tmp_path / "dcmqi")
    attributes = [a for group in meta["segmentAttributes"] for a in group]
    modifiers = {
        a["SegmentLabel"]: a["SegmentedPropertyTypeModifierCodeSequence"]["CodeMeaning"] for a in attributes
    }
    assert modifiers == {"kidney_left": "Left", "kidney_right": "Right", "kidney_cyst_left": "Left"}

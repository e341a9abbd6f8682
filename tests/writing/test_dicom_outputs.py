"""What a PACS and its readers see of a case's DICOM outputs: series numbers of their own within
the study, descriptions that name the source series, the source's character set and study in
the RT Structure Set, ROI types from the segment's category, and an SR whose findings are the
segments' own concepts (dciodvfy, highdicom)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import anyio
import highdicom as hd
import numpy as np
import pydicom
from helpers import dciodvfy_lines, dicom_bytes, make_tar

from asyncflow import Result, run_request
from asyncflow.cli.synthetic import LIVER_HU, TUMOR_HU, dicom_series_datasets, make_phantom
from asyncflow.settings import Settings
from asyncflow.testing import FakeBackend, image_array


def _two_labels(case: Any) -> np.ndarray:
    """The phantom's liver found by its intensity, its half at lower x as a second label."""
    found = (image_array(case) > (LIVER_HU + TUMOR_HU) / 2).astype(np.uint8)
    found[..., : found.shape[-1] // 2] *= 2
    return found


def _run(work: Path, tars: list[bytes], labels: dict[str, int]) -> Result:
    settings = Settings(work_dir=work, device="cpu", outputs=("sr", "rtstruct"))
    backend = FakeBackend(labels, predict=_two_labels)
    return anyio.run(lambda: run_request(tars, settings, backend=backend))


def _outputs(result: Result) -> list[pydicom.Dataset]:
    maps = (result.dicom_seg_bytes, result.dicom_sr_bytes, result.dicom_rtstruct_bytes)
    return [pydicom.dcmread(io.BytesIO(data)) for found in maps for data in found.values()]


def test_outputs_of_series_numbered_alike_get_numbers_and_descriptions_of_their_own(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    study = pydicom.uid.generate_uid()
    sources, tars = {}, []
    for name, number, description in (("a", 3, "Abdomen 5mm"), ("b", 3, "Abdomen 1mm"), ("c", 4, "")):
        datasets = dicom_series_datasets(
            make_phantom(rng, (8, 24, 24)), series_number=number, study_uid=study
        )
        for ds in datasets:
            ds.SeriesDescription = description
        sources[str(datasets[0].SeriesInstanceUID)] = (number, description)
        tars.append(make_tar({f"{name}/{k:03d}": dicom_bytes(ds) for k, ds in enumerate(datasets)}))
    result = _run(tmp_path / "work", tars, {"liver": 1, "tumor": 2})
    outputs = _outputs(result)
    assert len(outputs) == 9  # a SEG, an SR and an RT Structure Set of each of the three series
    numbers = [int(ds.SeriesNumber) for ds in outputs]
    assert len(set(numbers)) == 9 and not set(numbers) & {3, 4}
    kinds = {"SEG": 1, "SR": 2, "RTSTRUCT": 3}
    by_source: dict[str, set[int]] = {}
    for ds in outputs:
        source = ds.ReferencedSeriesSequence[0] if ds.Modality == "SEG" else None
        if ds.Modality == "SR":
            source = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            source = next(s for s in source if s.SeriesInstanceUID in sources)
        elif ds.Modality == "RTSTRUCT":
            study_item = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
            source = study_item.RTReferencedSeriesSequence[0]
        assert source is not None
        number, description = sources[str(source.SeriesInstanceUID)]
        series_number = int(ds.SeriesNumber)
        assert (series_number // 100_000, series_number // 10_000 % 10) == (number, kinds[ds.Modality])
        # The three outputs of one source share their last four digits: they read as a set.
        by_source.setdefault(str(source.SeriesInstanceUID), set()).add(series_number % 10_000)
        word = {"SEG": "Segmentation", "SR": "Measurements", "RTSTRUCT": "Structures"}[ds.Modality]
        named = f"#{number} {description}".strip()
        assert ds.SeriesDescription == f"{word} of {named}, nnU-Net FakeModel"
    assert [len(tails) for tails in by_source.values()] == [1, 1, 1]


def test_the_rtstruct_keeps_the_source_s_character_set_and_study_and_types_rois_by_category(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    datasets = dicom_series_datasets(make_phantom(rng, (8, 24, 24)), patient_name="Müller^Jörg")
    for ds in datasets:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.StudyDescription = "Leber Übersicht"
    tar = make_tar({f"ct/{k:03d}": dicom_bytes(ds) for k, ds in enumerate(datasets)})
    result = _run(tmp_path / "work", [tar], {"liver": 1, "tumor": 2})
    data = result.dicom_rtstruct_bytes["input-0.rtstruct.dcm"]
    assert "Müller".encode("latin-1") in data  # written in the source's character set ...
    structure = pydicom.dcmread(io.BytesIO(data))
    assert structure.SpecificCharacterSet == "ISO_IR 100"  # ... and saying so
    assert str(structure.PatientName) == "Müller^Jörg" and structure.StudyDescription == "Leber Übersicht"
    interpreted = {
        str(roi.ROIName): str(observation.RTROIInterpretedType)
        for roi, observation in zip(
            structure.StructureSetROISequence, structure.RTROIObservationsSequence, strict=True
        )
    }
    assert interpreted == {"liver": "ORGAN", "tumor": ""}  # a tumour is no organ
    (tmp_path / "rt.dcm").write_bytes(data)
    assert dciodvfy_lines(tmp_path / "rt.dcm") == []


def test_the_sr_finds_each_segment_s_own_concept_where_the_seg_puts_it(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    datasets = dicom_series_datasets(make_phantom(rng, (8, 24, 24), spacing=(0.7, 0.7, 2.5)))
    tar = make_tar({f"ct/{k:03d}": dicom_bytes(ds) for k, ds in enumerate(datasets)})
    result = _run(tmp_path / "work", [tar], {"liver tumor": 1, "left kidney": 2})
    data = result.dicom_sr_bytes["input-0.sr.dcm"]
    sr = hd.sr.srread(io.BytesIO(data))
    findings = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        (site,) = group.finding_sites
        laterality = site.laterality.meaning if site.laterality is not None else None
        findings[group.finding_type.meaning] = (site.value.meaning, laterality)
    assert findings == {"Neoplasm": ("Liver", None), "Kidney": ("Kidney", "Left")}
    # The source's scanner acquired the images; asyncflow made none of them.
    acquisition, *_ = sr.ContributingEquipmentSequence
    assert acquisition.Manufacturer == datasets[0].Manufacturer == "asyncflow synthetic"
    assert acquisition.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Acquisition Equipment"
    # Volumes to a tenth of a voxel (1.225 mm^3 voxels: 0.0001 ml), no float noise of the spacing.
    for label in result.report()["cases"][0]["statistics"]:
        assert label["voxels"] and label["volume_ml"] == round(label["voxels"] * 0.001225, 4)
        assert len(repr(label["volume_ml"]).split(".")[1]) <= 4
    (tmp_path / "sr.dcm").write_bytes(data)
    assert dciodvfy_lines(tmp_path / "sr.dcm") == []

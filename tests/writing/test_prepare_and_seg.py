"""Prepare and export without the model: geometry must survive both ways exactly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import DCIODVFY_MISSING, dciodvfy_findings, dicom_bytes
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from asyncflow.case import Case, Geometry, Origin
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom, nifti_bytes
from asyncflow.enums import SegCompression, SegType, SourceKind
from asyncflow.errors import SegCheckError
from asyncflow.labels.segment import label_values, labels_from_dataset_json
from asyncflow.reading.dicom import read_instance
from asyncflow.reading.prepare import prepare_case
from asyncflow.writing.base import Algorithm, OutputOptions
from asyncflow.writing.nifti import nifti_seg_bytes, read_nifti_seg
from asyncflow.writing.seg import check_dicom_seg, dicom_seg_bytes, read_dicom_seg

LABELS = labels_from_dataset_json({"labels": {"background": 0, "liver": 1, "tumor": 2, "vessel": 3}})
ALGORITHM = Algorithm(
    "nnU-Net Dataset999_Test", "nnunetv2 2.8.1", {"trainer": "nnUNetTrainer", "folds": "0,1"}
)


def _dicom_case(tmp_path: Path, rng: np.random.Generator, orientation=(1, 0, 0, 0, 1, 0)):
    phantom = make_phantom(rng, (12, 20, 24), spacing=(0.7, 0.8, 2.5))
    datasets = dicom_series_datasets(phantom, orientation=orientation)
    source = tmp_path / "src"
    source.mkdir()
    paths = []
    for k, ds in zip(rng.permutation(len(datasets)), datasets, strict=True):
        path = source / f"file{k:03d}"  # names unrelated to slice order
        path.write_bytes(dicom_bytes(ds))
        paths.append(path)
    case = Case(
        "case-0001", SourceKind.DICOM, "x", Origin(0, "origin"), paths, [read_instance(p) for p in paths]
    )
    return phantom, datasets, case


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (0.866025, 0.5, 0, -0.5, 0.866025, 0)])
def test_dicom_prepare_rebuilds_the_volume_in_slice_order(
    tmp_path: Path, rng: np.random.Generator, orientation: tuple[float, ...]
) -> None:
    phantom, datasets, case = _dicom_case(tmp_path, rng, orientation)
    prepared = prepare_case(case, tmp_path / "work")
    assert [p.name for p in prepared.channel_files] == ["case-0001_0000.nii.gz"]
    image = sitk.ReadImage(str(prepared.channel_files[0]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), phantom.image)  # HU after rescale
    np.testing.assert_allclose(image.GetSpacing(), phantom.spacing, atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), datasets[0].ImagePositionPatient, atol=1e-3)
    np.testing.assert_allclose(image.GetDirection()[:6:3], orientation[0:2], atol=1e-4)
    by_path = {i.path: i.sop_instance_uid for i in case.instances}
    assert [by_path[p] for p in prepared.source_files] == [str(ds.SOPInstanceUID) for ds in datasets]


def test_dicom_seg_decodes_to_the_label_map_on_its_sources(tmp_path: Path, rng: np.random.Generator) -> None:
    phantom, datasets, case = _dicom_case(tmp_path, rng)
    prepared = prepare_case(case, tmp_path / "work")
    labels = phantom.labels.copy()
    labels[labels == 2] = 3  # values {1, 3}: segments must not be renumbered by count
    labels[0] = 0  # an empty first frame is omitted on write
    data = dicom_seg_bytes(prepared.source_files, labels, LABELS, ALGORITHM)
    numbers, names = read_dicom_seg(data, [str(ds.SOPInstanceUID) for ds in datasets])
    assert names == {1: "liver", 2: "vessel"}
    decoded = np.select([numbers == 1, numbers == 2], [1, 3], 0)
    np.testing.assert_array_equal(decoded, labels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int16, np.int64, np.float32])
def test_label_values_are_the_foreground_values_of_any_label_map(dtype: type) -> None:
    labels = np.zeros((5, 7, 9), dtype)
    labels[1, 2:4, 3] = 7
    labels[4, 0, 0] = 3
    wide = 1 if dtype is np.uint8 else 300  # past one byte where the type allows
    labels[2, 6, 8] = wide
    assert label_values(labels) == sorted({3, 7, wide})
    assert label_values(np.zeros((3, 4, 4), dtype)) == []
    if dtype in (np.int16, np.int64):  # negative values: counted, never folded into others
        labels[0, 0, 0] = -2
        assert label_values(labels) == sorted({-2, 3, 7, wide})


def test_dicom_seg_of_an_empty_prediction_still_describes_the_model_labels(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    _, datasets, case = _dicom_case(tmp_path, rng)
    prepared = prepare_case(case, tmp_path / "work")
    empty = np.zeros((len(datasets), datasets[0].Rows, datasets[0].Columns), np.uint8)
    data = dicom_seg_bytes(prepared.source_files, empty, LABELS, ALGORITHM)
    numbers, names = read_dicom_seg(data, [str(ds.SOPInstanceUID) for ds in datasets])
    assert sorted(names.values()) == ["liver", "tumor", "vessel"]
    assert not numbers.any()


def test_dicom_seg_rejects_a_prediction_off_the_source_grid(tmp_path: Path, rng: np.random.Generator) -> None:
    phantom, _, case = _dicom_case(tmp_path, rng)
    prepared = prepare_case(case, tmp_path / "work")
    with pytest.raises(ValueError, match="does not match the source grid"):
        dicom_seg_bytes(prepared.source_files, phantom.labels[:, :, 1:], LABELS, ALGORITHM)


def test_nifti_prepare_and_export_keep_the_source_geometry(tmp_path: Path, rng: np.random.Generator) -> None:
    phantom = make_phantom(rng, (10, 12, 14), spacing=(0.6, 0.7, 3.0), origin=(10.0, -20.0, 5.0))
    source = tmp_path / "scan.nii.gz"
    source.write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    case = Case("case-0002", SourceKind.NIFTI, "scan", Origin(0, "origin"), [source])
    prepared = prepare_case(case, tmp_path / "work")
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(prepared.channel_files[0]))), phantom.image
    )
    # For the v2 backend nothing is written: the same voxels stay in memory.
    in_memory = prepare_case(case, tmp_path / "memory", write_files=False)
    assert in_memory.channel_files == [] and not any((tmp_path / "memory").iterdir())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(in_memory.images[0]), phantom.image)
    assert in_memory.geometry == prepared.geometry == Geometry.of_file(source)
    out = read_nifti_seg(nifti_seg_bytes(phantom.labels, prepared.geometry, tmp_path / "seg.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), phantom.labels)
    reference = sitk.ReadImage(str(source))
    assert out.GetSpacing() == pytest.approx(reference.GetSpacing())
    assert out.GetOrigin() == pytest.approx(reference.GetOrigin())
    assert out.GetDirection() == pytest.approx(reference.GetDirection())


@pytest.mark.parametrize("shape", [(12, 14), (2, 6, 7, 8)], ids=["2D", "4D"])
def test_nifti_that_is_not_a_3d_volume_fails_clearly(tmp_path: Path, shape: tuple[int, ...]) -> None:
    image = sitk.GetImageFromArray(np.zeros(shape, np.int16), isVector=False)
    source = tmp_path / "odd.nii.gz"
    sitk.WriteImage(image, str(source))
    case = Case("case-0003", SourceKind.NIFTI, "odd", Origin(0, "origin"), [source])
    with pytest.raises(ValueError, match=rf"{len(shape)}D; a 3D volume is needed"):
        prepare_case(case, tmp_path / "work")


def test_dicom_seg_describes_its_segments_and_algorithm(tmp_path: Path, rng: np.random.Generator) -> None:
    phantom, datasets, case = _dicom_case(tmp_path, rng)
    prepared = prepare_case(case, tmp_path / "work")
    seg = pydicom.dcmread(
        io.BytesIO(dicom_seg_bytes(prepared.source_files, phantom.labels, LABELS, ALGORITHM))
    )
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert seg.PatientID == datasets[0].PatientID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    liver, tumor = seg.SegmentSequence
    assert (liver.SegmentLabel, liver.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("liver", "10200004")
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert (tumor.SegmentLabel, tumor.SegmentedPropertyTypeCodeSequence[0].CodeValue) == (
        "tumor",
        "108369006",
    )
    assert tumor.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert liver.SegmentAlgorithmType == "AUTOMATIC"
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
        "nnU-Net Dataset999_Test",
        "nnunetv2 2.8.1",
    )
    assert "trainer=nnUNetTrainer" in algorithm.AlgorithmParameters
    # empty frames are omitted: fewer frames than slices x segments
    assert int(seg.NumberOfFrames) < 2 * len(datasets)


@pytest.mark.skipif(DCIODVFY_MISSING, reason="dicom3tools' dciodvfy is not installed (CI installs it)")
def test_dicom_seg_passes_the_dicom3tools_validator(tmp_path: Path, rng: np.random.Generator) -> None:
    phantom, _, case = _dicom_case(tmp_path, rng)
    prepared = prepare_case(case, tmp_path / "work")
    data = dicom_seg_bytes(prepared.source_files, phantom.labels, LABELS, ALGORITHM)
    assert dciodvfy_findings(data, tmp_path) == []


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_recognised_by_content_needs_no_suffix(
    tmp_path: Path, rng: np.random.Generator, suffix: str
) -> None:
    phantom = make_phantom(rng, (6, 7, 8), origin=(1.0, 2.0, 3.0))
    named = tmp_path / f"named{suffix}"
    image = sitk.GetImageFromArray(phantom.image)
    image.SetOrigin(phantom.origin)
    sitk.WriteImage(image, str(named))
    bare = tmp_path / "input-3"  # a raw-bytes entry or an S3 key without suffix
    bare.write_bytes(named.read_bytes())
    case = Case("case-0004", SourceKind.NIFTI, "input-3", Origin(0, "origin"), [bare])
    prepared = prepare_case(case, tmp_path / "work")
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(prepared.channel_files[0]))), phantom.image
    )
    out = read_nifti_seg(nifti_seg_bytes(phantom.labels, prepared.geometry, tmp_path / "seg.nii.gz"))
    assert out.GetOrigin() == pytest.approx(phantom.origin)


OPTION_SETS = [
    OutputOptions(SegType.BINARY, keep_empty_frames=True),
    *(
        OutputOptions(kind, compression=c)
        for kind in (SegType.FRACTIONAL, SegType.LABELMAP)
        for c in SegCompression
    ),
    OutputOptions(SegType.LABELMAP, keep_empty_frames=True),
]


@pytest.mark.parametrize(
    "options", OPTION_SETS, ids=lambda o: f"{o.segmentation_type}-{o.compression}-{o.keep_empty_frames}"
)
def test_every_seg_option_decodes_to_the_label_map(
    tmp_path: Path, rng: np.random.Generator, options: OutputOptions
) -> None:
    phantom = make_phantom(rng, (10, 40, 40), spacing=(0.8, 0.8, 2.0))  # JPEG 2000 needs 32 pixels or more
    datasets = dicom_series_datasets(phantom)
    paths = []
    for k, ds in enumerate(datasets):
        paths.append(tmp_path / f"f{k}")
        paths[-1].write_bytes(dicom_bytes(ds))
    labels = phantom.labels.copy()
    labels[:2] = 0  # empty frames: omitted unless kept
    data = dicom_seg_bytes(paths, labels, LABELS, ALGORITHM, options)  # checks itself on the way out
    seg = pydicom.dcmread(io.BytesIO(data))
    assert (seg.SegmentationType, seg.file_meta.TransferSyntaxUID) == (
        options.segmentation_type,
        {"none": ExplicitVRLittleEndian, "rle": RLELossless, "jpegls": JPEGLSLossless, "jpeg2000": JPEG2000Lossless}[options.compression],
    )  # fmt: skip
    numbers, _ = read_dicom_seg(data, [str(ds.SOPInstanceUID) for ds in datasets])
    np.testing.assert_array_equal(numbers, labels)
    if options.segmentation_type == "LABELMAP":
        return  # dicom3tools does not know LABELMAP (new in 2024) yet
    assert dciodvfy_findings(data, tmp_path) == []


def test_a_seg_that_does_not_decode_to_the_prediction_is_refused(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    phantom, datasets, case = _dicom_case(tmp_path, rng)
    prepared = prepare_case(case, tmp_path / "work")
    data = dicom_seg_bytes(prepared.source_files, phantom.labels, LABELS, ALGORITHM)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    shifted = np.roll(phantom.labels, 1, axis=0)
    with pytest.raises(SegCheckError, match="decodes to other voxels"):
        check_dicom_seg(data, uids, shifted, OutputOptions())
    with pytest.raises(SegCheckError, match="references 12 instances, the source series has 11"):
        check_dicom_seg(data, uids[:-1], phantom.labels[:-1], OutputOptions())


def test_seg_header_names_its_producer_and_keeps_clinical_trial_attributes(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    phantom = make_phantom(rng, (6, 16, 16))
    paths = []
    for k, ds in enumerate(dicom_series_datasets(phantom, series_number=7)):
        ds.ClinicalTrialSponsorName = "Sponsor"
        ds.ClinicalTrialProtocolID = "PROTO-1"
        ds.ClinicalTrialSubjectID = "SUBJ-9"
        ds.ClinicalTrialSeriesID = "source-series"  # describes the source series: not copied
        ds.PatientIdentityRemoved = "YES"
        paths.append(tmp_path / f"f{k}")
        paths[-1].write_bytes(dicom_bytes(ds))
    seg = pydicom.dcmread(io.BytesIO(dicom_seg_bytes(paths, phantom.labels, LABELS, ALGORITHM)))
    assert (seg.ClinicalTrialSponsorName, seg.ClinicalTrialProtocolID, seg.ClinicalTrialSubjectID) == (
        "Sponsor", "PROTO-1", "SUBJ-9"
    )  # fmt: skip
    assert "ClinicalTrialSeriesID" not in seg and seg.PatientIdentityRemoved == "YES"
    assert (seg.SeriesNumber // 10_000, seg.InstanceNumber, seg.ContentLabel, seg.Manufacturer) == (
        71,  # source series 7, the SEG (asyncflow.writing.base.output_series)
        1,
        "NNUNET",
        "asyncflow",
    )
    assert seg.SeriesDescription == "Segmentation of #7, nnU-Net Dataset999_Test"
    assert seg.ContentDescription == "nnU-Net Dataset999_Test automatic segmentation"
    assert seg.SoftwareVersions == "asyncflow 0.1.0" and str(seg.ContentCreatorName) == "asyncflow^"
    empty = pydicom.dcmread(
        io.BytesIO(dicom_seg_bytes(paths, np.zeros_like(phantom.labels), LABELS, ALGORITHM))
    )
    assert empty.ContentDescription == "nnU-Net Dataset999_Test: no segment found"

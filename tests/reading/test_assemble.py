from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import dicom_bytes, make_tar
from pydicom.uid import BasicTextSRStorage, SegmentationStorage

from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom, nifti_bytes
from asyncflow.enums import SourceKind
from asyncflow.reading.archives import unpack
from asyncflow.reading.assemble import CaseBuilder
from asyncflow.reading.dicom import order_series, read_instance
from asyncflow.reading.request import InputItem
from asyncflow.reading.scan import scan


def _series(rng: np.random.Generator, slices: int = 6, **kwargs: object):
    return dicom_series_datasets(make_phantom(rng, (slices, 16, 16)), **kwargs)  # type: ignore[arg-type]


def _scan(tmp_path: Path, index: int, name: str, data: bytes):
    return scan(unpack(InputItem(index, name, data=data), tmp_path / f"in{index}"))


def test_files_are_classified_by_content(tmp_path: Path, rng: np.random.Generator) -> None:
    series = _series(rng)
    report = _series(rng, slices=1)[0]
    report.SOPClassUID = BasicTextSRStorage
    seg = _series(rng, slices=1)[0]
    seg.SOPClassUID = SegmentationStorage
    phantom = make_phantom(rng, (8, 8, 8))
    members = {f"noext/{k}": dicom_bytes(ds) for k, ds in enumerate(series)}
    members |= {
        "report.dcm": dicom_bytes(report),
        "seg": dicom_bytes(seg),
        "volume.nii.gz": nifti_bytes(phantom.image, phantom.spacing, phantom.origin),
        "looks_like.nii.gz": b"\x1f\x8b garbage",
        "notes.txt": b"hello",
        "truncated": dicom_bytes(series[0])[:200],
    }
    result = _scan(tmp_path, 0, "mixed.tar", make_tar(members))
    assert len(result.dicom) == len(series)
    assert [p.name for p in result.nifti] == ["volume.nii.gz"]
    reasons = {s.path: s.reason for s in result.skipped}
    assert "Basic Text SR Storage" in reasons["report.dcm"]
    assert "Segmentation Storage" in reasons["seg"]
    assert reasons["notes.txt"] == reasons["looks_like.nii.gz"] == "neither DICOM nor NIfTI"
    assert reasons["truncated"] == "not an image storage class (no SOPClassUID)"


def test_series_group_by_uid_across_inputs_and_duplicates_collapse(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    one, two = _series(rng, series_number=1), _series(rng, series_number=2)
    builder = CaseBuilder()
    # series one split over two archives, with one slice in both; series two beside it
    first = make_tar({f"a/{k}": dicom_bytes(ds) for k, ds in enumerate(one[:4])})
    second = make_tar(
        {f"b/{k}": dicom_bytes(ds) for k, ds in enumerate(one[3:])}
        | {f"c/{k}": dicom_bytes(ds) for k, ds in enumerate(two)}
    )
    # A series is a case as soon as its input is scanned: prediction need not wait for the rest.
    (early,) = builder.add(_scan(tmp_path, 0, "part1.tar", first))
    assert (early.output_name, len(early.instances), builder.withdrawn) == ("part1", 4, [])
    # The next input grows it: that case is withdrawn and the whole series is a new case.
    cases = builder.add(_scan(tmp_path, 1, "part2.tar", second))
    assert builder.withdrawn == [early]
    assert builder.finish() == []
    assert sorted((c.output_name, len(c.instances)) for c in cases) == [("part1", 6), ("part2", 6)]
    assert all(c.kind is SourceKind.DICOM for c in cases) and early not in cases


def test_several_series_of_one_input_are_named_by_series_number(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    members = {}
    for number in (3, 7):
        members |= {
            f"s{number}/{k}": dicom_bytes(ds) for k, ds in enumerate(_series(rng, series_number=number))
        }
    builder = CaseBuilder()
    cases = builder.add(_scan(tmp_path, 0, "study.tar.gz", make_tar(members)))  # an archive's series: at once
    assert builder.finish() == []
    assert sorted(c.output_name for c in cases) == ["study_S3", "study_S7"]


def test_output_names_stay_unique_when_inputs_share_a_name(tmp_path: Path, rng: np.random.Generator) -> None:
    phantom = make_phantom(rng, (8, 8, 8))
    volume = nifti_bytes(phantom.image, phantom.spacing, phantom.origin)
    builder = CaseBuilder()
    cases = []
    for index, key in enumerate(["site1/scan.nii.gz", "site2/scan.nii.gz", "SCAN.nii.gz"]):
        cases += builder.add(_scan(tmp_path, index, key, volume))
    assert [c.output_name for c in cases] == ["scan", "scan-2", "SCAN-3"]
    assert [c.case_id for c in cases] == ["case-0001", "case-0002", "case-0003"]


def test_multi_modal_sets_and_single_channel_names(tmp_path: Path, rng: np.random.Generator) -> None:
    phantom = make_phantom(rng, (8, 8, 8))
    volume = nifti_bytes(phantom.image, phantom.spacing, phantom.origin)
    archive = make_tar(
        {
            "p1_0001.nii.gz": volume,
            "p1_0000.nii.gz": volume,
            "p2_0000.nii.gz": volume,
            "p3_0002.nii.gz": volume,
        }
    )
    builder = CaseBuilder(multi_modal=True)
    cases = builder.add(_scan(tmp_path, 0, "mm.tar", archive))
    by_name = {c.output_name: c for c in cases}
    assert sorted(by_name) == ["p1", "p2"]
    assert [p.name for p in by_name["p1"].files] == ["p1_0000.nii.gz", "p1_0001.nii.gz"]
    assert any("not 0..0" in s.reason for s in builder.skipped)

    single = CaseBuilder(multi_modal=False).add(_scan(tmp_path, 1, "mm.tar", archive))
    assert sorted(c.output_name for c in single) == ["p1", "p1_0001", "p2", "p3_0002"]


def test_single_slice_series_is_skipped_with_a_reason(tmp_path: Path, rng: np.random.Generator) -> None:
    builder = CaseBuilder()
    builder.add(_scan(tmp_path, 0, "scout.dcm", dicom_bytes(_series(rng, slices=1)[0])))
    assert builder.finish() == []
    assert "single-slice" in builder.skipped[0].reason


def _instances(tmp_path: Path, datasets) -> list:
    paths = []
    for k, ds in enumerate(datasets):
        path = tmp_path / f"{k:03d}"
        path.write_bytes(dicom_bytes(ds))
        paths.append(path)
    return [read_instance(p) for p in paths]


@pytest.mark.parametrize(
    "orientation",
    [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (0.866025, 0.5, 0, -0.5, 0.866025, 0)],
    ids=["axial", "sagittal", "oblique"],
)
def test_order_series_sorts_along_the_normal_not_by_number_or_name(
    tmp_path: Path, rng: np.random.Generator, orientation: tuple[float, ...]
) -> None:
    datasets = _series(rng, slices=7, orientation=orientation)
    instances = _instances(tmp_path, datasets)
    shuffled = [instances[k] for k in rng.permutation(len(instances))]
    ordered = order_series(shuffled)
    assert [i.sop_instance_uid for i in ordered] == [str(ds.SOPInstanceUID) for ds in datasets]


def test_order_series_rejects_irregular_series(tmp_path: Path, rng: np.random.Generator) -> None:
    datasets = _series(rng, slices=6)
    instances = _instances(tmp_path, datasets)
    with pytest.raises(ValueError, match="non-uniform"):
        order_series(instances[:2] + instances[3:])
    with pytest.raises(ValueError, match=r"images at .* positions"):
        datasets[1].ImagePositionPatient = datasets[0].ImagePositionPatient
        order_series(_instances(tmp_path, datasets))
    datasets = _series(rng, slices=3)
    datasets[2].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    with pytest.raises(ValueError, match="orientations"):
        order_series(_instances(tmp_path, datasets))


def test_order_series_rejects_slices_of_different_studies(tmp_path: Path, rng: np.random.Generator) -> None:
    datasets = _series(rng, slices=4)
    datasets[2].StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="mixes StudyInstanceUIDs"):
        order_series(_instances(tmp_path, datasets))


def test_loose_dicom_files_name_their_series_after_the_folder(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    builder = CaseBuilder()
    for index, ds in enumerate(_series(rng)):
        # one input per file, as from a folder on the command line or per-object S3 keys
        builder.add(_scan(tmp_path, index, f"export/ct_abdomen/IM{index:04d}", dicom_bytes(ds)))
    loose = _series(rng, slices=3)
    builder.add(_scan(tmp_path, 99, "input-99", dicom_bytes(loose[0])))
    builder.add(_scan(tmp_path, 100, "input-100", dicom_bytes(loose[1])))
    assert sorted(c.output_name for c in builder.finish()) == ["ct_abdomen", "input-99"]

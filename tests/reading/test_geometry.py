"""Geometry edge cases, from files to SEG: each phantom is asymmetric, so a flip or shift is caught.

Files are written without extension under names unrelated to slice order, then go
through the real assembly (scan, CaseBuilder), prepare and SEG writer. The SEG is
written from the phantom's own labels (the prediction's place), decoded on the
source instances and compared with the truth of each instance; dciodvfy checks it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import dciodvfy_findings, dicom_bytes
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid

from asyncflow.cli.synthetic import Phantom, dicom_series_datasets, make_phantom
from asyncflow.labels.segment import labels_from_dataset_json
from asyncflow.reading.archives import unpack
from asyncflow.reading.assemble import CaseBuilder
from asyncflow.reading.prepare import prepare_case
from asyncflow.reading.request import request_items
from asyncflow.reading.scan import scan
from asyncflow.writing.base import Algorithm, LabelMap, OutputOptions
from asyncflow.writing.registry import write_outputs
from asyncflow.writing.seg import dicom_seg_bytes, read_dicom_seg

LABELS = labels_from_dataset_json({"labels": {"background": 0, "liver": 1, "tumor": 2}})
ALGORITHM = Algorithm("nnU-Net Dataset999_Test", "nnunetv2 2.8.1", {"folds": "0"})
OBLIQUE = (0.866025, 0.5, 0.0, -0.5, 0.866025, 0.0)


def _with_localizer(datasets: list[FileDataset]) -> list[FileDataset]:
    scout = copy.deepcopy(datasets[0])
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    scout.Rows, scout.Columns = 16, 24
    scout.PixelData = np.zeros((16, 24), np.uint16).tobytes()
    return [*datasets, scout]


def _without_slice(datasets: list[FileDataset]) -> list[FileDataset]:
    return datasets[:7] + datasets[8:]


# name -> (series arguments, phantom spacing (x, y, z), how the series is altered, expected failure)
CASES: dict[str, tuple[dict, tuple[float, float, float], Callable | None, str | None]] = {
    "axial": ({}, (0.8, 0.8, 2.0), None, None),
    "oblique": ({"orientation": OBLIQUE}, (0.8, 0.8, 2.0), None, None),
    "descending_z": ({"orientation": (1, 0, 0, 0, -1, 0)}, (0.8, 0.8, 2.0), None, None),
    "non_square_pixels": ({}, (0.6, 1.1, 2.0), None, None),
    "localizer_mixed_in": ({}, (0.8, 0.8, 2.0), _with_localizer, None),
    "missing_slice": ({}, (0.8, 0.8, 2.0), _without_slice, "non-uniform slice spacing"),
    "gantry_tilt_too_steep": (  # a tilt up to 30 degrees is resampled (tests/reading/test_scanner_shapes.py)
        {"slice_shift": (0.0, 1.6, 0.0)},
        (0.8, 0.8, 2.0),
        None,
        r"gantry tilt of about 38\.7 degrees, more than the 30 degrees asyncflow resamples",
    ),
}


def _series_on_disk(folder: Path, rng: np.random.Generator, name: str) -> tuple[Phantom, list[FileDataset]]:
    arguments, spacing, alter, _ = CASES[name]
    phantom = make_phantom(rng, (14, 20, 24), spacing=spacing)
    datasets = dicom_series_datasets(phantom, **arguments)
    written = alter(datasets) if alter else datasets
    folder.mkdir(parents=True)
    for k, ds in zip(rng.permutation(len(written)), written, strict=True):
        (folder / f"f{k:03d}").write_bytes(dicom_bytes(ds))  # no extension, names out of order
    return phantom, datasets


@pytest.mark.parametrize("name", list(CASES))
def test_geometry_edge_case(tmp_path: Path, rng: np.random.Generator, name: str) -> None:
    phantom, datasets = _series_on_disk(tmp_path / "series", rng, name)
    builder = CaseBuilder()
    for item in request_items([tmp_path / "series"]):
        builder.add(scan(unpack(item, tmp_path / "unpacked" / str(item.index))))
    (case,) = builder.finish()
    if name == "localizer_mixed_in":
        assert [s.reason for s in builder.skipped] == ["localizer (ImageType LOCALIZER)"]
    else:
        assert builder.skipped == []

    expected_failure = CASES[name][3]
    if expected_failure:
        with pytest.raises(ValueError, match=expected_failure):
            prepare_case(case, tmp_path / "work")
        return
    prepared = prepare_case(case, tmp_path / "work")

    # nnU-Net's input is the phantom, slice k at position origin + k * spacing * normal.
    image = sitk.ReadImage(str(prepared.channel_files[0]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), phantom.image)
    np.testing.assert_allclose(image.GetSpacing(), phantom.spacing, atol=1e-4)
    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 2], np.cross(orientation[:3], orientation[3:]), atol=1e-4)

    # The SEG, decoded on each source instance, holds that instance's truth.
    data = dicom_seg_bytes(prepared.source_files, phantom.labels, LABELS, ALGORITHM)
    numbers, names = read_dicom_seg(data, [str(ds.SOPInstanceUID) for ds in datasets])
    assert names == {1: "liver", 2: "tumor"}
    np.testing.assert_array_equal(numbers, phantom.labels)
    assert not np.array_equal(phantom.labels[::-1], phantom.labels)  # a flip would be caught
    assert dciodvfy_findings(data, tmp_path) == []


def test_multi_frame_enhanced_ct(tmp_path: Path, rng: np.random.Generator) -> None:
    phantom = make_phantom(rng, (14, 20, 24), spacing=(0.7, 0.9, 2.0))
    datasets = dicom_series_datasets(phantom)
    shuffled = [datasets[k] for k in rng.permutation(len(datasets))]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        shuffled, series_instance_uid=hd.UID(), series_number=3, sop_instance_uid=hd.UID(), instance_number=1
    )
    (tmp_path / "in").mkdir()
    enhanced.save_as(tmp_path / "in" / "enhanced")  # one file, no extension
    builder = CaseBuilder()
    for item in request_items([tmp_path / "in"]):
        cases = builder.add(scan(unpack(item, tmp_path / "unpacked")))
    assert builder.finish() == [] and builder.skipped == []
    (case,) = cases
    assert case.instances[0].frames == 14

    prepared = prepare_case(case, tmp_path / "work")
    image = sitk.ReadImage(str(prepared.channel_files[0]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), phantom.image)
    np.testing.assert_allclose(image.GetSpacing(), phantom.spacing, atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), datasets[0].ImagePositionPatient, atol=1e-3)

    # The SEG's frames follow the source's frames, whatever their order.
    job = LabelMap.of(prepared, phantom.labels, LABELS, {}, ALGORITHM, OutputOptions())
    (exported,) = [artifact for artifact in write_outputs(job) if artifact.writer == "dicom_seg"]
    assert exported.data is not None
    numbers, names = read_dicom_seg(exported.data, [str(enhanced.SOPInstanceUID)], source_frames=14)
    slice_of_frame = [
        round(
            (float(f.PlanePositionSequence[0].ImagePositionPatient[2]) - phantom.origin[2])
            / phantom.spacing[2]
        )
        for f in enhanced.PerFrameFunctionalGroupsSequence
    ]
    assert slice_of_frame != sorted(slice_of_frame)  # the frames are not in slice order
    np.testing.assert_array_equal(numbers, phantom.labels[slice_of_frame])
    assert names == {1: "liver", 2: "tumor"}
    assert dciodvfy_findings(exported.data, tmp_path) == []

"""asyncflow.testing.FakeBackend: the backend contract without a model, for users' own tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import dicom_bytes, make_tar, phantom_nifti

from asyncflow import Settings, run_request_sync
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom, nifti_bytes
from asyncflow.testing import FakeBackend, image_array
from asyncflow.writing.nifti import read_nifti_seg
from asyncflow.writing.seg import read_dicom_seg


def _settings(tmp_path: Path) -> Settings:
    return Settings(work_dir=tmp_path / "work", prepare_workers=2, export_workers=2, unpack_workers=1)


def test_its_predictions_go_through_the_real_export_to_seg_and_nifti(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    phantom = make_phantom(rng, (12, 24, 24))
    datasets = dicom_series_datasets(phantom)
    series = make_tar({f"s/{k}": dicom_bytes(ds) for k, ds in enumerate(datasets)})
    volume = nifti_bytes(phantom.image, phantom.spacing, phantom.origin)
    backend = FakeBackend(labels={"bright": 1}, predict=lambda case: image_array(case) > 100)
    result = run_request_sync(
        [{"ct.tar": series}, {"vol.nii.gz": volume}], _settings(tmp_path), backend=backend
    )
    assert result.status == "done" and backend.loaded and len(backend.predicted) == 2
    expected = (phantom.image > 100).astype(np.uint8)
    (seg,) = result.dicom_seg_bytes.values()
    numbers, names = read_dicom_seg(seg, [ds.SOPInstanceUID for ds in datasets])
    assert names == {1: "bright"} and np.array_equal(numbers, expected)
    (nifti,) = result.nifti_seg_bytes.values()
    assert np.array_equal(sitk.GetArrayFromImage(read_nifti_seg(nifti)), expected)


def test_chosen_cases_fail_alone_and_a_wrong_shape_is_the_callers_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    volumes = [{f"v{n}.nii.gz": phantom_nifti(rng, (8, 12, 12))} for n in range(3)]
    result = run_request_sync(volumes, _settings(tmp_path), backend=FakeBackend(fail={"case-0002"}))
    assert [(c.case_id, c.status, c.error_stage) for c in result.cases] == [
        ("case-0001", "done", None),
        ("case-0002", "failed", "predict"),
        ("case-0003", "done", None),
    ]
    wrong = FakeBackend(predict=lambda case: np.zeros((2, 2, 2), np.uint8))
    (case,) = run_request_sync(volumes[:1], _settings(tmp_path / "b"), backend=wrong).cases
    assert case.status == "failed" and "predict returned a (2, 2, 2) map" in str(case.error)


@pytest.mark.parametrize(
    ("labels", "names"), [({"a": 1, "b": 3}, {1: "a", 3: "b"}), (None, {1: "foreground"})]
)
def test_its_model_declares_the_labels_given(labels: dict[str, int] | None, names: dict[int, str]) -> None:
    declared = FakeBackend(labels=labels).info.labels
    assert {value: label.name for value, label in declared.items()} == names

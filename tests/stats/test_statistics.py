"""Per-case label statistics: exact on hand-made label maps, and on the real model's output
against the source voxels and the phantom's own volume."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import dicom_bytes, make_tar

import asyncflow.writing.statistics
from asyncflow import LabelError, run_request
from asyncflow.cli import main
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom, nifti_bytes
from asyncflow.labels.config import merge_labels, parse_label_overrides
from asyncflow.labels.segment import labels_from_dataset_json
from asyncflow.log import configure_logging
from asyncflow.stats.measure import CSV_FIELDS, measure_labels
from asyncflow.writing.nifti import read_nifti_seg
from asyncflow.writing.seg import read_dicom_seg

pytestmark = pytest.mark.anyio

LABELS = labels_from_dataset_json({"labels": {"background": 0, "liver": 1, "tumor": 2, "cyst": 3}})


def test_figures_on_a_hand_made_label_map() -> None:
    labels = np.zeros((10, 12, 14), np.uint8)
    labels[1:4, 2:6, 3:8] = 1  # a 3 x 4 x 5 block
    labels[6, 8, 10] = 1  # a voxel touching the next one at a corner only: one 26-component
    labels[7, 9, 11] = 1
    labels[8, 1, 1] = 1  # and one apart
    labels[5:7, 5:7, 5:7] = 2
    rng = np.random.default_rng(7)
    intensities = rng.normal(50, 20, labels.shape).astype(np.float32)
    spacing = (0.7, 0.8, 2.5)  # x, y, z

    liver, tumor, cyst = measure_labels(labels, intensities, spacing, LABELS)

    voxel_ml = 0.7 * 0.8 * 2.5 / 1000
    assert (liver.label, liver.name, liver.voxels) == (1, "liver", 63)
    assert liver.volume_ml == pytest.approx(63 * voxel_ml, rel=1e-12)
    values = intensities[labels == 1].astype(np.float64)
    assert liver.intensity_mean == pytest.approx(values.mean(), rel=1e-12)
    assert liver.intensity_sd == pytest.approx(values.std(), rel=1e-12)
    assert [liver.intensity_p5, liver.intensity_p50, liver.intensity_p95] == pytest.approx(
        list(np.percentile(values, [5, 50, 95]))
    )
    assert (liver.components, liver.largest_component_share) == (3, pytest.approx(60 / 63))
    # bounding box: x 1..11 (11 voxels), y 1..9 (9), z 1..8 (8)
    assert liver.extent_mm == pytest.approx((11 * 0.7, 9 * 0.8, 8 * 2.5))
    assert liver.flags == []
    assert (tumor.voxels, tumor.components, tumor.largest_component_share) == (8, 1, 1.0)
    assert cyst.as_dict() == {
        "label": 3,
        "name": "cyst",
        "voxels": 0,
        "volume_ml": 0.0,
        "intensity_mean": None,
        "intensity_sd": None,
        "intensity_p5": None,
        "intensity_p50": None,
        "intensity_p95": None,
        "components": 0,
        "largest_component_share": None,
        "extent_mm": None,
        "flags": ["empty"],
    }


def test_a_volume_outside_the_configured_range_is_flagged() -> None:
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[:2] = 1
    labels[3, 0, 0] = 2
    config = parse_label_overrides({1: {"volume_ml": [0.1, 1]}, 2: {"volume_ml": [0.005, 1]}}, "config")
    definitions = merge_labels(LABELS, config)
    liver, tumor, _ = measure_labels(labels, np.zeros(labels.shape), (10.0, 10.0, 10.0), definitions)
    assert (liver.volume_ml, liver.flags) == (pytest.approx(32.0), ["volume_above_plausible"])
    assert (tumor.volume_ml, tumor.flags) == (pytest.approx(1.0), [])
    below = merge_labels(LABELS, parse_label_overrides({2: {"volume_ml": [2, 3]}}, "config"))
    assert measure_labels(labels, np.zeros(labels.shape), (10.0,) * 3, below)[1].flags == [
        "volume_below_plausible"
    ]
    with pytest.raises(LabelError, match=r"label 1 volume_ml: a plausible volume needs 0 <= low <= high"):
        parse_label_overrides({1: {"volume_ml": [5, 1]}}, "config")
    with pytest.raises(LabelError, match=r"a plausible volume is \[low, high\] in ml"):
        parse_label_overrides({1: {"volume_ml": "big"}}, "config")


def _hu(datasets: list) -> np.ndarray:
    """The series' voxels in HU as pydicom reads them (not SimpleITK: another reader)."""
    ordered = [pydicom.dcmread(io.BytesIO(dicom_bytes(ds))) for ds in datasets]
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ordered])


async def test_statistics_of_the_real_model_match_its_label_maps_the_source_and_the_phantom(
    tmp_path: Path, settings_factory, rng: np.random.Generator
) -> None:
    nifti = make_phantom(rng, (40, 64, 64), spacing=(0.9, 0.8, 1.5))
    dicom = make_phantom(rng, (64, 64, 64), spacing=(0.8, 0.8, 1.0))  # holds the ellipsoid whole
    series = dicom_series_datasets(dicom)
    entries = [
        {"scan.nii.gz": nifti_bytes(nifti.image, nifti.spacing, nifti.origin)},
        {"study.tar": make_tar({f"s/{k}.dcm": dicom_bytes(ds) for k, ds in enumerate(series)})},
    ]
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    result = await run_request(entries, settings_factory(tmp_path / "work"))
    assert result.status == "done", result.report()

    by_output = {case.output: case for case in result.cases}
    (seg_name,) = result.dicom_seg_bytes
    numbers, names = read_dicom_seg(
        result.dicom_seg_bytes[seg_name], [str(ds.SOPInstanceUID) for ds in series]
    )
    dicom_labels = np.zeros_like(numbers)
    for number, name in names.items():
        dicom_labels[numbers == number] = {"liver": 1, "tumor": 2}[name]
    nifti_labels = sitk.GetArrayFromImage(read_nifti_seg(result.nifti_seg_bytes["scan.nii.gz"]))
    cases = [
        (by_output["scan.nii.gz"], nifti_labels, nifti.image.astype(np.float64), nifti),
        (by_output[seg_name], dicom_labels, _hu(series), dicom),
    ]
    for case, predicted, source, phantom in cases:
        voxel_ml = math.prod(phantom.spacing) / 1000
        statistics = {row["name"]: row for row in case.outputs["statistics"]}
        assert sorted(statistics) == ["liver", "tumor"]
        for value, name in ((1, "liver"), (2, "tumor")):
            row, mask = statistics[name], predicted == value
            assert row["voxels"] == int(mask.sum()) > 0
            # To a tenth of a voxel's volume: the digits below are the spacing's float noise.
            assert row["volume_ml"] == pytest.approx(mask.sum() * voxel_ml, abs=voxel_ml / 10)
            assert row["intensity_mean"] == pytest.approx(source[mask].mean(), rel=1e-6)
            assert row["intensity_p50"] == pytest.approx(np.median(source[mask]), rel=1e-6)
        # Against the phantom's analytic volume (its voxels hold it to 3 %): within the tiny model's error.
        assert float((phantom.labels >= 1).sum() * voxel_ml) == pytest.approx(phantom.liver_ml, rel=0.03)
        predicted_liver = statistics["liver"]["volume_ml"] + statistics["tumor"]["volume_ml"]
        assert predicted_liver == pytest.approx(phantom.liver_ml, rel=0.1)
        assert statistics["liver"]["components"] >= 1 and statistics["liver"]["flags"] == []

    exported = [json.loads(line) for line in logs.getvalue().splitlines() if '"case.exported"' in line]
    assert len(exported) == 2 and all(e["write_s"] > 0 and len(e["statistics"]) == 2 for e in exported)


async def test_a_failed_measurement_keeps_the_segmentation_and_says_why(
    tmp_path: Path, fake_settings, rng: np.random.Generator, monkeypatch
) -> None:
    from helpers import phantom_backend

    def vanished(*args):
        raise FileNotFoundError("the source went away")

    monkeypatch.setattr(asyncflow.writing.statistics, "measure_labels", vanished)
    phantom = make_phantom(rng, (16, 24, 24))
    result = await run_request(
        [nifti_bytes(phantom.image, phantom.spacing, phantom.origin)],
        fake_settings(tmp_path / "work"),
        backend=phantom_backend(),
    )
    (case,) = result.cases
    assert case.status == "done" and len(result.nifti_seg_bytes) == 1
    assert case.outputs["statistics"] is None
    assert case.outputs["statistics_error"] == "FileNotFoundError: the source went away"


def test_the_cli_writes_a_line_per_case_and_label(
    tmp_path: Path, rng: np.random.Generator, monkeypatch
) -> None:
    from helpers import phantom_backend

    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in range(2):
        phantom = make_phantom(rng, (16, 32, 32))
        (inputs / f"v{n}.nii.gz").write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    out = tmp_path / "out"
    argv = ["run", str(inputs), "-o", str(out), "--work-dir", str(tmp_path)]
    assert main(argv, backend=phantom_backend()) == 0
    rows = list(csv.DictReader((out / "statistics.csv").open()))
    assert list(rows[0]) == CSV_FIELDS
    assert [(r["output"], r["name"]) for r in rows] == [
        ("v0.nii.gz", "liver"),
        ("v0.nii.gz", "tumor"),
        ("v1.nii.gz", "liver"),
        ("v1.nii.gz", "tumor"),
    ]
    report = json.loads((out / "report.json").read_text())
    liver = report["cases"][0]["statistics"][0]
    assert float(rows[0]["volume_ml"]) == round(liver["volume_ml"], 3) > 0  # to a thousandth of a ml
    assert all(len(r["volume_ml"].partition(".")[2]) <= 3 for r in rows)
    assert all(len(r["intensity_mean"].partition(".")[2]) <= 2 for r in rows)
    assert rows[1]["flags"] == "empty" and rows[1]["intensity_mean"] == ""  # the fake finds no tumour

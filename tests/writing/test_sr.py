"""Each SEG's measurements as a TID 1500 Measurement Report (Comprehensive 3D SR): accepted by
dciodvfy, read back by highdicom and dcmqi's tid1500reader, its figures those of statistics.csv."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers import dciodvfy_lines, dicom_bytes, make_tar, phantom_backend

from asyncflow import Result, run_request
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.settings import Settings

NAME, PATIENT_ID = "Zzyzx^Quentin", "PHI-4711"


def _series(rng: np.random.Generator) -> bytes:
    datasets = dicom_series_datasets(
        make_phantom(rng, (16, 32, 32)), patient_name=NAME, patient_id=PATIENT_ID
    )
    return make_tar({f"ct/{k:03d}": dicom_bytes(ds) for k, ds in enumerate(datasets)})


def _run(work: Path, tar: bytes, **settings: Any) -> Result:
    values = {"work_dir": work, "device": "cpu", "outputs": ("sr",), **settings}
    return anyio.run(lambda: run_request([tar], Settings(**values), backend=phantom_backend()))


def _measurements(group: Any) -> dict[tuple[str, str | None], float]:
    """(quantity, derivation) -> value of one measurement group."""
    found = {}
    for measurement in group.get_measurements():
        derivation = measurement.derivation.meaning if measurement.derivation is not None else None
        found[(measurement.name.meaning, derivation)] = float(measurement.value)
    return found


def test_each_seg_has_an_sr_of_its_measurements_that_readers_accept(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    result = _run(tmp_path / "work", _series(rng))
    (case,) = result.report()["cases"]
    assert case["measurement_report"] == "input-0.sr.dcm" and "measurement_report_error" not in case
    data = result.dicom_sr_bytes["input-0.sr.dcm"]
    seg = pydicom.dcmread(io.BytesIO(result.dicom_seg_bytes["input-0.dcm"]))
    sr = hd.sr.srread(io.BytesIO(data))
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.Modality == "SR"
    statistics = {s["label"]: s for s in case["statistics"]}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(case["labels_present"]) == 1  # the phantom's liver: one segment
    (group,) = groups
    segment = group.referenced_segment
    assert (segment.referenced_sop_instance_uid, segment.referenced_segment_numbers) == (
        seg.SOPInstanceUID,
        [1],
    )
    liver = statistics[1]
    assert _measurements(group) == pytest.approx(
        {
            ("Volume", None): liver["volume_ml"],
            ("Attenuation Coefficient", "Mean"): liver["intensity_mean"],
            ("Attenuation Coefficient", "Standard Deviation"): liver["intensity_sd"],
            ("Attenuation Coefficient", "Median"): liver["intensity_p50"],
        },
        rel=1e-6,
    )
    (tmp_path / "checked.dcm").write_bytes(data)
    assert dciodvfy_lines(tmp_path / "checked.dcm") == []
    reader = shutil.which("tid1500reader") or str(Path(sys.executable).with_name("tid1500reader"))
    if not Path(reader).is_file():
        pytest.skip("dcmqi (the dev extra) is not installed: the SR was not read back by its tid1500reader")
    (tmp_path / "sr.dcm").write_bytes(data)
    subprocess.run(
        [reader, "--inputDICOM", tmp_path / "sr.dcm", "--outputMetadata", tmp_path / "meta.json"],
        check=True,
    )
    (measurement,) = json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))["Measurements"]
    volume = next(m for m in measurement["measurementItems"] if m["quantity"]["CodeMeaning"] == "Volume")
    assert (volume["units"]["CodeValue"], float(volume["value"])) == ("ml", pytest.approx(liver["volume_ml"]))


def test_the_sr_is_de_identified_as_the_seg_and_keeps_its_identity_across_runs(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    tar = _series(rng)
    runs = [_run(tmp_path / name, tar, deidentify="basic") for name in ("a", "b")]
    srs = [pydicom.dcmread(io.BytesIO(r.dicom_sr_bytes["input-0.sr.dcm"])) for r in runs]
    for sr in srs:
        assert sr.PatientIdentityRemoved == "YES"
        text = sr.to_json()
        assert "Zzyzx" not in text and "Quentin" not in text and PATIENT_ID not in text
    # The same case, model and settings: the same SR identity (its UIDs derive from the SEG's seed).
    assert (
        srs[0].SOPInstanceUID == srs[1].SOPInstanceUID
        and srs[0].SeriesInstanceUID == srs[1].SeriesInstanceUID
    )
    without = _run(tmp_path / "c", tar, deidentify="basic", outputs=())
    assert without.dicom_sr_bytes == {} and "measurement_report" not in without.report()["cases"][0]

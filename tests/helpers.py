"""Helpers shared by the tests."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import FileDataset


def make_tar(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def phantom_nifti(rng: Any, shape: tuple[int, int, int] = (32, 40, 40)) -> bytes:
    """A synthetic phantom volume (asyncflow.cli.synthetic) as .nii.gz bytes."""
    from asyncflow.cli.synthetic import make_phantom, nifti_bytes

    phantom = make_phantom(rng, shape)
    return nifti_bytes(phantom.image, phantom.spacing, phantom.origin)


def dice(a: Any, b: Any) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def dicom_bytes(ds: FileDataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_series_with_simpleitk(image, folder, *, study_uid: str, series_uid: str) -> list:
    """A CT series written by SimpleITK/GDCM, as in SimpleITK's 'DICOM series from array' example.

    Another generator than asyncflow.cli.synthetic: GDCM picks its own attributes
    (signed pixels, no rescale, no SliceThickness, no SeriesNumber).
    """
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    tags = [
        ("0008|0008", "DERIVED\\SECONDARY"),
        ("0008|0060", "CT"),
        ("0008|103e", "Created-SimpleITK"),
        ("0010|0010", "Other^Generator"),
        ("0010|0020", "GDCM-42"),
        ("0020|000d", study_uid),
        ("0020|000e", series_uid),
        ("0020|0052", study_uid + ".1"),
        ("0020|0037", "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
    ]
    paths = []
    for i in range(image.GetDepth()):
        image_slice = image[:, :, i]
        for tag, value in tags:
            image_slice.SetMetaData(tag, value)
        image_slice.SetMetaData(
            "0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, i)))
        )
        image_slice.SetMetaData("0020|0013", str(i + 1))
        path = folder / f"{i}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(image_slice)
        paths.append(path)
    return paths


DCIODVFY_MISSING = shutil.which("dciodvfy") is None and not os.environ.get("CI")


def dciodvfy_lines(path: Path) -> list[str]:
    """dicom3tools' validator on one DICOM file: its Error and Warning lines. Without it (CI
    installs it) the test is skipped here, with the reason: call it after the test's other checks."""
    if DCIODVFY_MISSING:
        pytest.skip("dicom3tools' dciodvfy is not installed: the DICOM object was not validated")
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [
        line
        for line in (checked.stdout + checked.stderr).splitlines()
        if line.startswith(("Error", "Warning"))
    ]


def dciodvfy_findings(data: bytes, folder: Path) -> list[str]:
    """Errors and warnings of dicom3tools' validator on one DICOM SEG (CI installs it; without
    it the test is skipped here, with the reason)."""
    if DCIODVFY_MISSING:
        pytest.skip("dicom3tools' dciodvfy is not installed: the SEG was not validated")
    path = folder / "checked.dcm"
    path.write_bytes(data)
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    output = checked.stdout + checked.stderr
    assert "Segmentation" in output, output
    return dciodvfy_lines(path)


def dcmqi_meta(seg: Path, folder: Path) -> dict:
    """dcmqi's segimage2itkimage (a second SEG reader) on a SEG: its meta.json. Without dcmqi (the
    dev extra installs it) the test is skipped here, with the reason."""
    import json
    import sys

    dcmqi = shutil.which("segimage2itkimage") or str(Path(sys.executable).with_name("segimage2itkimage"))
    if not Path(dcmqi).is_file():
        pytest.skip("dcmqi (the dev extra) is not installed: the SEG was not read back by it")
    folder.mkdir()
    subprocess.run(
        [dcmqi, "--inputDICOM", str(seg), "--outputDirectory", str(folder)], check=True, capture_output=True
    )
    return json.loads((folder / "meta.json").read_text())


def phantom_backend(**options: Any) -> Any:
    """A :class:`~asyncflow.testing.FakeBackend` with the tiny model's labels that finds a phantom's
    liver by its intensity (above halfway from the tumour's HU to the liver's): no model, yet a slice
    that lands in the wrong place of a SEG still shows as a low Dice against the phantom."""
    from asyncflow.cli.synthetic import LIVER_HU, TUMOR_HU
    from asyncflow.testing import FakeBackend, image_array

    threshold = (LIVER_HU + TUMOR_HU) / 2
    return FakeBackend(
        {"liver": 1, "tumor": 2}, predict=lambda case: image_array(case) > threshold, **options
    )


def cli_run_argv(script: Path, inputs: Path, out: Path) -> list[str]:
    """``python SCRIPT run INPUTS -o OUT --model <the tiny model>``: a test's wrapper around the CLI."""
    from asyncflow.settings import packaged_demo_model

    return [
        sys.executable,
        str(script),
        "run",
        str(inputs),
        "-o",
        str(out),
        "--model",
        str(packaged_demo_model()),
    ]

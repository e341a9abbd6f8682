"""The command line as a user runs it: README's demo, ``run`` with a model, exit codes."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import dciodvfy_lines, write_series_with_simpleitk

from asyncflow._version import __version__
from asyncflow.cli import main
from asyncflow.cli.synthetic import make_phantom, nifti_bytes
from asyncflow.writing.seg import read_dicom_seg

FAST = ["--no-mirroring", "--threads", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _no_model_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("nnUNet_results", "RESULTS_FOLDER", "TASK_NAME", "MULTI_MODAL"):
        monkeypatch.delenv(name, raising=False)


def test_demo_then_run_on_its_inputs(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = tmp_path / "demo"
    assert main(["demo", "--output", str(demo), *FAST]) == 0
    captured = capsys.readouterr()
    summary = captured.out
    # The demo is for people: no JSON log line beside its table (off a terminal, as here).
    assert not [line for line in captured.err.splitlines() if line.startswith("{")]
    assert "done: 4/4 cases" in summary and "Dice liver=" in summary
    for line in summary.splitlines()[1:-1]:
        dice = dict(part.split("=") for part in line.split() if "=" in part)
        assert float(dice["liver"]) >= 0.9 and float(dice["tumor"]) >= 0.8, line
    report = json.loads((demo / "report.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["done"] * 4
    demo_outputs = sorted(p.relative_to(demo).as_posix() for p in demo.glob("*_seg/*"))
    assert demo_outputs == [  # each SEG with its MITK label JSON
        "dicom_seg/ct_study_a.dcm",
        "dicom_seg/ct_study_a.mitklabel.json",
        "dicom_seg/ct_study_b_S1.dcm",
        "dicom_seg/ct_study_b_S1.mitklabel.json",
        "dicom_seg/ct_study_b_S2.dcm",
        "dicom_seg/ct_study_b_S2.mitklabel.json",
        "nifti_seg/phantom_nifti.nii.gz",
    ]

    out = tmp_path / "run"
    code = main(["run", str(demo / "inputs"), "--output", str(out), "--model", str(model_dir), *FAST])
    assert code == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*_seg/*")) == demo_outputs

    # Each run's manifest: what ran, and every file it wrote with its sha256.
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (demo, out)]
    for folder, manifest in zip((demo, out), manifests, strict=True):
        report = json.loads((folder / "report.json").read_text())
        assert manifest["request_id"] == report["request_id"] and manifest["status"] == "done"
        assert manifest["software"]["asyncflow"] == __version__
        assert manifest["software"]["torch"] == metadata.version("torch")
        assert manifest["software"]["nnunetv2"] == metadata.version("nnunetv2")
        assert manifest["model"] == report["model"] and len(report["model"]["key"]) == 64
        assert manifest["settings"]["use_mirroring"] is False and manifest["settings"]["volumes"] == "all"
        assert manifest["timings"]["duration_s"] == report["duration_s"] and manifest["timings"]["cases"] == 4
        assert [o["path"] for o in manifest["outputs"]] == sorted(
            [*demo_outputs, "report.json", "statistics.csv"]
        )
        for output in manifest["outputs"]:
            data = (folder / output["path"]).read_bytes()
            assert (output["bytes"], output["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    # The same data through the same model and settings: the same model key, the same segments
    # (a SEG's own bytes differ by when it was made: its PixelData does not).
    assert manifests[0]["model"]["key"] == manifests[1]["model"]["key"]
    segments = [
        {
            o["path"]: o.get("pixel_data_sha256", o["sha256"])
            for o in m["outputs"]
            if o["path"].endswith((".dcm", ".nii.gz"))
        }
        for m in manifests
    ]
    assert segments[0] == segments[1] and len(segments[0]) == 4


def test_run_without_a_model_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    assert main(["run", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 2
    assert (
        "no model given: name a trained nnU-Net model folder (command line: --model DIR"
        in capsys.readouterr().err
    )


def test_run_exits_1_when_some_cases_fail(tmp_path: Path, model_dir: Path, rng: np.random.Generator) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    phantom = make_phantom(rng, (32, 32, 32))
    (inputs / "good.nii.gz").write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.int16)), str(inputs / "flat.nii"))
    out = tmp_path / "out"
    assert main(["run", str(inputs), "-o", str(out), "--model", str(model_dir), *FAST]) == 1
    report = json.loads((out / "report.json").read_text())
    assert sorted(c["status"] for c in report["cases"]) == ["done", "failed"]
    assert (out / "nifti_seg" / "good.nii.gz").is_file()


def test_run_on_series_written_by_another_generator(
    tmp_path: Path, model_dir: Path, rng: np.random.Generator
) -> None:
    inputs = tmp_path / "tars"
    inputs.mkdir()
    truth = {}
    for n in range(2):
        phantom = make_phantom(rng, (48, 64, 64))
        image = sitk.GetImageFromArray(phantom.image)
        image.SetOrigin((10.0, -20.0, 30.0 * n))
        paths = write_series_with_simpleitk(
            image,
            tmp_path / f"series{n}",
            study_uid=f"1.2.826.0.1.3680043.2.1125.7.{n}",
            series_uid=f"1.2.826.0.1.3680043.2.1125.8.{n}",
        )
        with tarfile.open(inputs / f"export{n}.tgz", "w:gz") as tar:
            for path in paths:
                tar.add(path, arcname=f"export/{path.name}")
        truth[f"export{n}.dcm"] = (phantom.labels, [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths])
    out = tmp_path / "out"
    assert main(["run", str(inputs), "-o", str(out), "--model", str(model_dir), *FAST]) == 0
    assert sorted(p.name for p in (out / "dicom_seg").glob("*.dcm")) == sorted(truth)
    for name, (labels, uids) in truth.items():
        data = (out / "dicom_seg" / name).read_bytes()
        numbers, names = read_dicom_seg(data, uids)  # slices written in z order
        liver = numbers == next(k for k, v in names.items() if v == "liver")
        overlap = 2 * (liver & (labels == 1)).sum() / (liver.sum() + (labels == 1).sum())
        assert overlap >= 0.9, name
    for name in truth:
        assert not [line for line in dciodvfy_lines(out / "dicom_seg" / name) if line.startswith("Error")]


def test_run_takes_everything_from_the_reference_environment(
    tmp_path: Path, model_dir: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "results"
    shutil.copytree(model_dir, results / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    inputs = tmp_path / "in"
    inputs.mkdir()
    phantom = make_phantom(rng, (32, 32, 32))
    (inputs / "case7_0000.nii.gz").write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("TASK_NAME", "Dataset999_Tiny")
    monkeypatch.setenv("nnUNet_input", str(inputs))
    monkeypatch.setenv("nnUNet_output", str(tmp_path / "out"))
    assert main(["run", *FAST]) == 0
    assert (tmp_path / "out" / "nifti_seg" / "case7.nii.gz").is_file()


def test_run_without_inputs_or_output_is_a_usage_error(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--model", str(model_dir), "--output", str(tmp_path)]) == 2
    assert "name INPUT... and --output DIR" in capsys.readouterr().err


def test_an_internal_error_exits_3_and_still_writes_the_report(
    tmp_path: Path, model_dir: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncflow.pipeline import intake

    def crash(self: object) -> None:
        raise RuntimeError("a bug in the book-keeping")

    monkeypatch.setattr(intake.Intake, "_take_withdrawn", crash)
    inputs = tmp_path / "in"
    inputs.mkdir()
    phantom = make_phantom(rng, (16, 16, 16))
    (inputs / "a.nii.gz").write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    out = tmp_path / "out"
    assert main(["run", str(inputs), "-o", str(out), "--model", str(model_dir), *FAST]) == 3
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "error"
    assert report["error"] == "RuntimeError: a bug in the book-keeping"
    assert report["inputs"][0]["name"] == "in/a.nii.gz"

"""What a user gets wrong, or does to the output folder, is answered clearly: exit 2 with the
reason before anything is made; a user's file in an output folder is neither read nor listed."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import phantom_backend, phantom_nifti

from asyncflow.cli import main
from asyncflow.log import configure_logging


def test_a_bad_thread_count_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "v.nii.gz").write_bytes(b"")
    argv = ["run", str(tmp_path / "v.nii.gz"), "-o", str(tmp_path / "out"), "--threads", "-3"]
    assert main(argv, backend=phantom_backend()) == 2
    assert "torch_threads must be at least 1, got -3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_input_is_named_and_no_output_folder_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", str(tmp_path / "does-not-exist.tar"), "-o", str(tmp_path / "new")]
    assert main(argv, backend=phantom_backend()) == 2
    assert "no such input: " in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_monitor_says_a_report_is_no_event_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"request_id": "x", "cases": []}, indent=2))
    assert main(["monitor", "--summary", str(report)]) == 2
    assert "no asyncflow event in its" in capsys.readouterr().err


def test_overwrite_keeps_a_users_file_out_of_the_manifest(tmp_path: Path, rng: np.random.Generator) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "v.nii.gz").write_bytes(phantom_nifti(rng, (8, 16, 16)))
    (out / "dicom_seg").mkdir(parents=True)
    (out / "dicom_seg" / "other.dcm").write_text("mine")
    argv = ["run", str(inputs), "-o", str(out), "--work-dir", str(tmp_path / "work"), "--json-logs"]
    assert main([*argv, "--overwrite"], backend=phantom_backend()) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    listed = sorted(entry["path"] for entry in manifest["outputs"])
    assert listed == ["nifti_seg/v.nii.gz", "report.json", "statistics.csv"]
    assert (out / "dicom_seg" / "other.dcm").read_text() == "mine"


def test_the_log_file_gets_libraries_warnings_too(tmp_path: Path) -> None:
    """Above a live progress line only errors show; the --log-file has every warning."""
    console, file = io.StringIO(), io.StringIO()
    configure_logging(json=True, level=logging.ERROR, stream=console, json_file=file)
    logging.getLogger("nnunetv2.inference").warning("a library's warning")
    lines = [json.loads(line) for line in file.getvalue().splitlines()]
    assert [(line["event"], line["message"]) for line in lines] == [("library.logged", "a library's warning")]
    assert console.getvalue() == ""


def test_a_bad_choice_lists_the_values_a_user_can_type(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "x", "-o", "y", "--resampling", "fast"])
    assert "(choose from 'model', 'torch', 'torch-device')" in capsys.readouterr().err


def _older_python() -> str | None:
    """A Python 3.11 older than 3.11.4 on this machine (Debian 12's /usr/bin/python3 is 3.11.2)."""
    import shutil
    import subprocess

    for name in ("python3.11", "python3"):
        found = shutil.which(name, path="/usr/bin")
        if found is None:
            continue
        version = subprocess.run(
            [
                found,
                "-c",
                "import sys; print(sys.version_info[:3] < (3, 11, 4) <= sys.version_info[:2] + (9,))",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if version.stdout.strip() == "True":
            return found
    return None


@pytest.mark.skipif(_older_python() is None, reason="no Python 3.11 older than 3.11.4 in /usr/bin")
def test_an_older_python_is_told_what_it_lacks_at_start() -> None:
    """Python 3.11.0 to 3.11.3 have no tarfile extraction filters: asyncflow says so on import,
    before any request, instead of failing on the first archive with an internal error."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    started = subprocess.run(
        [str(_older_python()), "-m", "asyncflow", "demo", "-o", "/nonexistent"],
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert started.returncode == 1
    last = started.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "ImportError: asyncflow needs Python 3.11.4 or newer (tarfile's extraction filters)"
    )

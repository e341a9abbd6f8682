"""Long requests: a run killed with SIGKILL goes on with --resume, redoing exactly what changed;
outputs reach the disk whole as each case ends; the output folder's rules."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import cli_run_argv, dciodvfy_lines, dicom_bytes, make_tar

from asyncflow.cli import main
from asyncflow.journal import JOURNAL, OutputFolder
from asyncflow.mitk import MITK_TYPE
from asyncflow.seg import read_dicom_seg
from asyncflow.settings import SettingsError, packaged_demo_model
from asyncflow.synthetic import dicom_series_datasets, make_phantom, nifti_bytes

# The CLI with the real tiny model, each prediction held DELAY seconds longer, so that a test can
# kill the run between cases.
SLOW_CLI = textwrap.dedent(
    """
    import os, sys, anyio
    import asyncflow.pipeline as pipeline
    from asyncflow.cli import main

    DELAY = float(os.environ.get("TEST_PREDICT_DELAY", "0"))
    build = pipeline.build_backends

    class Slow:
        def __init__(self, inner):
            self.inner, self.info, self.steps = inner, inner.info, inner.steps
            self.max_batch, self.needs_files, self.device = inner.max_batch, inner.needs_files, inner.device

        def load(self):
            self.inner.load()

        async def predict(self, cases):
            outcome = await self.inner.predict(cases)
            await anyio.sleep(DELAY)
            return outcome

    pipeline.build_backends = lambda settings: [Slow(b) for b in build(settings)]
    sys.exit(main(sys.argv[1:]))
    """
)
ONE_AT_A_TIME = ["--set", "unpack_workers=1", "--set", "prepare_workers=1", "--set", "export_workers=1"]


def _cli(tmp_path: Path, inputs: Path, out: Path, *extra: str, delay: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    argv = cli_run_argv(script, inputs, out)
    argv += ["--device", "cpu", "--no-mirroring", "--threads", "1", "--json-logs", *ONE_AT_A_TIME, *extra]
    env = {**os.environ, "TEST_PREDICT_DELAY": str(delay), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _series_tar(datasets: list, label_json: bytes | None = None) -> bytes:
    members = {f"DICOM/{k:03d}.dcm": dicom_bytes(ds) for k, ds in enumerate(datasets)}
    if label_json is not None:
        members["DICOM/study.mitklabel.json"] = label_json
    return make_tar(members, mode="w")


def _events(stderr: str, name: str) -> list[dict]:
    return [e for e in map(json.loads, stderr.splitlines()) if e.get("event") == name]


def _labels_of(out: Path, name: str, series: dict[str, list]) -> np.ndarray:
    if name.endswith(".nii.gz"):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "nifti_seg" / name)))
    datasets = series[name.removesuffix(".dcm")]
    numbers, _ = read_dicom_seg(
        (out / "dicom_seg" / name).read_bytes(), [str(d.SOPInstanceUID) for d in datasets]
    )
    return numbers


@pytest.mark.slow
@pytest.mark.model
def test_a_killed_run_resumes_and_redoes_exactly_what_changed(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    series = {name: dicom_series_datasets(make_phantom(rng, (24, 48, 48)), series_number=n)
              for n, name in enumerate(("a", "b", "e"), start=1)}  # fmt: skip
    (inputs / "a.tar").write_bytes(_series_tar(series["a"]))
    (inputs / "b.tar").write_bytes(_series_tar(series["b"]))
    for name in ("c", "d"):
        phantom = make_phantom(rng, (24, 48, 48))
        (inputs / f"{name}.nii.gz").write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    (inputs / "e.tar").write_bytes(_series_tar(series["e"]))
    out = tmp_path / "out"

    # Run 1, killed with SIGKILL once three cases are in the journal.
    run = _cli(tmp_path, inputs, out, delay=1.0)
    deadline = time.monotonic() + 240
    while len((out / JOURNAL).read_text().splitlines() if (out / JOURNAL).exists() else []) < 3:
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "three cases did not finish"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    finished = {json.loads(line)["report"]["output"] for line in (out / JOURNAL).read_text().splitlines()}
    assert {"a.dcm", "b.dcm", "c.nii.gz"} <= finished and len(finished) < 5, finished
    # Whatever is in the output folders is whole (a write cut short has a temporary name).
    for path in [*(out / "dicom_seg").glob("*.dcm"), *(out / "nifti_seg").glob("*.nii.gz")]:
        if not path.name.startswith(".asyncflow-partial-"):
            assert path.name in finished or path.name.removesuffix(".mitklabel.json") + ".dcm" in finished
    assert not (out / "report.json").exists()

    # Between the runs: c's source changes, and b gets a label file (its SEG's names change).
    phantom = make_phantom(rng, (24, 48, 48))
    (inputs / "c.nii.gz").write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    mitk = {"version": 3, "type": MITK_TYPE, "groups": [{"labels": [{"name": "Leber", "value": 1}]}]}
    (inputs / "b.tar").write_bytes(_series_tar(series["b"], json.dumps(mitk).encode()))

    # A used folder without --resume is refused, before any work.
    argv = ["run", str(inputs), "-o", str(out), "--model", str(packaged_demo_model())]
    assert main(argv) == 2 and "--resume goes on with it" in capsys.readouterr().err

    fast = ["--device", "cpu", "--no-mirroring", "--threads", "1", "--json-logs", *ONE_AT_A_TIME]
    code = main([*argv, *fast, "--resume"])
    stderr = capsys.readouterr().err
    assert code == 0, stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    statuses = {case["output"]: case["status"] for case in report["cases"]}
    expected_resumed = finished - {"b.dcm", "c.nii.gz"}
    assert {name for name, status in statuses.items() if status == "resumed"} == expected_resumed
    assert set(statuses) == {"a.dcm", "b.dcm", "c.nii.gz", "d.nii.gz", "e.dcm"}
    assert len(_events(stderr, "case.predicted")) == 5 - len(expected_resumed)  # nothing else predicted
    assert len(_events(stderr, "case.resumed")) == len(expected_resumed)
    assert report["status"] == "done" and not list(out.rglob(".asyncflow-partial-*"))
    b_seg = pydicom.dcmread(out / "dicom_seg" / "b.dcm")
    assert b_seg.SegmentSequence[0].SegmentLabel == "Leber"
    statistics = (out / "statistics.csv").read_text().splitlines()
    assert len(statistics) == 1 + 5 * 2  # a line per case and label, resumed cases too

    # The same checks as an uninterrupted run pass, and its outputs are the same, SEG UIDs and all.
    fresh = tmp_path / "fresh"
    assert main(["run", str(inputs), "-o", str(fresh), "--model", str(packaged_demo_model()), *fast]) == 0
    for name in statuses:
        np.testing.assert_array_equal(_labels_of(out, name, series), _labels_of(fresh, name, series))
    for name in ("a.dcm", "b.dcm", "e.dcm"):
        ours, theirs = (pydicom.dcmread(folder / "dicom_seg" / name) for folder in (out, fresh))
        assert (ours.SeriesInstanceUID, ours.SOPInstanceUID) == (
            theirs.SeriesInstanceUID,
            theirs.SOPInstanceUID,
        )
        assert ours.SOPInstanceUID.startswith("2.25.")
        if shutil.which("dciodvfy"):  # CI installs it
            assert not [line for line in dciodvfy_lines(out / "dicom_seg" / name) if line.startswith("Error")]


def test_the_output_folder_is_refused_overwritten_or_resumed_as_asked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = OutputFolder(out)
    folder.finish_case("key-1", "model-1", [("nifti_seg", "one.nii.gz", b"first")], {"output": "one.nii.gz"})
    folder.finish_case("key-2", "model-1", [("dicom_seg", "two.dcm", b"second")], {"output": "two.dcm"})
    folder.write("", "report.json", b"{}")
    (out / "notes.txt").write_text("the user's own")
    (out / "nifti_seg" / ".asyncflow-partial-0123").write_bytes(b"half")  # a write SIGKILL cut short

    with pytest.raises(SettingsError, match="is not empty"):
        OutputFolder(out)
    resumed = OutputFolder(out, resume=True)
    assert resumed.finished("key-1", "model-1")["outputs"] == [["nifti_seg", "one.nii.gz"]]
    assert resumed.finished("key-1", "model-2") is None  # another model or setting: done again
    assert not list(out.rglob(".asyncflow-partial-*"))
    # A line cut short by a kill, and an output that went missing: those cases are done again.
    with (out / JOURNAL).open("a") as journal:
        journal.write('{"journal": 1, "case": "key-3", "mod')
    (out / "dicom_seg" / "two.dcm").unlink()
    again = OutputFolder(out, resume=True)
    assert again.finished("key-2", "model-1") is None and again.finished("key-3", "model-1") is None
    assert again.finished("key-1", "model-1") is not None

    OutputFolder(out, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["notes.txt"]
    with pytest.raises(SettingsError, match="holds no asyncflow journal"):
        OutputFolder(out, resume=True)
    with pytest.raises(SettingsError, match="is a file: name a folder"):
        OutputFolder(out / "notes.txt")
    with pytest.raises(SettingsError, match="cannot be written"):
        OutputFolder(Path("/proc/asyncflow-out"))  # a folder that cannot be made: a usage error


def test_the_model_key_changes_with_the_model_and_every_result_changing_setting(tmp_path: Path) -> None:
    from asyncflow.backends import ModelInfo
    from asyncflow.journal import model_key
    from asyncflow.settings import Settings

    model = tmp_path / "model"
    shutil.copytree(packaged_demo_model(), model)
    info = ModelInfo.from_folder(model)
    base = model_key(info, Settings(model_dir=model))
    assert model_key(info, Settings(model_dir=model, unpack_workers=7, queue_size=9)) == base  # pace only
    for change in (
        {"use_mirroring": False},
        {"seg_type": "LABELMAP"},
        {"deidentify": "basic"},
        {"tile_step_size": 0.7},
    ):
        assert model_key(info, Settings(model_dir=model, **change)) != base, change
    plans = model / "plans.json"
    plans.write_text(plans.read_text() + "\n")  # another plan, same folder
    replanned = model_key(info, Settings(model_dir=model))
    assert replanned != base
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")  # other weights, same folder
    assert model_key(info, Settings(model_dir=model)) not in (base, replanned)

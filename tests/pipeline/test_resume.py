"""Long requests: a run killed with SIGKILL goes on with --resume, redoing exactly what changed;
outputs reach the disk whole as each case ends; the output folder's rules."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import textwrap
import time
from pathlib import Path

import jsonschema
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import cli_run_argv, dciodvfy_lines, dicom_bytes, make_tar, phantom_backend

from asyncflow import SettingsError, run_request
from asyncflow.artifact import Artifact
from asyncflow.cli import main
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom, nifti_bytes
from asyncflow.labels.mitk import MITK_TYPE
from asyncflow.log import configure_logging
from asyncflow.pipeline.journal import JOURNAL, OutputFolder
from asyncflow.settings import packaged_demo_model
from asyncflow.writing.seg import read_dicom_seg

# The CLI with the real tiny model, each prediction held DELAY seconds longer, so that a test can
# kill the run between cases.
SLOW_CLI = textwrap.dedent(
    """
    import os, sys, anyio
    from asyncflow import Settings, build_backends
    from asyncflow.cli import main
    from asyncflow.settings import packaged_demo_model

    DELAY = float(os.environ.get("TEST_PREDICT_DELAY", "0"))

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

    # The model _cli names, as its options run it.
    settings = Settings.from_env(
        model_dir=packaged_demo_model(), device="cpu", use_mirroring=False, torch_threads=1
    )
    sys.exit(main(sys.argv[1:], backend=[Slow(b) for b in build_backends(settings)]))
    """
)
SCHEMA = jsonschema.Draft202012Validator(
    json.loads((Path(__file__).resolve().parents[2] / "ops" / "events.schema.json").read_text())
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


def _with_member(tar: Path, name: str, text: str) -> bytes:
    """The TAR's members and one more."""
    buffer = io.BytesIO()
    with tarfile.open(tar) as source, tarfile.open(fileobj=buffer, mode="w") as copy:
        for member in source:
            copy.addfile(member, source.extractfile(member))
        info = tarfile.TarInfo(name)
        info.size = len(text.encode())
        copy.addfile(info, io.BytesIO(text.encode()))
    return buffer.getvalue()


def _cases_journaled(out: Path) -> list[dict]:
    """The journal's case lines (its first line says when the run started)."""
    lines = (out / JOURNAL).read_text().splitlines() if (out / JOURNAL).exists() else []
    return [entry for entry in map(json.loads, lines) if "case" in entry]


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
    while len(_cases_journaled(out)) < 3:
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "three cases did not finish"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    finished = {entry["report"]["output"] for entry in _cases_journaled(out)}
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
    # The finished series' files were not written again; b's came back when its label file changed it.
    extracted = {e["input_index"]: e for e in _events(stderr, "archive.extracted")}
    e_done = "e.dcm" in finished
    assert [extracted[i]["files"] for i in (0, 1, 4)] == [0, 1, 0 if e_done else 24]
    assert [extracted[i].get("files_withheld") for i in (0, 1, 4)] == [24, 24, 24 if e_done else None]
    assert [(e["input_index"], e["files"]) for e in _events(stderr, "input.restored")] == [(1, 24)]
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
    for name in ("a.dcm", "b.dcm", "e.dcm"):
        assert not [line for line in dciodvfy_lines(out / "dicom_seg" / name) if line.startswith("Error")]


def test_the_output_folder_is_refused_overwritten_or_resumed_as_asked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = OutputFolder(out)
    one = Artifact("nifti", "nifti_seg", "one.nii.gz", b"first", "nifti_seg_bytes", primary=True)
    two = Artifact("dicom_seg", "dicom_seg", "two.dcm", b"second", "dicom_seg_bytes", primary=True)
    folder.finish_case("key-1", "model-1", [one], {"output": "one.nii.gz"})
    folder.finish_case("key-2", "model-1", [two], {"output": "two.dcm"})
    folder.write("", "report.json", b"{}")
    (out / "notes.txt").write_text("the user's own")
    (out / "nifti_seg" / ".asyncflow-partial-0123").write_bytes(b"half")  # a write SIGKILL cut short

    with pytest.raises(SettingsError, match="is not empty"):
        OutputFolder(out)
    resumed = OutputFolder(out, resume=True)
    line = resumed.finished("key-1", "model-1")
    assert line["outputs"] == [["nifti_seg", "one.nii.gz"]]
    assert [Artifact.from_record(record) for record in line["artifacts"]] == [one.without_data()]
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
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [JOURNAL, "notes.txt"]
    assert OutputFolder(out, resume=True).finished("key-1", "model-1") is None  # started, nothing finished
    (out / JOURNAL).unlink()
    with pytest.raises(SettingsError, match="holds no asyncflow journal"):
        OutputFolder(out, resume=True)
    with pytest.raises(SettingsError, match="is a file: name a folder"):
        OutputFolder(out / "notes.txt")
    with pytest.raises(SettingsError, match="cannot be written"):
        OutputFolder(Path("/proc/asyncflow-out"))  # a folder that cannot be made: a usage error


def test_the_model_key_changes_with_the_model_and_every_result_changing_setting(tmp_path: Path) -> None:
    from asyncflow.backends import ModelInfo
    from asyncflow.pipeline.keys import model_key
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
        {"resampling": "torch"},
        {"resampling": "torch-device"},
    ):
        assert model_key(info, Settings(model_dir=model, **change)) != base, change
    plans = model / "plans.json"
    plans.write_text(plans.read_text() + "\n")  # another plan, same folder
    replanned = model_key(info, Settings(model_dir=model))
    assert replanned != base
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")  # other weights, same folder
    assert model_key(info, Settings(model_dir=model)) not in (base, replanned)


@pytest.mark.anyio
async def test_a_resumed_request_writes_no_file_of_a_finished_case_and_unpacks_again_what_a_redo_needs(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    """Resume with the FakeBackend: what is written, withheld and unpacked again, run by run."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    x, y = (dicom_series_datasets(make_phantom(rng, (12, 32, 32)), series_number=n) for n in (1, 2))
    z = dicom_series_datasets(make_phantom(rng, (20, 32, 32)), series_number=3)
    (inputs / "t1.tar").write_bytes(dicom_series_tar([x, y]))
    (inputs / "t2.tar").write_bytes(dicom_series_tar([z[:12]]))
    settings = fake_settings(tmp_path / "work", unpack_workers=1)

    async def run(**folder: bool) -> tuple[dict[str, str], list[dict], list[str]]:
        backend = phantom_backend()
        logs = io.StringIO()
        configure_logging(json=True, stream=logs)
        result = await run_request([inputs], settings, backend=backend, sink=OutputFolder(out, **folder))
        assert result.status == "done", result.error
        events = [json.loads(line) for line in logs.getvalue().splitlines()]
        assert not [error.message for e in events for error in SCHEMA.iter_errors(e)]  # the runbook's fields
        return {c.output: c.status for c in result.cases}, events, backend.predicted

    def by_input(events: list[dict], name: str) -> dict[int, dict]:
        return {e["input_index"]: e for e in events if e["event"] == name}

    statuses, events, predicted = await run()
    assert statuses == {"t1_S1.dcm": "done", "t1_S2.dcm": "done", "t2.dcm": "done"} and len(predicted) == 3
    assert not any("files_withheld" in e for e in events)  # a first run withholds nothing

    # Nothing changed: every case resumes, and not one of their files is written.
    statuses, events, predicted = await run(resume=True)
    assert set(statuses.values()) == {"resumed"} and not predicted
    extracted = by_input(events, "archive.extracted")
    assert [(e["files"], e["bytes"], e["files_withheld"]) for e in extracted.values()] == [
        (0, 0, 24),
        (0, 0, 12),
    ]
    assert not by_input(events, "input.restored")

    # A label file joins t1: both its series change. Their files come back in one pass over t1.
    mitk = {"version": 3, "type": MITK_TYPE, "groups": [{"labels": [{"name": "Leber", "value": 1}]}]}
    (inputs / "t1.tar").write_bytes(
        _with_member(inputs / "t1.tar", "DICOM/t1.mitklabel.json", json.dumps(mitk))
    )
    statuses, events, predicted = await run(resume=True)
    assert statuses == {"t1_S1.dcm": "done", "t1_S2.dcm": "done", "t2.dcm": "resumed"} and len(predicted) == 2
    assert by_input(events, "archive.extracted")[0]["files"] == 1  # the label file
    restored = by_input(events, "input.restored")
    assert list(restored) == [0] and restored[0]["files"] == 24
    for name in ("t1_S1.dcm", "t1_S2.dcm"):
        assert pydicom.dcmread(out / "dicom_seg" / name).SegmentSequence[0].SegmentLabel == "Leber"

    # t2's series grows in a new archive: the case an earlier run finished is withdrawn, and the
    # grown series is segmented whole, from t2's files unpacked again and t3's.
    (inputs / "t3.tar").write_bytes(dicom_series_tar([z[12:]]))
    statuses, events, predicted = await run(resume=True)
    assert (
        statuses == {"t1_S1.dcm": "resumed", "t1_S2.dcm": "resumed", "t2.dcm": "done"} and len(predicted) == 1
    )
    assert list(by_input(events, "input.restored")) == [1]
    grown = pydicom.dcmread(out / "dicom_seg" / "t2.dcm")
    referenced = {
        item.ReferencedSOPInstanceUID for item in grown.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in z}

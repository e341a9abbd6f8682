"""Faults mid-run: one case's failure stays its own, its prediction is kept when it can be, and the
request ends with every case accounted for and no temporary file left."""

from __future__ import annotations

import errno
import io
import json
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers import phantom_backend, phantom_nifti

import asyncflow.cli.main
import asyncflow.cli.progress
import asyncflow.pipeline.run
import asyncflow.writing.nifti
import asyncflow.writing.seg
from asyncflow import RequestError, run_request
from asyncflow.backends import Backend
from asyncflow.case import PreparedCase
from asyncflow.cli import main
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom
from asyncflow.log import configure_logging
from asyncflow.testing import FakeBackend
from asyncflow.writing.nifti import read_nifti_seg

pytestmark = pytest.mark.anyio


class _FailsOnCase:
    """A backend, except that predicting one case raises, as a GPU fault would."""

    def __init__(self, backend: Backend, case_id: str) -> None:
        self.backend, self.case_id, self.info, self.steps = backend, case_id, backend.info, backend.steps
        self.device = backend.device

    max_batch = 1

    def load(self) -> None:
        self.backend.load()

    needs_files = False

    async def predict(self, cases: Sequence[PreparedCase]) -> list[np.ndarray | Exception]:
        if cases[0].case.case_id == self.case_id:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return await self.backend.predict(cases)


async def test_a_prediction_error_fails_that_case_alone(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    entries = [{f"v{n}.nii.gz": phantom_nifti(rng, (24, 32, 32))} for n in range(3)]
    work = tmp_path / "work"
    result = await run_request(
        entries, fake_settings(work), backend=_FailsOnCase(phantom_backend(), "case-0002")
    )
    by_id = {c.case_id: c for c in result.cases}
    assert [(c.status, c.error_stage) for c in by_id.values()] == [
        ("done", None),
        ("failed", "predict"),
        ("done", None),
    ]
    failed = by_id["case-0002"]
    assert failed.error == "predict: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert sorted(result.nifti_seg_bytes) == sorted(c.output for c in result.cases if c.status == "done")
    assert len(result.nifti_seg_bytes) == 2 and not any(work.iterdir())


async def test_a_failed_seg_still_returns_the_prediction_as_nifti(
    tmp_path: Path, fake_settings, rng: np.random.Generator, monkeypatch
) -> None:
    def broken_seg(*args, **kwargs):
        raise ValueError("highdicom refused the source")

    monkeypatch.setattr(asyncflow.writing.seg, "dicom_seg_bytes", broken_seg)
    phantom = make_phantom(rng, (24, 32, 32))
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    result = await run_request(
        [{"study.tar": dicom_series_tar([dicom_series_datasets(phantom)])}],
        fake_settings(tmp_path / "work"),
        backend=phantom_backend(),
    )
    (case,) = result.cases
    assert (case.status, case.output) == ("done", "study.nii.gz") and result.dicom_seg_bytes == {}
    assert (
        case.outputs["fallback"]
        == "DICOM SEG failed (ValueError: highdicom refused the source); written as NIfTI"
    )
    image = read_nifti_seg(result.nifti_seg_bytes["study.nii.gz"])
    assert image.GetSize() == (32, 32, 24) and image.GetOrigin() == pytest.approx(phantom.origin, abs=1e-3)
    exported = [json.loads(line) for line in logs.getvalue().splitlines() if '"case.exported"' in line]
    assert exported[0]["format"] == "nifti" and exported[0]["fallback"].startswith("DICOM SEG failed")


async def test_disk_full_fails_the_case_with_a_clear_reason(
    tmp_path: Path, fake_settings, rng: np.random.Generator, monkeypatch
) -> None:
    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(asyncflow.writing.nifti, "nifti_seg_bytes", no_space)  # the segmentation's file
    work = tmp_path / "work"
    result = await run_request(
        [phantom_nifti(rng, (24, 32, 32))], fake_settings(work), backend=phantom_backend()
    )
    (case,) = result.cases
    assert (
        case.error
        == "export: OSError: [Errno 28] disk full while writing the case's files (No space left on device)"
    )
    assert not any(work.iterdir())


async def test_not_enough_free_disk_fails_before_any_work(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    work = tmp_path / "work"
    with pytest.raises(
        RequestError, match=r"not enough free disk space in .*: about .* GB needed \(1e\+12 x"
    ):
        await run_request(
            [phantom_nifti(rng, (24, 32, 32))],
            fake_settings(work, disk_headroom=1e12),
            backend=phantom_backend(),
        )
    assert not work.exists() or not any(work.iterdir())


async def test_a_request_larger_than_the_free_disk_runs_when_what_is_unpacked_at_once_fits(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    import shutil

    work = tmp_path / "work"
    entries = [phantom_nifti(rng, (24, 32, 32)) for _ in range(20)]
    largest = max(len(e) for e in entries)
    # One worker per stage and queues of one: at most 9 inputs are unpacked at once.
    one = {"unpack_workers": 1, "prepare_workers": 1, "export_workers": 1, "queue_size": 1}
    headroom = shutil.disk_usage(tmp_path).free / (14 * largest)  # the request needs 1.4x the free disk
    result = await run_request(
        entries, fake_settings(work, disk_headroom=headroom, **one), backend=phantom_backend()
    )
    assert result.status == "done" and len(result.nifti_seg_bytes) == 20
    with pytest.raises(
        RequestError, match=r"\(.* x the .* GB of the 9 largest inputs, as many as can be unpacked"
    ):
        await run_request(
            entries, fake_settings(work, disk_headroom=headroom * 2, **one), backend=phantom_backend()
        )


def test_ctrl_c_in_the_cli_writes_a_partial_report(tmp_path: Path, rng, monkeypatch) -> None:
    """Deterministic: every case after the first waits in the backend until the interrupt has
    been pressed (and for a second more), so no case can end between the key and the cancel."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in range(4):
        (inputs / f"v{n}.nii.gz").write_bytes(phantom_nifti(rng, (24, 32, 32)))
    pressed = threading.Event()

    def predict(case: PreparedCase) -> np.ndarray:
        if case.case.case_id != backend.predicted[0]:
            pressed.wait(timeout=60)
            time.sleep(1.0)  # the cancel reaches the request while this case is still predicting
        return np.zeros(tuple(reversed(case.geometry.size)), np.uint8)

    def interrupt(self, progress) -> None:  # the user presses Ctrl-C twice (stop now) after the first case
        if not pressed.is_set():
            try:
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
            finally:
                pressed.set()

    monkeypatch.setattr(asyncflow.cli.progress.ProgressDisplay, "__call__", interrupt)
    backend = FakeBackend(predict=predict)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["run", str(inputs), "-o", str(out), "--work-dir", str(work)]
    assert main(argv, backend=backend) == 130
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "cancelled"
    statuses = [c["status"] for c in report["cases"]]
    assert statuses.count("done") == 1 and set(statuses) <= {"done", "pending"}
    assert len(list((out / "nifti_seg").iterdir())) == 1
    assert not any(work.iterdir())
    # Every worker thread of the interrupted run stops (they are told to as the run ends): the process can exit.
    workers = [t for t in threading.enumerate() if t.name == "AnyIO worker thread" and not t.daemon]
    for worker in workers:
        worker.join(timeout=10)
    assert not [t for t in workers if t.is_alive()]

"""``asyncflow listen`` against real senders and a real PACS: Orthanc (Debian) sends a study to
the listener as a hospital PACS routes one, dcmtk's ``storescu`` and pynetdicom send as
scanners do, and the results reach a second Orthanc, queried back. A listener killed with
SIGKILL mid-series and started again loses no acknowledged instance and sends no SEG twice;
a full spool answers 0xA700 and loses nothing; SIGTERM lets the case in flight finish."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio.from_thread
import numpy as np
import pydicom
import pytest
from helpers import dicom_bytes, phantom_backend
from pacs import DICOMWEB_PLUGIN, ORTHANC, orthanc

from asyncflow.backends.plan import ModelPlan
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.listen.listener import Listener, ListenOptions
from asyncflow.settings import Settings, packaged_demo_model
from asyncflow.testing import FakeBackend, image_array

STORESCU = shutil.which("storescu")
pytestmark = pytest.mark.skipif(
    (ORTHANC is None or not DICOMWEB_PLUGIN.is_file() or STORESCU is None) and not os.environ.get("CI"),
    reason="Orthanc, orthanc-dicomweb or dcmtk (Debian) are not installed",
)
VENOUS_ONLY = '[[rule]]\nname = "venous"\nseries_description = "venous"\nnot_image_type = ["LOCALIZER"]\n'


def _series(
    rng: np.random.Generator, study: str, number: int, description: str, slices: int = 12, **more: Any
) -> list[pydicom.Dataset]:
    datasets = dicom_series_datasets(
        make_phantom(rng, (slices, 24, 24)), series_number=number, study_uid=study
    )
    for ds in datasets:
        ds.SeriesDescription = description
        for keyword, value in more.items():
            setattr(ds, keyword, value)
    return datasets


def _write(folder: Path, datasets: list[pydicom.Dataset]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{k:03d}.dcm" for k in range(len(datasets))]
    for path, ds in zip(paths, datasets, strict=True):
        path.write_bytes(dicom_bytes(ds))
    return paths


def _until(check: Callable[[], bool], what: str, timeout_s: float = 90.0) -> float:
    """Wait until ``check()``; the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def _spooled(spool: Path) -> int:
    return sum(1 for p in spool.rglob("*.dcm"))


def _c_store(port: int, datasets: list[pydicom.Dataset], calling: str = "SCANNER") -> list[int]:
    """Send ``datasets`` with pynetdicom, one association; the status of each."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title="ASYNCFLOW")
    assert association.is_established
    try:
        return [int(association.send_c_store(ds).Status) for ds in datasets]
    finally:
        association.release()


def _storescu(port: int, paths: list[Path]) -> None:
    subprocess.run(
        [
            STORESCU or "storescu",
            "-aet",
            "SCANNER",
            "-aec",
            "ASYNCFLOW",
            "127.0.0.1",
            str(port),
            *map(str, paths),
        ],
        check=True,
        capture_output=True,
    )


@contextlib.contextmanager
def _listening(settings: Settings, options: ListenOptions, backend: Any) -> Iterator[tuple[Listener, Any]]:
    """A listener in a thread of its own (its event loop a blocking portal's); interrupted (unless
    the test did) and awaited at the end."""
    with anyio.from_thread.start_blocking_portal() as portal:
        listener = portal.call(Listener, settings, options, ModelPlan.of(backend))
        ended = portal.start_task_soon(listener.run)
        portal.call(listener.listening.wait)
        try:
            yield listener, portal
        finally:
            if not listener.stopping:
                portal.call(listener.interrupt, signal.SIGTERM)
            ended.result(timeout=120)


def _journal(out: Path) -> list[dict[str, Any]]:
    lines = (out / "journal.jsonl").read_text(encoding="utf-8").splitlines()
    return [entry for entry in map(json.loads, lines) if entry.get("status") == "done"]


def test_a_pacs_routes_a_study_and_the_chosen_series_seg_reaches_the_other_pacs(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    study = pydicom.uid.generate_uid()
    series = {
        "localizer": _series(
            rng, study, 1, "Topogram", slices=2, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ),
        "arterial": _series(rng, study, 3, "Abdomen arterial"),
        "venous": _series(rng, study, 4, "Abdomen venous"),
    }
    (tmp_path / "rules.toml").write_text(VENOUS_ONLY, encoding="utf-8")
    with orthanc(tmp_path / "hospital") as hospital, orthanc(tmp_path / "results") as results:
        for datasets in series.values():
            for ds in datasets:
                hospital.call("POST", "/instances", dicom_bytes(ds))
        settings = Settings(work_dir=tmp_path / "work", send=results.dicomweb, select=tmp_path / "rules.toml")
        options = ListenOptions(
            spool=tmp_path / "spool", output=tmp_path / "out", host="127.0.0.1", port=0, quiet_s=1.0
        )
        with _listening(settings, options, phantom_backend()) as (listener, _):
            hospital.call("PUT", "/modalities/asyncflow", {"AET": "ASYNCFLOW", "Host": "127.0.0.1", "Port": listener.receiver.port})  # fmt: skip
            (study_id,) = hospital.get("/studies")
            sent = time.monotonic()
            hospital.call("POST", "/modalities/asyncflow/store", study_id)  # C-STORE of the whole study
            _until(lambda: results.received() == 1, "the SEG in the results PACS")
            latency = time.monotonic() - sent
            _until(lambda: _spooled(tmp_path / "spool") == 0, "the spool emptied")
        (seg_path,) = (tmp_path / "out" / "dicom_seg").glob("*.dcm")
        seg = pydicom.dcmread(seg_path)
        assert results.sop_instance_uids() == [seg.SOPInstanceUID]  # queried back by QIDO-RS
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series["venous"][0].SeriesInstanceUID
        assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 12
    # Every series is accounted for in the reports: the chosen one done, the others with their reason.
    reports = [
        json.loads(p.read_text(encoding="utf-8")) for p in (tmp_path / "out" / "reports").glob("*.json")
    ]
    reasons = {s["reason"] for report in reports for s in report["skipped_files"]}
    assert reasons == {
        "localizer (ImageType LOCALIZER)",
        "not selected: venous: SeriesDescription 'Abdomen arterial' does not match 'venous'",
    }
    assert [c["status"] for report in reports for c in report["cases"]] == ["done"]
    print(f"study routed by Orthanc -> SEG in the results PACS: {latency:.1f} s (quiet period 1 s)")


def test_a_listener_killed_mid_series_and_started_again_loses_no_instance_and_sends_no_seg_twice(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    from pacs import _free_port

    study = pydicom.uid.generate_uid()
    first, second = _series(rng, study, 1, "first", slices=10), _series(rng, study, 2, "second", slices=10)
    first_paths = _write(tmp_path / "first", first)
    port, spool, out, log = _free_port(), tmp_path / "spool", tmp_path / "out", tmp_path / "listen.jsonl"
    with orthanc(tmp_path / "results") as results:
        command = [
            sys.executable, "-m", "asyncflow", "listen", "-o", str(out), "--spool", str(spool), "--host", "127.0.0.1",
            "--port", str(port), "--quiet-s", "1", "--model", str(packaged_demo_model()), "--device", "cpu",
            "--no-mirroring", "--threads", "1", "--send", results.dicomweb, "--log-file", str(log), "-q",
        ]  # fmt: skip

        def start() -> subprocess.Popen[bytes]:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _until(
                lambda: log.is_file() and log.read_text().count('"listen.started"') > starts,
                "the listener up",
            )
            return process

        starts = 0
        listener = start()
        try:
            _storescu(port, first_paths)  # a scanner sends the first series
            _until(lambda: results.received() == 1, "the first series' SEG")
            # The second series: 6 instances acknowledged, then the listener is killed outright.
            assert _c_store(port, second[:6]) == [0] * 6
            listener.send_signal(signal.SIGKILL)
            listener.wait(timeout=30)
            assert _spooled(spool) == 6  # every acknowledged instance is on disk
            starts = 1
            listener = start()
            # The sender sends what was not acknowledged; a PACS retrying sends the first series again.
            assert _c_store(port, second[6:]) == [0] * 4
            _storescu(port, first_paths)
            _until(lambda: results.received() == 2, "the second series' SEG")
            _until(lambda: _spooled(spool) == 0, "the spool emptied")
            _until(lambda: log.read_text().count('"case.resumed"') == 1, "the first series again, resumed")
        finally:
            listener.send_signal(signal.SIGTERM)
            assert listener.wait(timeout=60) in (0, 128 + signal.SIGTERM)
        time.sleep(1.5)  # a duplicate would have arrived by now
        assert results.received() == 2 and len(results.sop_instance_uids()) == 2  # no SEG twice
        segs = [pydicom.dcmread(p) for p in (out / "dicom_seg").glob("*.dcm")]
        references = {
            str(s.ReferencedSeriesSequence[0].SeriesInstanceUID): len(s.ReferencedSeriesSequence[0].ReferencedInstanceSequence)
            for s in segs
        }  # fmt: skip
        assert references == {first[0].SeriesInstanceUID: 10, second[0].SeriesInstanceUID: 10}  # nothing lost


def test_a_full_spool_answers_out_of_resources_and_loses_nothing(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    study = pydicom.uid.generate_uid()
    first, second = _series(rng, study, 1, "first"), _series(rng, study, 2, "second")
    size = len(dicom_bytes(first[0]))
    gate = threading.Event()  # the pipeline is held until the second series has been refused

    def predict(case: Any) -> np.ndarray:
        gate.wait(60)
        return image_array(case) > 0

    settings = Settings(work_dir=tmp_path / "work")
    budget_gb = 18 * size / 1e9  # the first series (12 instances) and 6 of the second
    options = ListenOptions(
        spool=tmp_path / "spool",
        output=tmp_path / "out",
        host="127.0.0.1",
        port=0,
        quiet_s=0.5,
        spool_budget_gb=budget_gb,
    )
    with _listening(settings, options, FakeBackend({"liver": 1}, predict=predict)) as (listener, _):
        assert _c_store(listener.receiver.port, first) == [0] * 12
        spooled = (tmp_path / "spool").rglob("*.dcm")
        room = int((listener.spool.budget - listener.spool.used) // next(spooled).stat().st_size)
        assert 0 < room < 12
        statuses = _c_store(listener.receiver.port, second)
        assert statuses == [0] * room + [0xA700] * (12 - room)  # refused, not lost: the sender keeps them
        gate.set()  # the first series goes through and leaves the spool
        _until(lambda: len(_journal(tmp_path / "out")) == 1, "the first series done")
        time.sleep(1.0)  # the second one, lacking refused instances, is not complete
        assert len(_journal(tmp_path / "out")) == 1
        assert _c_store(listener.receiver.port, second[room:]) == [0] * (12 - room)  # room again: resent
        _until(lambda: len(_journal(tmp_path / "out")) == 2, "the second series done")
    segs = [pydicom.dcmread(p) for p in (tmp_path / "out" / "dicom_seg").glob("*.dcm")]
    assert sorted(len(s.ReferencedSeriesSequence[0].ReferencedInstanceSequence) for s in segs) == [12, 12]


def test_sigterm_lets_the_case_in_flight_finish_and_keeps_the_spool(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    study = pydicom.uid.generate_uid()
    first, second = _series(rng, study, 1, "first"), _series(rng, study, 2, "second")
    predicting = threading.Event()

    def predict(case: Any) -> np.ndarray:
        predicting.set()
        time.sleep(2.0)
        return image_array(case) > 0

    settings = Settings(work_dir=tmp_path / "work", grace_s=30)
    options = ListenOptions(
        spool=tmp_path / "spool", output=tmp_path / "out", host="127.0.0.1", port=0, quiet_s=0.5
    )
    backend = FakeBackend({"liver": 1}, predict=predict)
    with _listening(settings, options, backend) as (listener, portal):
        _c_store(listener.receiver.port, first)
        assert predicting.wait(30)
        _c_store(listener.receiver.port, second)  # arrives while the first is predicted
        portal.call(listener.interrupt, signal.SIGTERM)
    assert len(_journal(tmp_path / "out")) == 1  # the case in flight finished and was journaled
    assert _spooled(tmp_path / "spool") == 12  # the second series, kept for the next start
    with _listening(settings, options, phantom_backend()) as (listener, _):
        _until(lambda: len(_journal(tmp_path / "out")) == 2, "the second series done after the restart")
        _until(lambda: _spooled(tmp_path / "spool") == 0, "the spool emptied")


def test_a_series_is_complete_when_its_association_ends_if_asked(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    study = pydicom.uid.generate_uid()
    datasets = _series(rng, study, 1, "first")
    settings = Settings(work_dir=tmp_path / "work")
    options = ListenOptions(
        spool=tmp_path / "spool",
        output=tmp_path / "out",
        host="127.0.0.1",
        port=0,
        quiet_s=600,
        on_release=True,
    )
    with _listening(settings, options, phantom_backend()) as (listener, _):
        assert _c_store(listener.receiver.port, datasets) == [0] * 12  # one association, released
        waited = _until(lambda: len(_journal(tmp_path / "out")) == 1, "the series done", timeout_s=60)
    assert waited < 60  # not the quiet period of ten minutes
    (seg,) = (tmp_path / "out" / "dicom_seg").glob("*.dcm")
    assert len(pydicom.dcmread(seg).ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 12

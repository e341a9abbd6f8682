"""Sending each case's SEG to a real PACS (Orthanc from Debian, started by the test): STOW-RS and
C-STORE, queried back; a resumed run sends nothing twice; a PACS that refuses an object, or
stops mid-request, fails only that delivery, keeps the files, and says so in the report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from helpers import dicom_bytes, phantom_backend
from pacs import DICOMWEB_PLUGIN, ORTHANC, orthanc

from asyncflow.cli import main
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.delivery.pacs import parse_destination
from asyncflow.errors import SettingsError
from asyncflow.settings import Settings
from asyncflow.testing import FakeBackend, image_array

# CI installs Orthanc and its DICOMweb plugin (.ci/run): there, their absence fails these tests.
pytestmark = pytest.mark.skipif(
    (ORTHANC is None or not DICOMWEB_PLUGIN.is_file()) and not os.environ.get("CI"),
    reason="Orthanc and orthanc-dicomweb (Debian) are not installed",
)
FAST = ["--no-mirroring", "--threads", "1", "--device", "cpu", "--set", "send_backoff_s=0.1"]


def _inputs(folder: Path, rng: np.random.Generator, patient_ids: tuple[str, ...]) -> Path:
    """A folder per series, one series per patient."""
    for number, patient_id in enumerate(patient_ids, start=1):
        series = folder / f"series{number}"
        series.mkdir(parents=True)
        phantom = make_phantom(rng, (8, 24, 24))
        for k, ds in enumerate(dicom_series_datasets(phantom, patient_id=patient_id, series_number=number)):
            (series / f"{k:03d}.dcm").write_bytes(dicom_bytes(ds))
    return folder


def _run(inputs: Path, out: Path, *options: str, backend: Any = None) -> tuple[int, dict[str, Any]]:
    code = main(["run", str(inputs), "-o", str(out), *options, *FAST], backend=backend or phantom_backend())
    return code, json.loads((out / "report.json").read_text(encoding="utf-8"))


def _seg_uids(out: Path) -> list[str]:
    """The SOPInstanceUIDs of the DICOM objects written (SEGs, and SRs with --sr)."""
    return sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in (out / "dicom_seg").glob("*.dcm"))


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_each_case_s_seg_is_sent_as_it_ends_and_can_be_queried_back(
    tmp_path: Path, rng: np.random.Generator, protocol: str
) -> None:
    inputs = _inputs(tmp_path / "in", rng, ("P1", "P2"))
    with orthanc(tmp_path / "pacs") as pacs:
        destination = pacs.dicomweb if protocol == "dicomweb" else pacs.dimse
        code, report = _run(inputs, tmp_path / "out", "--send", destination, "--sr")
        assert code == 0 and report["status"] == "done"
        for case in report["cases"]:
            assert case["delivery"]["status"] == "sent" and case["delivery"]["tries"] == 1
            assert (
                case["delivery"]["destination"] == destination and case["delivery"]["objects"] == 2
            )  # SEG, SR
        assert len(_seg_uids(tmp_path / "out")) == 4
        assert pacs.sop_instance_uids() == _seg_uids(tmp_path / "out")  # queried back by QIDO-RS


def test_a_resumed_run_sends_nothing_twice_and_a_fresh_one_sends_again(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    inputs = _inputs(tmp_path / "in", rng, ("P1", "P2"))
    with orthanc(tmp_path / "pacs") as pacs:
        assert _run(inputs, tmp_path / "out", "--send", pacs.dicomweb)[0] == 0
        assert pacs.received() == 2
        code, report = _run(inputs, tmp_path / "out", "--send", pacs.dicomweb, "--resume")
        assert code == 0 and [c["status"] for c in report["cases"]] == ["resumed", "resumed"]
        assert [c["delivery"]["status"] for c in report["cases"]] == ["sent", "sent"]  # from the journal
        assert pacs.received() == 2
        # The count does move when objects arrive again (the same UIDs: the PACS holds one copy).
        assert _run(inputs, tmp_path / "out", "--send", pacs.dicomweb, "--overwrite")[0] == 0
        assert pacs.received() == 4 and len(pacs.sop_instance_uids()) == 2


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_pacs_that_refuses_one_object_fails_only_that_delivery(
    tmp_path: Path, rng: np.random.Generator, protocol: str
) -> None:
    inputs = _inputs(tmp_path / "in", rng, ("P1", "REFUSED"))
    with orthanc(tmp_path / "pacs", refuse_patient_id="REFUSED") as pacs:
        destination = pacs.dicomweb if protocol == "dicomweb" else pacs.dimse
        code, report = _run(inputs, tmp_path / "out", "--send", destination)
        assert code == 1 and report["status"] == "partial"
        sent, refused = report["cases"]
        assert sent["status"] == refused["status"] == "done"
        assert sent["delivery"]["status"] == "sent"
        assert refused["delivery"]["status"] == "failed" and refused["delivery"]["tries"] == 1
        assert refused["delivery"]["reason"].startswith("refused: ")
        assert len(_seg_uids(tmp_path / "out")) == 2  # both SEGs kept
        assert len(pacs.sop_instance_uids()) == 1


def test_an_orthanc_stopped_mid_request_fails_delivery_only_and_a_resume_sends_it(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    inputs = _inputs(tmp_path / "in", rng, ("P1", "P2"))
    with orthanc(tmp_path / "pacs") as pacs:
        predicted: list[str] = []

        def predict(case: Any) -> np.ndarray:
            predicted.append(case.case.case_id)
            if len(predicted) == 2:  # the second case: once the first one's SEG has arrived, the PACS stops
                deadline = time.monotonic() + 60
                while pacs.received() < 1 and time.monotonic() < deadline:
                    time.sleep(0.1)
                pacs.stop()
            return image_array(case) > 0

        backend = FakeBackend({"liver": 1}, predict=predict)
        code, report = _run(
            inputs, tmp_path / "out", "--send", pacs.dicomweb, "--set", "send_tries=2", backend=backend
        )
        assert code == 1 and report["status"] == "partial"
        deliveries = {c["case_id"]: c["delivery"] for c in report["cases"]}
        first, second = (deliveries[case] for case in predicted)
        assert first["status"] == "sent"
        assert second["status"] == "failed" and second["tries"] == 2
        assert second["reason"] == "not reached on each of 2 tries: connection refused"
        assert [c["status"] for c in report["cases"]] == ["done", "done"]
        assert len(_seg_uids(tmp_path / "out")) == 2

        pacs.start()  # back up (the same ports and storage): --resume sends what did not arrive
        code, report = _run(inputs, tmp_path / "out", "--send", pacs.dicomweb, "--resume")
        assert code == 0
        statuses = {c["case_id"]: (c["status"], c["delivery"]["status"]) for c in report["cases"]}
        assert sorted(statuses.values()) == [("done", "sent"), ("resumed", "sent")]
        assert pacs.received() == 2  # only the one that had not arrived, once more


def test_a_resume_sends_each_case_where_it_has_not_been_and_the_journal_keeps_every_destination(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    inputs = _inputs(tmp_path / "in", rng, ("P1", "P2"))
    out = tmp_path / "out"
    assert _run(inputs, out)[0] == 0  # no --send
    with orthanc(tmp_path / "a") as a, orthanc(tmp_path / "b") as b:
        code, report = _run(inputs, out, "--send", a.dicomweb, "--resume")
        assert code == 0 and [c["status"] for c in report["cases"]] == ["resumed", "resumed"]
        assert [c["delivery"]["destination"] for c in report["cases"]] == [a.dicomweb] * 2
        assert a.received() == 2 and a.sop_instance_uids() == _seg_uids(out)
        code, report = _run(inputs, out, "--send", b.dicomweb, "--resume")  # another PACS: sent there
        assert code == 0 and (a.received(), b.received()) == (2, 2)
        for case in report["cases"]:
            assert (case["delivery"]["destination"], case["delivery"]["status"]) == (b.dicomweb, "sent")
            assert [d["destination"] for d in case["deliveries"]] == [a.dicomweb, b.dicomweb]
        code, report = _run(inputs, out, "--send", a.dicomweb, "--resume")  # been there: nothing sent
        assert code == 0 and (a.received(), b.received()) == (2, 2)
        assert [c["delivery"]["destination"] for c in report["cases"]] == [a.dicomweb] * 2


def test_the_console_says_which_case_was_not_sent_and_why_in_a_few_words(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = _inputs(tmp_path / "in", rng, ("P1",))
    with orthanc(tmp_path / "pacs") as pacs:
        closed = pacs.dicomweb
    code, report = _run(inputs, tmp_path / "out", "--send", closed, "--set", "send_tries=2")
    assert code == 1 and report["cases"][0]["status"] == "done"
    assert report["cases"][0]["delivery"]["reason"] == "not reached on each of 2 tries: connection refused"
    table = capsys.readouterr().out
    (line,) = [row for row in table.splitlines() if row.startswith(report["cases"][0]["case_id"])]
    assert line.split()[2:3] == ["done"] and line.split()[4] == "NO"
    assert line.endswith("not sent: not reached on each of 2 tries: connection refused")
    assert f"0/1 sent to {closed}" in table and "HTTPConnectionPool" not in table


def test_a_dicom_case_whose_seg_failed_is_reported_as_not_delivered(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncflow.writing.seg

    def broken_seg(*args: object, **kwargs: object) -> bytes:
        raise ValueError("highdicom refused the source")

    monkeypatch.setattr(asyncflow.writing.seg, "dicom_seg_bytes", broken_seg)
    inputs = _inputs(tmp_path / "in", rng, ("P1",))
    with orthanc(tmp_path / "pacs") as pacs:
        code, report = _run(inputs, tmp_path / "out", "--send", pacs.dicomweb)
        assert pacs.received() == 0
    (case,) = report["cases"]
    assert code == 1 and report["status"] == "partial" and case["output"].endswith(".nii.gz")
    assert (case["delivery"]["status"], case["delivery"]["objects"], case["delivery"]["tries"]) == (
        "failed",
        0,
        0,
    )
    assert case["delivery"]["reason"].startswith("nothing sent: no DICOM object of the case")


def test_a_destination_is_checked_before_anything_runs() -> None:
    assert parse_destination("dimse://PACS@pacs.example.org:104").called_aet == "PACS"
    assert (
        parse_destination("dicomwebs://pacs.example.org/dicom-web").url
        == "https://pacs.example.org:443/dicom-web"
    )
    for wrong in (
        "http://pacs/dicom-web",
        "dimse://pacs.example.org:104",
        "dicomweb://",
        "dimse://A@h:notaport",
    ):
        with pytest.raises(SettingsError, match="a destination is dicomweb://host:port/path"):
            Settings(send=wrong)


def test_flame_refuses_to_send(tmp_path: Path) -> None:
    from asyncflow.flame.analysis import _input_options

    with pytest.raises(SettingsError, match="send is not available in FLAME"):
        _input_options({"send": "dicomweb://pacs:8042/dicom-web"})

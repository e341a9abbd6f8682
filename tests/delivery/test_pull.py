"""Series pulled from a real PACS (Orthanc, Debian): a study found by StudyInstanceUID over
DICOMweb (QIDO-RS, WADO-RS) and over DIMSE (C-FIND, C-GET) gives the same SEGs as the same
series in a TAR; a series the PACS lost between the query and its retrieval is lost alone,
with the reason."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pydicom
import pytest
from helpers import dicom_bytes, make_tar, phantom_backend
from pacs import DICOMWEB_PLUGIN, ORTHANC, orthanc

from asyncflow import run_request
from asyncflow.cli import main
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.delivery.query import series_of
from asyncflow.errors import RequestError
from asyncflow.settings import Settings
from asyncflow.writing.seg import read_dicom_seg

pytestmark = pytest.mark.skipif(
    (ORTHANC is None or not DICOMWEB_PLUGIN.is_file()) and not os.environ.get("CI"),
    reason="Orthanc and orthanc-dicomweb (Debian) are not installed",
)
FAST = ["--no-mirroring", "--threads", "1", "--device", "cpu"]


def _study(rng: np.random.Generator) -> list[list[pydicom.Dataset]]:
    study = pydicom.uid.generate_uid()
    return [
        dicom_series_datasets(make_phantom(rng, (10, 24, 24)), series_number=n, study_uid=study)
        for n in (1, 2)
    ]


def _segs(out: Path, series: list[list[pydicom.Dataset]]) -> dict[str, np.ndarray]:
    """Each source series' SEG, decoded on its source instances: SeriesInstanceUID -> label map."""
    found = {}
    for path in (out / "dicom_seg").glob("*.dcm"):
        seg = pydicom.dcmread(path)
        uid = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
        (datasets,) = [d for d in series if d[0].SeriesInstanceUID == uid]
        numbers, _ = read_dicom_seg(path.read_bytes(), [str(ds.SOPInstanceUID) for ds in datasets])
        found[uid] = numbers
    return found


def test_a_study_pulled_over_dicomweb_and_c_get_gives_the_segs_of_the_same_series_in_a_tar(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    series = _study(rng)
    tar = tmp_path / "study.tar"
    tar.write_bytes(
        make_tar(
            {f"s{n}/{k:03d}.dcm": dicom_bytes(ds) for n, d in enumerate(series) for k, ds in enumerate(d)}
        )
    )
    assert main(["run", str(tar), "-o", str(tmp_path / "tar"), *FAST], backend=phantom_backend()) == 0
    expected = _segs(tmp_path / "tar", series)
    assert len(expected) == 2
    with orthanc(tmp_path / "pacs") as pacs:
        for datasets in series:
            for ds in datasets:
                pacs.call("POST", "/instances", dicom_bytes(ds))
        # The PACS knows the AI node that asks (Orthanc answers C-FIND and C-GET to known modalities).
        pacs.call("PUT", "/modalities/puller", {"AET": "PULLER", "Host": "127.0.0.1", "Port": 104})
        study = series[0][0].StudyInstanceUID
        for name, source in (
            ("dicomweb", f"{pacs.dicomweb}?StudyInstanceUID={study}"),
            ("dimse", f"{pacs.dimse}?StudyInstanceUID={study}&calling_aet=PULLER"),
        ):
            code = main(["run", source, "-o", str(tmp_path / name), *FAST], backend=phantom_backend())
            assert code == 0, name
            pulled = _segs(tmp_path / name, series)
            assert pulled.keys() == expected.keys(), name
            for uid, labels in expected.items():
                assert np.array_equal(pulled[uid], labels), (name, uid)


def test_a_series_lost_between_query_and_retrieval_is_lost_alone(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    series = _study(rng)
    study = series[0][0].StudyInstanceUID
    with orthanc(tmp_path / "pacs") as pacs:
        pacs.call("PUT", "/modalities/asyncflow", {"AET": "ASYNCFLOW", "Host": "127.0.0.1", "Port": 104})
        for protocol in ("dicomweb", "dimse"):
            for datasets in series:
                for ds in datasets:
                    pacs.call("POST", "/instances", dicom_bytes(ds))
            url = pacs.dicomweb if protocol == "dicomweb" else pacs.dimse
            objects = series_of(f"{url}?StudyInstanceUID={study}", backoff_s=0.1)
            assert [o.key for o in objects] == sorted(f"{study}/{d[0].SeriesInstanceUID}" for d in series)
            (gone,) = pacs.call("POST", "/tools/find", {"Level": "Series", "Query": {"SeriesNumber": "2"}})
            pacs.call("DELETE", f"/series/{gone}", b"")  # gone from the PACS after the query
            settings = Settings(work_dir=tmp_path / "work", device="cpu")
            result = anyio.run(functools.partial(run_request, objects, settings, backend=phantom_backend()))
            report: dict[str, Any] = result.report()
            assert result.status == "partial", protocol
            assert [c["series_number"] for c in report["cases"]] == [1]
            (lost,) = [i for i in report["inputs"] if i["error"]]
            assert lost["failure"] == "object not found", protocol
            assert lost["name"].endswith(series[1][0].SeriesInstanceUID)


def test_a_query_that_names_nothing_or_reaches_no_pacs_stops_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="a whole PACS is never pulled"):
        series_of("dicomweb://127.0.0.1:1/dicom-web")
    with pytest.raises(RequestError, match="the query failed: connection refused"):
        series_of("dicomweb://127.0.0.1:1/dicom-web?PatientID=X")
    with pytest.raises(RequestError, match="the query failed"):
        series_of("dimse://PACS@127.0.0.1:1?PatientID=X")

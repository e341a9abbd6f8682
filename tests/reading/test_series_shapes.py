"""Series as real scanners export them: several orientations, repeated acquisitions, overlapping
stacks, jittered positions, and whatever else a header can hold, through assembly and prepare."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import anyio
import numpy as np
import pydicom
import pytest
from helpers import dicom_bytes, make_tar
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid

from asyncflow import RequestError, Result, run_request
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.reading import assemble
from asyncflow.reading.archives import unpack
from asyncflow.reading.assemble import CaseBuilder
from asyncflow.reading.prepare import prepare_case
from asyncflow.reading.request import InputItem
from asyncflow.reading.scan import scan
from asyncflow.settings import Settings
from asyncflow.testing import FakeBackend

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
REAL_SERIES = Path(pydicom.data.get_testdata_file("DICOMDIR")).parent  # type: ignore[arg-type]


def _series(rng: np.random.Generator, slices: int, **kwargs: object) -> list[FileDataset]:
    return dicom_series_datasets(make_phantom(rng, (slices, 16, 16)), **kwargs)  # type: ignore[arg-type]


def _same_series(*parts: list[FileDataset]) -> list[FileDataset]:
    """The datasets of ``parts`` as one series (one SeriesInstanceUID, study, frame of reference)."""
    first = parts[0][0]
    joined = []
    for ds in (ds for part in parts for ds in part):
        ds.SeriesInstanceUID = first.SeriesInstanceUID
        ds.StudyInstanceUID = first.StudyInstanceUID
        ds.FrameOfReferenceUID = first.FrameOfReferenceUID
        joined.append(ds)
    return joined


def _cases(tmp_path: Path, datasets: list[FileDataset]):
    """The cases an archive of ``datasets`` gives, and the builder (for its skipped files)."""
    tar = make_tar({f"s/{k:03d}": dicom_bytes(ds) for k, ds in enumerate(datasets)})
    builder = CaseBuilder()
    cases = builder.add(scan(unpack(InputItem(0, "study.tar", data=tar), tmp_path / "in")))
    cases += builder.finish()
    return [c for c in cases if c not in builder.withdrawn], builder


def test_a_series_in_two_orientations_is_two_volumes(tmp_path: Path, rng: np.random.Generator) -> None:
    datasets = _same_series(_series(rng, 8), _series(rng, 6, orientation=SAGITTAL))
    cases, builder = _cases(tmp_path, datasets)
    assert builder.skipped == []
    assert [(c.output_name, len(c.instances), c.source.part) for c in cases] == [
        ("study_p1", 8, "orientation 1 of 2"),
        ("study_p2", 6, "orientation 2 of 2"),
    ]
    for case in cases:
        prepared = prepare_case(case, tmp_path / case.case_id, write_files=False)
        assert prepared.geometry.size[2] == len(case.instances)


def test_a_multi_plane_localizer_is_no_volume_and_says_so(tmp_path: Path, rng: np.random.Generator) -> None:
    datasets = _same_series(
        _series(rng, 3), _series(rng, 2, orientation=SAGITTAL), _series(rng, 3, orientation=CORONAL)
    )
    cases, builder = _cases(tmp_path, datasets)
    assert cases == []
    assert len(builder.skipped) == 8
    assert {s.reason for s in builder.skipped} == {
        "not a volume (a localizer?): 3 image(s) in an orientation or size of their own, "
        "in a series of 3 orientations or sizes",
        "not a volume (a localizer?): 2 image(s) in an orientation or size of their own, "
        "in a series of 3 orientations or sizes",
    }


def test_two_acquisitions_at_the_same_positions_are_two_volumes(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    first, second = _series(rng, 6), _series(rng, 6)
    for ds in second:
        ds.AcquisitionNumber = 2
    cases, builder = _cases(tmp_path, _same_series(first, second))
    assert builder.skipped == []
    assert [(len(c.instances), c.source.part) for c in cases] == [
        (6, "volume 1 of 2 (AcquisitionNumber 1)"),
        (6, "volume 2 of 2 (AcquisitionNumber 2)"),
    ]
    prepared = prepare_case(cases[1], tmp_path / "work", write_files=False)
    assert prepared.geometry.size == (16, 16, 6)


def test_an_overlapping_stack_is_refused_with_the_reason(tmp_path: Path, rng: np.random.Generator) -> None:
    datasets = _same_series(_series(rng, 6), _series(rng, 6)[:3])  # a re-scan of three slices
    (case,), _ = _cases(tmp_path, datasets)
    reason = r"series has 9 images at 6 positions, 1 to 2 at each: an overlapping stack or a partial re-scan"
    with pytest.raises(ValueError, match=reason):
        prepare_case(case, tmp_path / "work", write_files=False)


@pytest.mark.parametrize(("jitter", "accepted"), [(0.003, True), (0.03, False)])
def test_slice_position_jitter_is_tolerated_within_one_percent_of_the_gap(
    tmp_path: Path, rng: np.random.Generator, jitter: float, accepted: bool
) -> None:
    datasets = _series(rng, 8)  # 1 mm gaps
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + (jitter / 2 if k % 2 else -jitter / 2)]
    (case,), _ = _cases(tmp_path, datasets)
    if accepted:
        assert prepare_case(case, tmp_path / "work", write_files=False).geometry.size[2] == 8
    else:
        with pytest.raises(ValueError, match="non-uniform slice spacing"):
            prepare_case(case, tmp_path / "work", write_files=False)


def test_a_surprise_inside_one_series_skips_that_series_alone(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken, fine = _series(rng, 5, series_number=1), _series(rng, 5, series_number=2)
    real_split = assemble.split_series

    def split(instances):
        if instances[0].series_number == 1:
            raise KeyError("something no header was expected to hold")
        return real_split(instances)

    monkeypatch.setattr(assemble, "split_series", split)
    cases, builder = _cases(tmp_path, broken + fine)
    assert [c.source.series_number for c in cases] == [2]
    assert len(builder.skipped) == 5
    assert {s.reason for s in builder.skipped} == {
        "series could not be assembled: KeyError: 'something no header was expected to hold'"
    }


# -- real headers, mutated ------------------------------------------------------------------


def _real_datasets() -> list[FileDataset]:
    """A real CT study (axial series and its scouts) and a real multi-plane MR localizer."""
    folders = [
        REAL_SERIES / "98892001" / "CT5N",
        REAL_SERIES / "98892001" / "CT2N",
        REAL_SERIES / "98892003" / "MR2",
    ]
    return [pydicom.dcmread(p) for folder in folders for p in sorted(folder.iterdir())]


REAL = _real_datasets()
IMAGE_TYPES = [
    ["ORIGINAL", "PRIMARY", "AXIAL"],
    ["ORIGINAL", "PRIMARY", "LOCALIZER"],
    ["DERIVED", "SECONDARY", "PROJECTION IMAGE"],
    None,
]


@st.composite
def mutated_study(draw: st.DrawFn) -> list[FileDataset]:
    datasets = [copy.deepcopy(ds) for ds in REAL]
    for _ in range(draw(st.integers(0, 6))):
        k = draw(st.integers(0, len(datasets) - 1))
        what = draw(
            st.sampled_from(
                ["drop", "copy", "rescan", "image_type", "orientation", "position", "no_position"]
            )
        )
        ds = datasets[k]
        if what == "drop" and len(datasets) > 1:
            datasets.pop(k)
        elif what == "copy":  # the same image twice
            datasets.append(copy.deepcopy(ds))
        elif what == "rescan":  # the same place again, as another image
            again = copy.deepcopy(ds)
            again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            datasets.append(again)
        elif what == "image_type":
            value = draw(st.sampled_from(IMAGE_TYPES))
            if value is None:
                ds.pop("ImageType", None)
            else:
                ds.ImageType = value
        elif what == "orientation":
            orientations = [SAGITTAL, CORONAL, (1.0, 0.0, 0.0, 0.0, 0.0, 0.0)]  # the last one is invalid
            ds.ImageOrientationPatient = list(draw(st.sampled_from(orientations)))
        elif what == "position":
            x, y, z = (float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0]))
            ds.ImagePositionPatient = [x, y, z + draw(st.floats(-5, 5, allow_nan=False))]
        elif what == "no_position":
            ds.pop("ImagePositionPatient", None)
    order = draw(st.permutations(range(len(datasets))))
    return [datasets[k] for k in order]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets=mutated_study())
def test_mutated_real_headers_account_for_every_file_once_and_never_escape(
    datasets: list[FileDataset],
) -> None:
    members = {f"export/{k:03d}": dicom_bytes(ds) for k, ds in enumerate(datasets)}
    with tempfile.TemporaryDirectory() as work:
        settings = Settings(
            work_dir=Path(work),
            use_mirroring=False,
            device="cpu",
            torch_threads=1,
            prepare_workers=2,
            export_workers=2,
        )
        ended: list[Result] = []
        try:
            anyio.run(
                lambda: run_request(
                    [make_tar(members)], settings, backend=FakeBackend(), on_finish=ended.append
                )
            )
        except RequestError as exc:  # no usable case: the only error a request may raise here
            assert "no usable case" in str(exc)
    (result,) = ended
    report = result.report()
    skipped = [s["path"] for s in report["skipped_files"]]
    assert len(skipped) == len(set(skipped))
    assert sum(c["files"] for c in report["cases"]) + len(skipped) == len(members)
    assert all(c["status"] in ("done", "failed") for c in report["cases"])
    for case in report["cases"]:
        if case["status"] == "failed":
            assert case["error_stage"] == "prepare" and case["error_type"] == "ValueError", case["error"]

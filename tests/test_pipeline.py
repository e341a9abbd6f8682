"""End to end through the real tiny nnU-Net model: archives in, SEG and NIfTI out."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from pathlib import Path

import anyio
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import dice, dicom_bytes, make_tar, phantom_backend

from asyncflow import ModelError, Progress, RequestError, Result, build_backend, run_request
from asyncflow.backends import Backend
from asyncflow.backends.nnunet_v2 import NnUNetV2Backend
from asyncflow.cli.synthetic import (
    Phantom,
    dicom_series_datasets,
    dicom_series_tar,
    make_phantom,
    nifti_bytes,
)
from asyncflow.log import configure_logging
from asyncflow.reading.archives import unpack
from asyncflow.testing import FakeBackend
from asyncflow.writing.nifti import read_nifti_seg
from asyncflow.writing.seg import read_dicom_seg

pytestmark = pytest.mark.anyio

LABELS = {"liver": 1, "tumor": 2}
MIN_DICE = {"liver": 0.9, "tumor": 0.8}
OBLIQUE = (0.866025, 0.5, 0.0, -0.5, 0.866025, 0.0)


def _expected_prediction(backend: NnUNetV2Backend, phantom: Phantom, folder: Path) -> np.ndarray:
    """The model's answer on the phantom's voxels, computed without the pipeline, from a file
    read by nnU-Net's own reader (the pipeline hands the model its input in memory)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reference_0000.nii.gz"
    path.write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    data, properties = SimpleITKIO().read_images([str(path)])
    return backend._predictor.predict_single_npy_array(data, properties, None, None, False)


def _small_volumes(rng: np.random.Generator, count: int) -> list[bytes]:
    """``count`` 32^3 phantoms as raw .nii.gz bytes entries."""
    phantoms = [make_phantom(rng, (32, 32, 32)) for _ in range(count)]
    return [nifti_bytes(p.image, p.spacing, p.origin) for p in phantoms]


def _single_series_tars(rng: np.random.Generator, count: int) -> list[dict[str, bytes]]:
    """``count`` TARs of one 16-slice 32x32 DICOM series each, as ``{name: bytes}`` entries."""
    return [
        {f"s{n}.tar": dicom_series_tar([dicom_series_datasets(make_phantom(rng, (16, 32, 32)))])}
        for n in range(count)
    ]


def _workdir_is_empty(work: Path) -> bool:
    return not any(work.iterdir())


@pytest.fixture
def request_data(rng: np.random.Generator):
    """Two TARs holding three DICOM series (one oblique) and a NIfTI under an S3-style key."""
    phantoms = {
        "a1": make_phantom(rng, (48, 64, 64)),
        "b1": make_phantom(rng, (40, 64, 64), spacing=(0.9, 0.9, 1.5)),
        "b2": make_phantom(rng, (64, 56, 64)),
        "n1": make_phantom(rng, (56, 64, 64), origin=(5.0, 6.0, 7.0)),
    }
    series = {
        "a1": dicom_series_datasets(phantoms["a1"], series_number=1),
        "b1": dicom_series_datasets(phantoms["b1"], series_number=1, orientation=OBLIQUE),
        "b2": dicom_series_datasets(phantoms["b2"], series_number=2),
    }
    entries = [
        {"project/site-a/Doe_John.tar.gz": dicom_series_tar([series["a1"]])},
        dicom_series_tar([series["b1"], series["b2"]], compression=""),
        {"project/site-a/volumes/liver_scan.nii.gz": nifti_bytes(phantoms["n1"].image, (1, 1, 1), (5, 6, 7))},
    ]
    expected_names = {
        "Doe_John.dcm": "a1",
        "input-1_S1.dcm": "b1",
        "input-1_S2.dcm": "b2",
        "liver_scan.nii.gz": "n1",
    }
    return entries, phantoms, series, expected_names


async def test_a_request_of_archives_and_nifti_is_segmented_exactly(
    tmp_path: Path, settings_factory, loaded_backend: Backend, request_data
) -> None:
    entries, phantoms, series, expected_names = request_data
    work = tmp_path / "work"
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    progress: list[Progress] = []
    result = await run_request(
        entries, settings_factory(work), backend=loaded_backend, on_progress=progress.append
    )

    # Every case accounted for, under the expected unique names.
    assert result.status == "done"
    assert [c.status for c in result.cases] == ["done"] * 4
    assert {c.output for c in result.cases} == set(expected_names)
    assert set(result.dicom_seg_bytes) | set(result.nifti_seg_bytes) == set(expected_names)
    assert all(set(c.stage_s) == {"prepare", "predict", "export"} for c in result.cases)
    contract = result.as_dict()
    assert contract["status"] == "done" and contract["dicom_seg_bytes"] is result.dicom_seg_bytes
    json.dumps(contract["report"])  # the report is JSON as it stands

    for name, key in expected_names.items():
        phantom = phantoms[key]
        expected = _expected_prediction(loaded_backend, phantom, tmp_path / "ref" / key)
        if name.endswith(".dcm"):
            uids = [str(ds.SOPInstanceUID) for ds in series[key]]
            numbers, segment_names = read_dicom_seg(result.dicom_seg_bytes[name], uids)
            decoded = np.zeros_like(numbers)
            for number, label in segment_names.items():
                decoded[numbers == number] = LABELS[label]
            # A reversed slice order would not match: the phantoms are asymmetric along z.
            assert dice(phantom.labels[::-1] == 1, phantom.labels == 1) < 0.8
        else:
            image = read_nifti_seg(result.nifti_seg_bytes[name])
            assert image.GetOrigin() == pytest.approx((5.0, 6.0, 7.0))
            decoded = sitk.GetArrayFromImage(image)
        # Geometry-exact: the output equals the model's prediction voxel for voxel ...
        np.testing.assert_array_equal(decoded, expected, err_msg=name)
        # ... and the model is right about the phantom.
        # (The tumour is small: a few boundary voxels move its Dice by hundredths.)
        for label, minimum in MIN_DICE.items():
            assert dice(decoded == LABELS[label], phantom.labels == LABELS[label]) >= minimum, (name, label)
        assert dice(decoded > 0, phantom.labels > 0) >= 0.95, name

    assert _workdir_is_empty(work)
    assert progress[-1] == Progress(done=4, failed=0, total=4, known=4, inputs_read=3, inputs=3)
    assert [p.done for p in progress] == sorted(p.done for p in progress)

    # Logs: JSON lines with the request id, cases by opaque id, no patient data or input names.
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    assert {line["request_id"] for line in lines} == {result.request_id}
    events = [line["event"] for line in lines]
    assert events[0] == "request.started" and events[-1] == "request.finished"
    assert events.count("case.finished") == 4 and events.count("request.finished") == 1
    # nnU-Net's preprocessing ran in the prepare stage, its resampling back in export: the
    # prediction worker held each case for the network (and a thread hop) only.
    by_event = {e: [line for line in lines if line["event"] == e] for e in set(events)}
    assert all(p["preprocess_s"] > 0 and p["model_input_bytes"] > 0 for p in by_event["case.prepared"])
    assert all(0 < p["network_s"] <= p["duration_s"] for p in by_event["case.predicted"])
    assert all(p["to_labels_s"] > 0 for p in by_event["case.exported"])
    assert {line["case_id"] for line in lines if line["event"].startswith("case.")} == {
        c.case_id for c in result.cases
    }
    text = logs.getvalue()
    for secret in ("Demo^Synthetic", "SYNTH-0001", "19700101", "Doe", "John", "liver_scan", "site-a"):
        assert secret not in text


async def test_one_bad_case_fails_alone_with_a_reason(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    good = make_phantom(rng, (32, 32, 32))
    flat = sitk.GetImageFromArray(np.zeros((8, 8), np.int16))
    flat_path = tmp_path / "flat.nii.gz"
    sitk.WriteImage(flat, str(flat_path))
    entries = [
        {"good.nii.gz": nifti_bytes(good.image, good.spacing, good.origin)},
        {"flat.nii.gz": flat_path.read_bytes()},
        {"broken.tar.gz": make_tar({"a": rng.bytes(50_000)})[:20_000]},
    ]
    work = tmp_path / "work"
    result = await run_request(entries, fake_settings(work), backend=phantom_backend())
    assert result.status == "partial"
    by_output = {c.origin.name: c for c in result.cases}
    assert by_output["good.nii.gz"].status == "done"
    assert by_output["flat.nii.gz"].status == "failed"
    assert (
        by_output["flat.nii.gz"].error == "prepare: ValueError: NIfTI channel 0 is 2D; a 3D volume is needed"
    )
    assert list(result.nifti_seg_bytes) == ["good.nii.gz"]
    broken = next(i for i in result.inputs if i["name"] == "broken.tar.gz")
    assert broken["error"]
    assert _workdir_is_empty(work)


async def test_a_request_without_any_usable_case_raises(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    series = dicom_series_datasets(make_phantom(rng, (1, 8, 8)))
    work = tmp_path / "work"
    with pytest.raises(RequestError, match=r"no usable case in the request: 2 input\(s\)"):
        await run_request(
            [b"plain text", dicom_bytes(series[0])], fake_settings(work), backend=phantom_backend()
        )
    assert _workdir_is_empty(work)


class _LoadWaits:
    """A backend behind a ``load`` that waits for the test (a large model loading)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.release = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def load(self) -> None:
        self.release.wait(60)


async def test_no_usable_case_ends_the_request_with_its_report_before_the_model_has_loaded(
    tmp_path: Path, fake_settings
) -> None:
    backend = _LoadWaits(phantom_backend())
    ended: list[Result] = []
    started = time.perf_counter()
    try:
        with pytest.raises(RequestError, match="no usable case"):
            await run_request(
                [b"plain text"], fake_settings(tmp_path), backend=backend, on_finish=ended.append
            )
    finally:
        backend.release.set()
    assert time.perf_counter() - started < 20  # the model's load would have held it for 60 s
    (result,) = ended
    assert result.status == "error" and result.error.startswith("RequestError: no usable case")
    assert [(s.path, s.reason) for s in result.skipped] == [("input-0", "neither DICOM nor NIfTI")]


async def test_cancellation_removes_every_temporary_file(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    """Deterministic: every case after the first waits in the backend until the request has been
    cancelled, so no other case can end between the cancel and its delivery."""
    entries = _small_volumes(rng, 4)
    work = tmp_path / "work"
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    cancelled = threading.Event()

    def predict(case):
        if case.case.case_id != backend.predicted[0]:
            cancelled.wait(timeout=60)
        return np.zeros(tuple(reversed(case.geometry.size)), np.uint8)

    backend = FakeBackend(predict=predict)

    def cancel(_: Progress) -> None:
        scope.cancel()
        cancelled.set()

    with anyio.CancelScope() as scope:
        await run_request(entries, fake_settings(work), backend=backend, on_progress=cancel)
    assert scope.cancelled_caught
    assert _workdir_is_empty(work)
    finished = json.loads(logs.getvalue().splitlines()[-1])
    assert (finished["event"], finished["status"], finished["cases_done"]) == (
        "request.finished",
        "cancelled",
        1,
    )


async def test_a_model_that_cannot_load_fails_the_request_cleanly(
    tmp_path: Path, settings_factory, model_dir: Path, rng: np.random.Generator
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    (broken / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    phantom = make_phantom(rng, (16, 16, 16))
    work = tmp_path / "work"
    with pytest.raises(ModelError, match="could not load the model"):
        await run_request(
            [nifti_bytes(phantom.image, phantom.spacing, phantom.origin)],
            settings_factory(work, model_dir=broken),
        )
    assert _workdir_is_empty(work)


class _CountingBackend:
    """A backend, watched: how many predictions run at once."""

    max_batch = 1
    needs_files = False

    def __init__(self, inner: Backend) -> None:
        self.info = inner.info
        self.steps = inner.steps
        self.device = inner.device
        self._inner = inner
        self.running = 0
        self.most_at_once = 0
        self.calls = 0

    def load(self) -> None:
        self._inner.load()

    async def predict(self, cases):
        self.running += 1
        self.calls += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            return await self._inner.predict(cases)
        finally:
            self.running -= 1


async def test_exactly_one_prediction_runs_at_a_time(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    entries = _small_volumes(rng, 6)
    counting = _CountingBackend(phantom_backend(delay_s=0.05))
    settings = fake_settings(tmp_path / "work", prepare_workers=4, export_workers=4, queue_size=4)
    result = await run_request(entries, settings, backend=counting)
    assert result.status == "done"
    assert (counting.calls, counting.most_at_once) == (6, 1)


async def test_one_prediction_worker_per_device_each_one_case_at_a_time(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    entries = _small_volumes(rng, 6)
    settings = fake_settings(tmp_path / "work", devices=("cpu", "cpu"), queue_size=4)
    # two predictors, as two GPUs would hold
    workers = [_CountingBackend(phantom_backend(delay_s=0.05)) for _ in range(2)]
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    result = await run_request(entries, settings, backend=workers)
    assert result.status == "done"
    events = [json.loads(line) for line in logs.getvalue().splitlines()]
    assert sorted(e["worker"] for e in events if e["event"] == "model.loaded") == [0, 1]
    predicted_by = [e["worker"] for e in events if e["event"] == "case.predicted"]
    assert len(predicted_by) == 6 and set(predicted_by) == {0, 1}  # both devices worked
    assert [(w.calls, w.most_at_once) for w in workers] == [
        (predicted_by.count(0), 1),
        (predicted_by.count(1), 1),
    ]


async def test_dicom_cases_start_before_the_last_archive_is_unpacked(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    tars = _single_series_tars(rng, 4)
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    settings = fake_settings(tmp_path / "work", unpack_workers=1, queue_size=1)
    result = await run_request(tars, settings, backend=phantom_backend())
    assert result.status == "done" and len(result.dicom_seg_bytes) == 4
    events = [json.loads(line)["event"] for line in logs.getvalue().splitlines()]
    extracted = [k for k, e in enumerate(events) if e == "archive.extracted"]
    assert events.index("case.assembled") < extracted[-1]  # the first series went on before the last TAR


async def test_a_series_split_over_archives_is_segmented_whole_once(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    split, other = make_phantom(rng, (24, 32, 32)), make_phantom(rng, (16, 32, 32))
    split_series = dicom_series_datasets(split, series_number=1)
    first = dicom_series_tar([split_series[:12]])
    second = dicom_series_tar([split_series[12:], dicom_series_datasets(other, series_number=2)])
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    work = tmp_path / "work"
    entries = [{"part1.tar": first}, {"part2.tar": second}]
    result = await run_request(entries, fake_settings(work, unpack_workers=1), backend=phantom_backend())

    assert result.status == "done"
    assert sorted(c.output for c in result.cases) == ["part1.dcm", "part2.dcm"]
    events = [json.loads(line) for line in logs.getvalue().splitlines()]
    (withdrawn,) = [e["case_id"] for e in events if e["event"] == "case.withdrawn"]
    assert withdrawn not in {c.case_id for c in result.cases}  # the half series' case left no trace
    # The SEG covers all 24 slices, and the model's liver is the phantom's on every one of them.
    uids = [str(ds.SOPInstanceUID) for ds in split_series]
    numbers, names = read_dicom_seg(result.dicom_seg_bytes["part1.dcm"], uids)
    liver = {v: k for k, v in names.items()}["liver"]
    assert numbers.shape[0] == 24 and dice(numbers == liver, split.labels == 1) > MIN_DICE["liver"]
    assert sorted(result.label_json_bytes) == ["part1.mitklabel.json", "part2.mitklabel.json"]
    assert _workdir_is_empty(work)


async def test_no_other_input_is_unpacked_beside_the_first(
    tmp_path: Path, fake_settings, rng: np.random.Generator, monkeypatch
) -> None:
    import time

    import asyncflow.pipeline.intake

    spans: dict[int, tuple[float, float]] = {}

    def timed_unpack(item, dest, limits, withhold):
        started = time.perf_counter()
        try:
            return unpack(item, dest, limits, withhold)
        finally:
            spans[item.index] = (started, time.perf_counter())

    monkeypatch.setattr(asyncflow.pipeline.intake, "unpack", timed_unpack)
    tars = _single_series_tars(rng, 4)
    settings = fake_settings(tmp_path / "work", unpack_workers=3)
    result = await run_request(tars, settings, backend=phantom_backend())
    assert result.status == "done" and sorted(spans) == [0, 1, 2, 3]
    assert all(spans[i][0] >= spans[0][1] for i in (1, 2, 3))  # the first input had the cores alone


def _unpacked_files(work: Path) -> list[Path]:
    return [p for p in work.glob("asyncflow-*/inputs/**/*") if p.is_file()]


async def test_unpacked_files_are_deleted_as_their_cases_end(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    tars = _single_series_tars(rng, 4)
    work = tmp_path / "work"
    on_disk: list[int] = []  # unpacked files left each time a case ends
    settings = fake_settings(work, unpack_workers=1, queue_size=1)
    result = await run_request(
        tars,
        settings,
        backend=phantom_backend(),
        on_progress=lambda _: on_disk.append(len(_unpacked_files(work))),
    )
    assert result.status == "done" and len(result.dicom_seg_bytes) == 4
    assert len(on_disk) == 4 and on_disk[-1] == 0  # gone when their cases ended, not at the request's end
    assert max(on_disk) < 4 * 16  # never the whole request at once


async def test_a_series_that_grows_after_its_first_case_ended_is_unpacked_again(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    split = make_phantom(rng, (24, 32, 32))
    split_series = dicom_series_datasets(split, series_number=1)
    # With one worker per stage and queues of one, at most 9 inputs are in flight: the 12 volumes
    # between the halves let the first half's case end (and its files go) before part2 arrives.
    entries: list[object] = [{"part1.tar": dicom_series_tar([split_series[:12]])}]
    entries += _small_volumes(rng, 12)
    entries.append({"part2.tar": dicom_series_tar([split_series[12:]])})
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    work = tmp_path / "work"
    settings = fake_settings(work, unpack_workers=1, prepare_workers=1, export_workers=1, queue_size=1)
    result = await run_request(entries, settings, backend=phantom_backend())

    assert result.status == "done" and len(result.cases) == 13
    events = [json.loads(line) for line in logs.getvalue().splitlines()]
    (restored,) = [e for e in events if e["event"] == "input.restored"]
    assert (restored["input_index"], restored["files"]) == (0, 12)
    uids = [str(ds.SOPInstanceUID) for ds in split_series]
    numbers, names = read_dicom_seg(result.dicom_seg_bytes["part1.dcm"], uids)
    liver = {v: k for k, v in names.items()}["liver"]
    assert numbers.shape[0] == 24 and dice(numbers == liver, split.labels == 1) > MIN_DICE["liver"]
    assert _workdir_is_empty(work)


async def test_cuda_without_a_gpu_is_a_model_error(tmp_path: Path, settings_factory) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    backend = build_backend(settings_factory(tmp_path, device="cuda"))
    with pytest.raises(ModelError, match="torch sees no CUDA device"):
        backend.load()

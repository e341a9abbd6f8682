"""The memory budget: nnU-Net's CPU steps are admitted by an estimate that bounds what they
allocate, and a request never holds more cases in them than the budget allows."""

from __future__ import annotations

import gc
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import anyio
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from asyncflow import run_request
from asyncflow.backends.base import ModelInfo
from asyncflow.backends.nnunet_v2 import Logits, ModelInput, NnUNetV2Steps
from asyncflow.case import Case, Geometry, PreparedCase
from asyncflow.cli.synthetic import make_phantom, nifti_bytes, replanned_model
from asyncflow.enums import SourceKind
from asyncflow.log import configure_logging
from asyncflow.pipeline.budget import MemoryBudget


def _case(image: sitk.Image, folder: Path) -> PreparedCase:
    case = Case("case-0001", SourceKind.NIFTI, "c", "c.nii.gz", [])
    return PreparedCase(case, folder, [image], Geometry.of(image), [], [])


def _logits(steps: NnUNetV2Steps, shape: tuple[int, ...], properties: dict) -> Logits:
    classes = steps.label_manager.num_segmentation_heads
    array = np.random.default_rng(1).normal(size=(classes, *shape)).astype(np.float16)
    return Logits(array, properties, 0.0)


@pytest.fixture(scope="module")
def ct_steps(tmp_path_factory: pytest.TempPathFactory) -> NnUNetV2Steps:
    """nnU-Net's steps for a model planned as CT models are (1.0 x 0.8 x 0.8 mm), run once on a
    small volume so that what nnU-Net imports and caches on first use is not measured."""
    folder = tmp_path_factory.mktemp("model")
    steps = NnUNetV2Steps(ModelInfo.from_folder(replanned_model(folder / "ct", [1.0, 0.8, 0.8])))
    image = sitk.GetImageFromArray(np.ones((8, 16, 16), np.int16))
    image.SetSpacing((0.8, 0.8, 3.0))
    prepared = _case(image, folder)
    model_input = steps.preprocess(prepared)
    steps.to_labels(prepared, _logits(steps, model_input.data.shape[1:], model_input.properties))
    return steps


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [
        ((40, 96, 96), (0.8, 0.8, 1.0)),  # the model's own spacing: no resampling
        ((40, 96, 96), (0.8, 0.8, 2.0)),  # z resampled with the volume
        ((24, 128, 112), (0.7, 0.7, 5.0)),  # thick slices: nnU-Net resamples z separately
        ((60, 80, 80), (0.95, 0.95, 0.6)),  # finer than the model
    ],
)
def test_the_estimate_bounds_what_nnunet_allocates(
    ct_steps: NnUNetV2Steps, tmp_path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> None:
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, shape).astype(np.int16))
    image.SetSpacing(spacing)
    prepared = _case(image, tmp_path)
    estimate = ct_steps.memory_bytes(prepared)
    tracemalloc.start()
    try:
        model_input = ct_steps.preprocess(prepared)
        preprocess_peak = tracemalloc.get_traced_memory()[1]
        prepared.images = []
        logits = _logits(ct_steps, model_input.data.shape[1:], model_input.properties)
        del model_input
        gc.collect()
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        labels = ct_steps.to_labels(prepared, logits)
        to_labels_peak = tracemalloc.get_traced_memory()[1] - before + logits.array.nbytes
    finally:
        tracemalloc.stop()
    assert labels.shape == shape
    measured = max(preprocess_peak, to_labels_peak) + image.GetNumberOfPixels() * 2
    # Never below what nnU-Net allocates; not so far above that the budget idles.
    assert measured <= estimate <= 2.5 * measured, (estimate, preprocess_peak, to_labels_peak)


def _traced(step: Callable[..., object], *args: object) -> tuple[object, int]:
    """``step(*args)`` and the most it allocated at once beyond what it was given (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        return step(*args), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Two geometries for the models made of several configurations: resampled with the volume, and
# thick slices (nnU-Net resamples z separately).
SEVERAL_GEOMETRIES = [((40, 96, 96), (0.8, 0.8, 2.0)), ((24, 128, 112), (0.7, 0.7, 5.0))]


def _ct_image(size: tuple[int, ...], spacing: tuple[float, ...]) -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, size).astype(np.int16))
    image.SetSpacing(spacing)
    return image


@pytest.mark.parametrize(("shape", "spacing"), SEVERAL_GEOMETRIES)
def test_the_estimate_bounds_what_a_cascade_allocates(
    model_dir: Path, tmp_path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> None:
    """From the first stage's preprocessing to the second stage's label map, as the pipeline holds
    a case: its channels until the step between the stages, each stage's model input and logits
    while predicted (the logits made outside the measure, as the network makes them), the first
    stage's label map made into the second's input."""
    from nnunet_models import PREFIX, make_results

    from asyncflow.backends.cascade import CascadeInput, CascadeSteps, PreviousStage

    results = make_results(tmp_path, model_dir)
    first, second = (
        NnUNetV2Steps(ModelInfo.from_folder(results / f"{PREFIX}{c}"))
        for c in ("3d_lowres", "3d_cascade_fullres")
    )
    steps = CascadeSteps(first, second)
    for size in ((8, 16, 16), shape):  # the first: nnU-Net's first-use caches, not measured
        image = _ct_image(size, spacing)
        prepared = _case(image, tmp_path)
        estimate = steps.memory_bytes(prepared)
        staged, preprocess = _traced(steps.preprocess, prepared)
        assert isinstance(staged, CascadeInput)
        prepared.images = []
        model_input = staged.model_input
        logits = _logits(first, model_input.data.shape[1:], model_input.properties)
        first_held = model_input.nbytes + logits.array.nbytes
        previous = PreviousStage(logits, staged.images, steps, 0.0)
        del staged, model_input, logits
        second_input, between = _traced(previous.next_input, prepared)
        assert isinstance(second_input, CascadeInput)
        del previous
        logits = _logits(second, second_input.model_input.data.shape[1:], second_input.model_input.properties)
        second_held = second_input.nbytes + logits.array.nbytes
        del second_input
        labels, to_labels = _traced(steps.to_labels, prepared, logits)
    assert labels.shape == shape
    peaks = (preprocess, first_held, between, second_held, to_labels + logits.array.nbytes)
    measured = max(peaks) + image.GetNumberOfPixels() * 2  # the channels: SimpleITK's, not traced
    assert measured <= estimate <= 2.5 * measured, (estimate, peaks)


@pytest.mark.parametrize(("shape", "spacing"), SEVERAL_GEOMETRIES)
def test_the_estimate_bounds_what_an_ensemble_allocates(
    model_dir: Path, tmp_path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> None:
    """Two configurations (1 and 1.6 mm), as the pipeline holds a case: both model inputs, then
    both logits beside them while predicted (made outside the measure, as the network makes
    them), then their average's way back."""
    from nnunet_models import PREFIX, make_results

    from asyncflow.backends.ensemble import EnsembleInput, EnsembleLogits, EnsembleSteps

    results = make_results(tmp_path, model_dir)
    members = [
        NnUNetV2Steps(ModelInfo.from_folder(results / f"{PREFIX}{c}")) for c in ("3d_fullres", "3d_lowres")
    ]
    steps = EnsembleSteps(members)
    for size in ((8, 16, 16), shape):  # the first: nnU-Net's first-use caches, not measured
        image = _ct_image(size, spacing)
        prepared = _case(image, tmp_path)
        estimate = steps.memory_bytes(prepared)
        inputs, preprocess = _traced(steps.preprocess, prepared)
        assert isinstance(inputs, EnsembleInput)
        prepared.images = []
        outputs = [
            _logits(m, i.data.shape[1:], i.properties) for m, i in zip(members, inputs.inputs, strict=True)
        ]
        logits = sum(o.array.nbytes for o in outputs)
        held = inputs.nbytes + logits
        del inputs
        labels, to_labels = _traced(steps.to_labels, prepared, EnsembleLogits(outputs, 0.0))
    assert labels.shape == shape
    peaks = (preprocess, held, to_labels + logits)
    measured = max(peaks) + image.GetNumberOfPixels() * 2  # the channels: SimpleITK's, not traced
    assert measured <= estimate <= 2.5 * measured, (estimate, peaks)


@pytest.mark.parametrize(("shape", "spacing"), SEVERAL_GEOMETRIES)
def test_the_estimate_bounds_what_several_models_allocate(
    model_dir: Path, tmp_path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> None:
    """Two models (1 and 1.6 mm), as the pipeline holds a case: each model's preprocessing, both
    model inputs and logits while predicted, each label map made while the next model's logits
    wait. The estimate takes the phases' largest, below the two models' estimates added."""
    from nnunet_models import PREFIX, make_results

    from asyncflow.backends.models import ModelsInput, ModelsOutput, ModelsSteps

    results = make_results(tmp_path, model_dir)
    each = [
        NnUNetV2Steps(ModelInfo.from_folder(results / f"{PREFIX}{c}")) for c in ("3d_fullres", "3d_lowres")
    ]
    steps = ModelsSteps(each, None)
    for size in ((8, 16, 16), shape):  # the first: nnU-Net's first-use caches, not measured
        image = _ct_image(size, spacing)
        prepared = _case(image, tmp_path)
        estimate = steps.memory_bytes(prepared)
        added = sum(s.memory_bytes(prepared) for s in each) + 2 * image.GetNumberOfPixels() * 3
        inputs, preprocess = _traced(steps.preprocess, prepared)
        assert isinstance(inputs, ModelsInput)
        prepared.images = []
        outputs = [
            _logits(m, i.data.shape[1:], i.properties) for m, i in zip(each, inputs.inputs, strict=True)
        ]
        logits = sum(o.array.nbytes for o in outputs)
        held = inputs.nbytes + logits
        del inputs
        labels, back = _traced(steps.each_labels, prepared, ModelsOutput(outputs, 0.0))
    assert [m.shape for m in labels] == [shape, shape]
    peaks = (preprocess, held, back + logits)
    measured = max(peaks) + image.GetNumberOfPixels() * 2  # the channels: SimpleITK's, not traced
    assert measured <= estimate <= 2.5 * measured, (estimate, peaks)
    assert estimate < added


def _rss(field: str) -> int:
    """This process's ``VmRSS`` or ``VmHWM`` (its peak since the last reset), in bytes."""
    status = Path("/proc/self/status").read_text(encoding="utf-8")
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) * 1024  # type: ignore[union-attr]


def _torch_peaks(folder: Path, shape: tuple[int, ...], spacing: tuple[float, ...]) -> dict[str, int]:
    """The estimate and the rise of the peak RSS over each step with torch resampling (in a
    process whose allocator returns every large block when it is freed, so none is reused)."""
    steps = NnUNetV2Steps(ModelInfo.from_folder(replanned_model(folder / "ct", [1.0, 0.8, 0.8])), "torch")
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, shape).astype(np.int16))
    image.SetSpacing(spacing)
    prepared = _case(image, folder)

    def peak_of(step: Callable[[], object]) -> tuple[object, int]:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")  # VmHWM := VmRSS
        before = _rss("VmRSS")
        value = step()
        return value, _rss("VmHWM") - before

    model_input, preprocess = peak_of(lambda: steps.preprocess(prepared))
    assert isinstance(model_input, ModelInput)
    prepared.images = []
    logits = _logits(steps, model_input.data.shape[1:], model_input.properties)
    logits.array = torch.from_numpy(logits.array)
    del model_input
    labels, to_labels = peak_of(lambda: steps.to_labels(prepared, logits))
    assert isinstance(labels, np.ndarray) and labels.shape == tuple(shape)
    return {
        "estimate": steps.memory_bytes(_case(image, folder)),
        "preprocess": preprocess,
        "to_labels": to_labels + logits.nbytes,
        "image": image.GetNumberOfPixels() * 2,
    }


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [
        ((40, 160, 160), (0.8, 0.8, 2.0)),  # z resampled with the volume
        ((24, 192, 176), (0.7, 0.7, 5.0)),  # thick slices: z on its own, nearest slice
        ((60, 128, 128), (0.95, 0.95, 0.6)),  # finer than the model
    ],
)
def test_the_estimate_bounds_what_torch_resampling_holds(
    tmp_path: Path, shape: tuple[int, ...], spacing: tuple[float, ...]
) -> None:
    """torch allocates outside Python's allocator, where tracemalloc sees nothing: measured as
    the rise of a fresh process's peak RSS over each step."""
    code = (
        "import json, os, sys; sys.path[:0] = sys.argv[1].split(os.pathsep); import test_memory as t; "
        "print(json.dumps(t._torch_peaks(t.Path(sys.argv[2]), *json.loads(sys.argv[3]))))"
    )
    argv = [
        sys.executable,
        "-c",
        code,
        os.pathsep.join(str(folder) for folder in (Path(__file__).parent, Path(__file__).parents[1])),
        str(tmp_path),
        json.dumps([shape, spacing]),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.splitlines()[-1])
    measured = max(peaks["preprocess"], peaks["to_labels"]) + peaks["image"]
    assert measured <= peaks["estimate"] <= 2.5 * measured, peaks


@pytest.mark.anyio
async def test_the_budget_admits_what_fits_and_clamps_what_cannot() -> None:
    budget = MemoryBudget(100)
    assert await budget.admit("a", 60) == 60
    with pytest.raises(ValueError, match="already"):
        await budget.admit("a", 1)
    admitted: list[str] = []

    async def wait_for(key: str, nbytes: int) -> None:
        await budget.admit(key, nbytes)
        admitted.append(key)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for, "b", 50)  # 60 + 50 > 100: waits for "a"
        await anyio.wait_all_tasks_blocked()
        assert admitted == [] and budget.used == 60
        budget.release("a")
    assert admitted == ["b"] and budget.used == 50
    budget.release("b")
    budget.release("unknown")  # holds nothing: nothing happens
    assert await budget.admit("huge", 10**12) == 100  # larger than the budget: alone, not never
    assert budget.used == 100


@pytest.mark.anyio
async def test_a_small_budget_lets_one_case_at_a_time_into_nnunet(
    tmp_path: Path, settings_factory, rng: np.random.Generator
) -> None:
    phantoms = [make_phantom(rng, (24, 40, 40), spacing=(0.8, 0.8, 1.5)) for _ in range(3)]
    entries = [{f"v{n}.nii.gz": nifti_bytes(p.image, p.spacing, p.origin)} for n, p in enumerate(phantoms)]
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    settings = settings_factory(tmp_path / "work", memory_budget_gb=1e-9, prepare_workers=3, queue_size=3)
    result = await run_request(entries, settings)
    assert result.status == "done"
    events = [json.loads(line) for line in logs.getvalue().splitlines()]
    assert next(e for e in events if e["event"] == "request.started")["memory_budget_bytes"] == 1

    def at(event: dict) -> float:
        return datetime.fromisoformat(event["timestamp"]).timestamp()

    prepared = sorted((e for e in events if e["event"] == "case.prepared"), key=at)
    finished = {e["case_id"]: at(e) for e in events if e["event"] == "case.finished"}
    assert [e["memory_reserved_bytes"] for e in prepared] == [1, 1, 1]
    assert any(e["memory_wait_s"] > 0 for e in prepared)
    # Each case's preprocessing starts only once the case before it has ended.
    for earlier, later in itertools.pairwise(prepared):
        assert finished[earlier["case_id"]] <= at(later) - later["preprocess_s"] + 1e-3

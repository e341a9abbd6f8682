"""The ``resampling`` setting: nnU-Net's own resampling one class at a time, voxel for voxel,
and nnU-Net's torch resampling, measured against it.

The reference is nnU-Net's own code: ``run_case_npy`` and
``convert_predicted_logits_to_segmentation_with_correct_shape`` with the plans' own
configuration (``model``), or with the configuration nnU-Net's
``nnUNetPlannerResEncL_torchres_sepz`` writes (``torch``). The logits are random, and in one variant whole numbers, so that classes tie
and argmax's tie-breaking is tested too.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from helpers import dicom_bytes, make_tar
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from asyncflow.backends.base import ModelInfo
from asyncflow.backends.nnunet_v2 import Logits, NnUNetV2Steps
from asyncflow.backends.resampling import TORCH_KWARGS
from asyncflow.case import Case, Geometry, PreparedCase
from asyncflow.cli import main
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom, nifti_bytes, replanned_model
from asyncflow.enums import SourceKind
from asyncflow.writing.seg import read_dicom_seg

GEOMETRIES = [
    ((40, 48, 48), (0.8, 0.8, 1.0)),  # the model's own spacing: nothing resampled
    ((30, 56, 48), (0.8, 0.8, 2.0)),  # z resampled with the volume
    ((16, 64, 56), (0.7, 0.7, 5.0)),  # thick slices: z resampled on its own ("separate z")
    ((40, 40, 40), (0.95, 0.95, 0.6)),  # finer than the model
    ((24, 40, 36), (3.0, 0.8, 0.8)),  # the coarse axis is x
]


@pytest.fixture(scope="module", params=[3, 5], ids=["3-classes", "5-classes"])
def ct_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    """The tiny model's plans at CT spacing (1.0 x 0.8 x 0.8 mm), with 3 or 5 classes."""
    folder = replanned_model(tmp_path_factory.mktemp("model") / "ct", [1.0, 0.8, 0.8])
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, **{f"label{c}": c for c in range(1, request.param)}}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return ModelInfo.from_folder(folder)


def _case(shape: tuple[int, ...], spacing: tuple[float, ...], folder: Path) -> PreparedCase:
    array = np.random.default_rng(0).normal(0, 100, shape).astype(np.int16)
    array[:, :4] = 0  # a border nnU-Net crops away
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    case = Case("case-0001", SourceKind.NIFTI, "c", "c.nii.gz", [])
    return PreparedCase(case, folder, [image], Geometry.of(image), [], [])


def _logits(classes: int, shape: tuple[int, ...], ties: bool) -> torch.Tensor:
    rng = np.random.default_rng(1)
    values = rng.integers(-1, 2, (classes, *shape)) if ties else rng.normal(size=(classes, *shape))
    return torch.from_numpy(values.astype(np.float16))


def _nnunet(
    steps: NnUNetV2Steps,
    configuration: ConfigurationManager,
    prepared: PreparedCase,
    classes: int,
    ties: bool,
):
    """nnU-Net's model input and label map for the case under ``configuration``."""
    data, properties = steps._read(prepared)
    preprocessor = configuration.preprocessor_class(verbose=False)
    model_input, _, properties = preprocessor.run_case_npy(
        data, None, properties, steps.plans_manager, configuration, steps.dataset_json
    )
    logits = _logits(classes, model_input.shape[1:], ties)
    labels = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, steps.plans_manager, configuration, steps.label_manager, properties, num_threads_torch=1
    )
    return model_input, logits, labels


def _torchres(configuration: dict) -> dict:
    """``configuration`` as nnU-Net's nnUNetPlannerResEncL_torchres_sepz would have planned it."""
    configuration = copy.deepcopy(configuration)
    for key, is_seg in (("data", False), ("seg", True), ("probabilities", False)):
        configuration[f"resampling_fn_{key}"] = "resample_torch_fornnunet"
        configuration[f"resampling_fn_{key}_kwargs"] = {"is_seg": is_seg, **TORCH_KWARGS}
    return configuration


@pytest.mark.parametrize(("shape", "spacing"), GEOMETRIES)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_model_resampling_is_nnunets_own_voxel_for_voxel(
    ct_model: ModelInfo, tmp_path: Path, shape: tuple[int, ...], spacing: tuple[float, ...], ties: bool
) -> None:
    steps = NnUNetV2Steps(ct_model)
    classes = steps.label_manager.num_segmentation_heads
    prepared = _case(shape, spacing, tmp_path)
    planned = steps.plans_manager.get_configuration(ct_model.configuration)
    expected_input, logits, expected = _nnunet(steps, planned, prepared, classes, ties)

    model_input = steps.preprocess(prepared)
    assert model_input.data.dtype == np.float32
    np.testing.assert_array_equal(model_input.data, expected_input)
    labels = steps.to_labels(prepared, Logits(logits, model_input.properties, 0.0))
    assert labels.shape == shape and labels.dtype == expected.dtype
    assert len(np.unique(labels)) == classes  # every class wins somewhere: the test can fail
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize(("shape", "spacing"), GEOMETRIES)
def test_torch_resampling_is_nnunets_torchres_planning(
    ct_model: ModelInfo, tmp_path: Path, shape: tuple[int, ...], spacing: tuple[float, ...]
) -> None:
    steps = NnUNetV2Steps(ct_model, "torch")
    classes = steps.label_manager.num_segmentation_heads
    prepared = _case(shape, spacing, tmp_path)
    torchres = ConfigurationManager(_torchres(steps.configuration_manager.configuration))
    expected_input, logits, expected = _nnunet(steps, torchres, prepared, classes, ties=False)
    # A model planned so (a *_torchres plans file) gives the same with resampling "model".
    folder = shutil.copytree(ct_model.folder, tmp_path / "torchres")
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"] = _torchres(plans["configurations"]["3d_fullres"])
    (folder / "plans.json").write_text(json.dumps(plans))

    for mode_steps in (steps, NnUNetV2Steps(ModelInfo.from_folder(folder))):
        model_input = mode_steps.preprocess(prepared)
        np.testing.assert_array_equal(model_input.data, expected_input)
        labels = mode_steps.to_labels(prepared, Logits(logits, model_input.properties, 0.0))
        np.testing.assert_array_equal(labels, expected)
    # What the prediction worker does with torch-device: the same labels, made on its device.
    cropped = steps.cropped_labels(logits, model_input.properties, torch.device("cpu"))
    box = model_input.properties["bbox_used_for_cropping"]
    np.testing.assert_array_equal(cropped, expected[tuple(slice(a, b) for a, b in box)])
    if shape != (40, 48, 48):  # resampled: the torch functions give another answer than scipy's
        planned = steps.plans_manager.get_configuration(ct_model.configuration)
        assert not np.array_equal(_nnunet(steps, planned, prepared, classes, ties=False)[0], expected_input)


@pytest.mark.parametrize(
    ("shape", "spacing", "new_spacing"),
    [
        ((16, 64, 56), (5.0, 0.7, 0.7), (1.0, 0.8, 0.8)),  # thick slices to the model: picked
        ((60, 40, 48), (1.0, 0.8, 0.8), (3.0, 0.9, 0.9)),  # fewer, coarser slices: picked
        ((30, 56, 48), (2.0, 0.8, 0.8), (1.0, 0.8, 0.8)),  # resampled with the volume
        ((24, 40, 36), (0.8, 0.8, 3.0), (0.8, 0.8, 1.0)),  # the coarse axis is x
    ],
)
def test_a_cascade_segmentation_is_resampled_as_nnunet_does(
    shape: tuple[int, ...], spacing: tuple[float, ...], new_spacing: tuple[float, ...]
) -> None:
    """The previous stage's label map (float32, -1 outside the non-zero mask) to the second
    stage's grid: nnU-Net's resample_data_or_seg_to_shape with the plans' segmentation arguments,
    voxel for voxel, with thick slices picked before they are resized."""
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape,
        resample_data_or_seg_to_shape,
    )

    from asyncflow.backends.slices import scipy_by_channel

    kwargs = {"is_seg": True, "order": 1, "order_z": 0}  # what nnU-Net's planners write
    rng = np.random.default_rng(7)
    seg = rng.integers(-1, 3, size=(1, *shape)).astype(np.float32)
    seg[:, : shape[0] // 2] = np.where(rng.random(seg[:, : shape[0] // 2].shape) < 0.9, 1, 2)  # regions
    new_shape = compute_new_shape(shape, spacing, new_spacing)
    expected = resample_data_or_seg_to_shape(seg, new_shape, spacing, new_spacing, **kwargs)
    got = scipy_by_channel(seg, new_shape, spacing, new_spacing, kwargs=kwargs)
    assert got.dtype == expected.dtype and set(np.unique(got)) == {-1, 0, 1, 2}
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("axis", [0, 2])
@pytest.mark.parametrize(("count", "new_count"), [(300, 60), (97, 23), (41, 40), (23, 97), (50, 50)])
@pytest.mark.parametrize(("plane", "new_plane"), [(64, 80), (19, 23)], ids=["plane-64", "plane-19"])
@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "numpy"])
def test_torch_resampling_picks_the_slices_it_keeps_first(
    axis: int,
    count: int,
    new_count: int,
    plane: int,
    new_plane: int,
    as_tensor: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The way back from a 1 mm model to thick slices: resample_torch_fornnunet resizes every
    model slice in plane and keeps a few; asyncflow picks those first. The same tensor on planes
    of 64 (and CT's 512); on some small planes torch's CPU kernel rounds the planes at the end of
    a batch differently, by float32 rounding, and the argmax is the same."""
    from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet

    from asyncflow.backends import resampling, slices

    shape = [count if a == axis else plane for a in range(3)]
    new_shape = [new_count if a == axis else new_plane for a in range(3)]
    model_spacing, source_spacing = [1.0] * 3, [5.0 if a == axis else 0.8 for a in range(3)]
    values = np.random.default_rng(count).standard_normal((3, *shape)).astype(np.float16)
    data = torch.from_numpy(values) if as_tensor else values
    # The same thread count as asyncflow's (torch's chunks of work decide some float roundings).
    kwargs = {"is_seg": False, **TORCH_KWARGS, "num_threads": torch.get_num_threads()}
    expected = np.asarray(resample_torch_fornnunet(data, new_shape, model_spacing, source_spacing, **kwargs))

    resized: list[int] = []

    def recording(data, *args, **kw):  # what asyncflow hands to nnU-Net's function
        resized.append(data.shape[axis + 1])
        return resample_torch_fornnunet(data, *args, **kw)

    monkeypatch.setattr(slices, "resample_torch_fornnunet", recording)
    got = resampling._torch({"is_seg": False, **TORCH_KWARGS})(data, new_shape, model_spacing, source_spacing)
    assert resized == [min(count, new_count)]  # only the slices kept were resized
    assert isinstance(got, torch.Tensor) == as_tensor
    got = np.asarray(got)
    if plane == 64:
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=0, atol=8 * np.finfo(np.float32).eps)
        np.testing.assert_array_equal(got.argmax(0), expected.argmax(0))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


@pytest.mark.slow
def test_torch_agrees_with_model_on_the_tiny_model(
    tmp_path: Path, model_dir: Path, rng: np.random.Generator
) -> None:
    """The real network on CT-like geometry (0.9 mm pixels and 2 mm slices, 0.7 mm and 5 mm,
    against a model planned at 1.0 x 0.8 x 0.8 mm), through ``asyncflow run --resampling``:
    per label Dice of ``torch`` against ``model`` at least 0.95, at most 0.5 % of the voxels
    differ (measured: Dice 0.98-0.998, 0.02-0.07 %); ``torch-device`` gives ``torch``'s voxels.
    The report and each SEG's AlgorithmParameters say which resampling made them."""
    model = replanned_model(tmp_path / "ct", [1.0, 0.8, 0.8])
    inputs = tmp_path / "in"
    inputs.mkdir()
    thin = make_phantom(rng, (30, 72, 72), spacing=(0.9, 0.9, 2.0))
    (inputs / "thin.nii.gz").write_bytes(nifti_bytes(thin.image, thin.spacing, thin.origin))
    thick = dicom_series_datasets(make_phantom(rng, (12, 72, 72), spacing=(0.7, 0.7, 5.0)))
    (inputs / "thick.tar").write_bytes(
        make_tar({f"s/{k}.dcm": dicom_bytes(ds) for k, ds in enumerate(thick)})
    )
    uids = [str(ds.SOPInstanceUID) for ds in thick]
    labels: dict[str, dict[str, np.ndarray]] = {}
    for mode in ("model", "torch", "torch-device"):
        out = tmp_path / mode
        argv = ["run", str(inputs), "-o", str(out), "--model", str(model), "--resampling", mode]
        assert main([*argv, "--no-mirroring", "--threads", "1", "--device", "cpu"]) == 0
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        assert report["model"]["parameters"]["resampling"] == mode
        (seg_path,) = (out / "dicom_seg").glob("*.dcm")
        seg = pydicom.dcmread(seg_path)
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert f"resampling={mode}" in algorithm.AlgorithmParameters
        numbers, names = read_dicom_seg(seg_path.read_bytes(), uids)
        from_seg = np.zeros_like(numbers)
        for number, name in names.items():
            from_seg[numbers == number] = {"liver": 1, "tumor": 2}[name]
        nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "nifti_seg" / "thin.nii.gz")))
        labels[mode] = {"thin": nifti, "thick": from_seg}
    for name, expected in labels["model"].items():
        got = labels["torch"][name]
        np.testing.assert_array_equal(labels["torch-device"][name], got)
        for label in (1, 2):
            assert (expected == label).sum() > 100, (name, label)  # the phantoms hold both labels
            assert _dice(got == label, expected == label) >= 0.95, (name, label)
        assert 0 < (got != expected).mean() <= 0.005, name  # another answer, but close

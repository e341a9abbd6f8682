from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from asyncflow import ModelError, SettingsError, build_backend
from asyncflow.backends import ModelInfo
from asyncflow.settings import Settings


def test_packaged_model_is_small_safe_to_load_and_described(model_dir: Path) -> None:
    checkpoint = model_dir / "fold_0" / "checkpoint_final.pth"
    assert checkpoint.stat().st_size < 1_000_000
    loaded = torch.load(checkpoint, weights_only=True)  # no pickled code inside
    assert loaded["trainer_name"] == "nnUNetTrainer"
    info = ModelInfo.from_folder(model_dir)
    assert info.folds == (0,)
    assert info.num_channels == 1
    assert {v: label.name for v, label in info.labels.items()} == {1: "liver", 2: "tumor"}
    assert info.labels[1].type.value == "10200004"  # SNOMED CT Liver
    assert info.name == "Dataset999_AsyncflowTiny" and info.configuration == "3d_fullres"


def test_model_folder_errors_are_clear(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"no readable dataset\.json"):
        ModelInfo.from_folder(tmp_path)
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    with pytest.raises(ModelError, match=r"no checkpoint_final.pth for fold\(s\) \[3\]"):
        ModelInfo.from_folder(copy, folds=[3])
    shutil.rmtree(copy / "fold_0")
    with pytest.raises(ModelError, match="for fold"):
        ModelInfo.from_folder(copy)


def test_settings_from_the_reference_environment(tmp_path: Path, model_dir: Path) -> None:
    model = tmp_path / "results" / "Dataset029_LiTS" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(model_dir, model)
    env = {
        "nnUNet_results": str(tmp_path / "results"),
        "TASK_NAME": "dataset029_lits",  # task folders resolve case-insensitively
        "MULTI_MODAL": "True",
        "nnUNet_input": "/in",
        "nnUNet_output": "/out",
    }
    settings = Settings.from_env(env, device="cpu", folds=None)
    assert settings.multi_modal and settings.device == "cpu"
    assert settings.input_dir == Path("/in") and settings.output_dir == Path("/out")
    assert settings.model_source().locate() == ("v2", model)


def test_settings_refuse_impossible_values_and_missing_models(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no model given"):
        Settings.from_env({}).model_source().locate()
    with pytest.raises(SettingsError, match=r"as an nnU-Net v2 model folder \(dataset.json, plans.json"):
        Settings(model_dir=tmp_path).model_source().locate()
    with pytest.raises(SettingsError, match="backend must be one of auto, v1, v2"):
        Settings(backend="v3")
    with pytest.raises(SettingsError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu1'"):
        Settings.from_env({}, devices="cuda:0,gpu1")
    assert Settings.from_env({}, devices="cuda:0, cuda:1").devices == ("cuda:0", "cuda:1")
    with pytest.raises(SettingsError, match="queue_size must be at least 1"):
        Settings(queue_size=0)
    with pytest.raises(SettingsError, match="tile_step_size"):
        Settings(tile_step_size=1.5)
    with pytest.raises(
        SettingsError, match="resampling must be one of model, torch, torch-device, got 'cubic'"
    ):
        Settings.from_env({}, resampling="cubic")


def test_plain_values_from_flame_kwargs_become_typed_settings(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"MULTI_MODAL": "False"},
        model_dir=str(tmp_path),
        folds="0, 1,all",
        multi_modal="true",
        work_dir=tmp_path / "w",
    )
    assert settings.model_dir == tmp_path and settings.work_dir == tmp_path / "w"
    assert settings.folds == (0, 1, "all")
    assert settings.multi_modal is True
    assert Settings.from_env({}, folds=["2", 3]).folds == (2, 3)
    with pytest.raises(SettingsError, match=r"unknown setting\(s\) modeldir; known: .*model_dir"):
        Settings.from_env({}, modeldir=str(tmp_path))


def test_seg_options_are_checked_when_set() -> None:
    assert Settings.from_env({}, seg_type="labelmap", seg_compression="rle").seg_type == "LABELMAP"
    with pytest.raises(SettingsError, match="BINARY SEG is written uncompressed"):
        Settings(seg_compression="jpeg2000")
    with pytest.raises(SettingsError, match="seg_type must be one of BINARY, FRACTIONAL, LABELMAP"):
        Settings(seg_type="BITMAP")


def test_models_loading_at_once_leave_stdout_to_the_caller(
    tmp_path: Path, settings_factory, capfd: pytest.CaptureFixture[str]
) -> None:
    """nnU-Net prints while it loads; stdout is the caller's, and swapping it in one thread
    swaps it for all (two overlapping loads used to leave sys.stdout on a StringIO)."""
    before = sys.stdout
    backends = [build_backend(settings_factory(tmp_path)) for _ in range(2)]
    threads = [threading.Thread(target=backend.load) for backend in backends]
    for thread in threads:
        thread.start()
    seen = set()
    while any(thread.is_alive() for thread in threads):  # what every other thread sees meanwhile
        seen.add(id(sys.stdout))
        time.sleep(0.001)  # sampled, not spun: a spinning loop holds the GIL the loads need
    for thread in threads:
        thread.join()
    assert seen <= {id(before)} and sys.stdout is before
    assert capfd.readouterr().out == ""
    assert all(backend.device == "cpu" for backend in backends)
    assert torch.backends.cudnn.benchmark is False


def test_the_public_face_is_importable_from_the_package() -> None:
    import asyncflow
    from asyncflow import errors, result, settings
    from asyncflow.pipeline import run as pipeline

    assert asyncflow.run_request is pipeline.run_request and asyncflow.Result is result.Result
    assert asyncflow.Settings is settings.Settings and asyncflow.RequestError is errors.RequestError
    # The errors users catch are one class each, wherever they are imported from.
    from asyncflow import ModelError as BackendModelError
    from asyncflow import RequestError as InputsRequestError

    assert BackendModelError is asyncflow.ModelError and InputsRequestError is asyncflow.RequestError
    assert set(asyncflow.__all__) >= {
        "run_request",
        "run_request_sync",
        "Settings",
        "Result",
        "RequestError",
        "ModelError",
    }
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        asyncflow.nothing  # noqa: B018

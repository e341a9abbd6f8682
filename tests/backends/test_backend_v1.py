"""nnU-Net v1 through the stock ``nnUNet_predict``: batches of cases per process, failures isolated,
v1's traps handled. The end-to-end tests run the real command on the tiny v1 model on the CPU."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import dice

from asyncflow import ModelError, SettingsError, build_backend, run_request
from asyncflow.backends import ModelInfo
from asyncflow.backends.nnunet_v1 import NnUNetV1Backend, _read_prediction
from asyncflow.case import Geometry
from asyncflow.cli import main
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom, nifti_bytes
from asyncflow.log import configure_logging
from asyncflow.settings import Settings
from asyncflow.writing.seg import read_dicom_seg

pytestmark = pytest.mark.anyio

RESULTS = Path(__file__).resolve().parents[2] / "asyncflow" / "models" / "tiny_v1"
TASK = "Task998_AsyncflowTiny"
MODEL = RESULTS / "nnUNet" / "3d_fullres" / TASK / "nnUNetTrainerV2__nnUNetPlansv2.1"
NNUNET_PREDICT = shutil.which("nnUNet_predict") or str(Path(sys.executable).with_name("nnUNet_predict"))
needs_v1 = pytest.mark.skipif(
    not Path(NNUNET_PREDICT).is_file() and not os.environ.get("CI"),
    reason="nnU-Net v1 not installed (pip install -e '.[v1]'); CI installs it",
)


def _v1_settings(work: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "backend": "v1",
        "results_folder": RESULTS,
        "task_name": TASK,
        "work_dir": work,
        "use_mirroring": False,
        "torch_threads": 1,
        "device": "cpu",
        "v1_preprocess_threads": 1,
        "v1_export_threads": 1,
        "unpack_workers": 2,
        "prepare_workers": 2,
        "export_workers": 2,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def _events(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _wrapper(folder: Path, body: str) -> str:
    """A stand-in command: a shell script with ``body``, given nnUNet_predict's arguments."""
    path = folder / "fake_predict"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# -- model folder and settings ------------------------------------------------------------


def test_the_v1_model_is_found_by_task_name_in_any_case_or_by_id(tmp_path: Path) -> None:
    results = tmp_path / "results"
    renamed = results / "nnUNet" / "3d_fullres" / "Task998_ASYNCFLOWTINY"  # as the reference image had it
    shutil.copytree(MODEL.parent, renamed)
    for task in ("Task998_AsyncflowTiny", "task998_asyncflowtiny", "998"):
        env = {"RESULTS_FOLDER": str(results), "TASK_NAME": task}
        location = Settings.from_env(env).model_source().locate()  # backend "auto": told apart by plans.pkl
        assert location == ("v1", renamed / "nnUNetTrainerV2__nnUNetPlansv2.1")
    assert [p.name for p in (results / "nnUNet" / "3d_fullres").iterdir()] == ["Task998_ASYNCFLOWTINY"]
    info = build_backend(Settings.from_env(env, device="cpu")).info
    assert (info.generation, info.name, info.folds, info.checkpoint) == (
        "v1",
        "Task998_ASYNCFLOWTINY",  # passed to nnUNet_predict -t as it is on disk: nothing is renamed
        (0,),
        "model_final_checkpoint",
    )
    with pytest.raises(SettingsError, match=r"as an nnU-Net v2 model folder .*; or .* as an nnU-Net v1"):
        Settings.from_env(
            {"RESULTS_FOLDER": str(results), "TASK_NAME": "Task997_Other"}
        ).model_source().locate()
    with pytest.raises(ModelError, match="resampling 'torch' needs an nnU-Net v2 model"):
        build_backend(Settings.from_env(env, device="cpu", resampling="torch"))


def test_v1_model_facts_come_from_plans_pkl_and_an_optional_dataset_json(tmp_path: Path) -> None:
    info = ModelInfo.from_v1_folder(MODEL)
    assert (info.num_channels, info.configuration, info.trainer, info.plans) == (
        1,
        "3d_fullres",
        "nnUNetTrainerV2",
        "nnUNetPlansv2.1",
    )
    assert {v: label.name for v, label in info.labels.items()} == {1: "liver", 2: "tumor"}
    assert info.framework.startswith("nnunet ")

    bare = tmp_path / "nnUNet" / "3d_fullres" / TASK / MODEL.name
    shutil.copytree(MODEL, bare)
    (bare / "dataset.json").unlink()  # as in a model folder straight from v1 training
    assert {v: label.name for v, label in ModelInfo.from_v1_folder(bare).labels.items()} == {
        1: "label 1",
        2: "label 2",
    }
    with pytest.raises(ModelError, match=r"no model_final_checkpoint.model\(.pkl\) for fold\(s\) \[3\]"):
        ModelInfo.from_v1_folder(bare, folds=[3])
    with pytest.raises(ModelError, match="is not where nnUNet_predict looks"):
        ModelInfo.from_v1_folder(tmp_path)

    # plans.pkl is read as plain data: a pickle that would call anything else is refused.
    (bare / "plans.pkl").write_bytes(pickle.dumps({"num_modalities": os.getpid, "all_classes": [1]}))
    with pytest.raises(ModelError, match=r"refers to posix\.getpid, which is not plain data"):
        ModelInfo.from_v1_folder(bare)


def test_a_v1_run_gets_the_environment_real_v1_models_need(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")  # torch refuses both at once
    backend = build_backend(_v1_settings(tmp_path, use_mirroring=False, tile_step_size=0.75))
    assert isinstance(backend, NnUNetV1Backend)
    backend.load()
    env = backend.environment()
    assert env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    # RESULTS_FOLDER is a writable overlay of the model: its files as links, its fold folders real.
    overlay = Path(env["RESULTS_FOLDER"]) / backend.info.folder.relative_to(RESULTS)
    assert (overlay / "plans.pkl").resolve() == (backend.info.folder / "plans.pkl").resolve()
    fold = overlay / "fold_0"
    assert fold.is_dir() and not fold.is_symlink() and os.access(fold, os.W_OK)
    assert (fold / "model_final_checkpoint.model").is_symlink()
    assert env["OMP_NUM_THREADS"] == "1"
    command = backend.arguments(tmp_path / "in", tmp_path / "out", cases=3)
    assert command[0].endswith("nnUNet_predict")
    assert "--disable_tta" in command and "--all_in_gpu" not in command  # True fails without a GPU
    assert command[command.index("-t") + 1] == TASK
    assert command[command.index("--step_size") + 1] == "0.75"


def test_integer_label_maps_of_any_width_are_read_and_others_refused(tmp_path: Path) -> None:
    geometry = Geometry.of(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)))
    labels = np.zeros((4, 5, 6), np.uint16)  # FLAME's image patches v1 to write uint16
    labels[1, 2, 3] = 2
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "b0000.nii.gz"))
    read = _read_prediction(tmp_path, 0, geometry, [])
    assert isinstance(read, np.ndarray) and read.dtype == np.uint16 and read[1, 2, 3] == 2
    sitk.WriteImage(sitk.GetImageFromArray(labels.astype(np.float32)), str(tmp_path / "b0001.nii.gz"))
    assert "an integer label map is needed" in str(_read_prediction(tmp_path, 1, geometry, []))
    sitk.WriteImage(sitk.GetImageFromArray(labels[:2]), str(tmp_path / "b0002.nii.gz"))
    assert "map for a (4, 5, 6) input" in str(_read_prediction(tmp_path, 2, geometry, []))


# -- the real nnUNet_predict ----------------------------------------------------------------


@needs_v1
@pytest.mark.slow
def test_a_multi_tar_request_runs_in_fewer_v1_processes_than_cases(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    # The tiny v1 model was trained on 64^3 volumes and is only reliable near that size.
    phantoms = [make_phantom(rng, (48, 64, 64)) for _ in range(5)]
    series = {
        f"study{k}_S{n + 1}.dcm": dicom_series_datasets(phantoms[2 * k + n], series_number=n + 1)
        for k in range(2)
        for n in range(2)
    }
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(2):
        tar = dicom_series_tar([series[f"study{k}_S1.dcm"], series[f"study{k}_S2.dcm"]])
        (inputs / f"study{k}.tar").write_bytes(tar)
    (inputs / "volume.nii.gz").write_bytes(
        nifti_bytes(phantoms[4].image, phantoms[4].spacing, phantoms[4].origin)
    )
    # An all-zero volume: v1's cropping finds no non-zero voxel, prints an error, skips the case
    # and still exits 0. That case fails alone, with v1's reason; its batch goes on.
    blank = np.zeros((24, 32, 32), np.int16)
    (inputs / "blank.nii.gz").write_bytes(nifti_bytes(blank, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["run", str(inputs), "-o", str(out), "--work-dir", str(work), "--json-logs"]
    argv += ["--backend", "v1", "--results-folder", str(RESULTS), "--task", "task998_asyncflowtiny"]
    argv += ["--device", "cpu", "--no-mirroring", "--threads", "1", "--set", "v1_preprocess_threads=1"]
    assert main(argv) == 1  # partial: the blank volume

    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    runs = [e for e in events if e["event"] == "nnunet_v1.finished"]
    assert 1 <= len(runs) < 6 and sum(r["cases"] for r in runs) == 6
    assert all(r["returncode"] == 0 for r in runs)
    report = {
        c["origin"].rpartition("/")[2]: c for c in json.loads((out / "report.json").read_text())["cases"]
    }
    assert report["blank.nii.gz"]["error"] == (
        "predict: RuntimeError: nnUNet_predict wrote no prediction for the case: "
        "zero-size array to reduction operation minimum which has no identity"
    )
    assert [c["status"] for name, c in sorted(report.items()) if name != "blank.nii.gz"] == ["done"] * 3
    assert sorted(p.name for p in (out / "dicom_seg").glob("*.dcm")) == sorted(series)
    assert [p.name for p in (out / "nifti_seg").iterdir()] == ["volume.nii.gz"]
    # The network really segmented each volume, onto the right slices: its liver matches the phantom's.
    liver_dice = {}
    for (name, datasets), phantom in zip(series.items(), phantoms, strict=False):
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        numbers, names = read_dicom_seg((out / "dicom_seg" / name).read_bytes(), uids)
        liver = {v: k for k, v in names.items()}["liver"]
        liver_dice[name] = dice(numbers == liver, phantom.labels == 1)
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "nifti_seg" / "volume.nii.gz")))
    liver_dice["volume.nii.gz"] = dice(volume == 1, phantoms[4].labels == 1)
    assert min(liver_dice.values()) > 0.9, liver_dice
    assert not any(work.iterdir())


class _HeldUntilPrepared(NnUNetV1Backend):
    """Starts predicting only when ``count`` cases wait, so its first call is one batch of them all."""

    def __init__(self, work: Path, count: int, info: ModelInfo, **options: Any) -> None:
        super().__init__(info, **options)
        self.work, self.count = work, count
        self.calls: list[int] = []

    def load(self) -> None:
        super().load()
        deadline = time.monotonic() + 120
        while len(list(self.work.glob("*/cases/*/*_0000.nii.gz"))) < self.count:
            assert time.monotonic() < deadline, "cases were not prepared"
            time.sleep(0.05)
        time.sleep(0.5)  # from written to queued

    async def predict(self, cases: Sequence[Sequence[Path]]) -> list[np.ndarray | Exception]:
        self.calls.append(len(cases))
        return await super().predict(cases)


@needs_v1
@pytest.mark.slow
async def test_when_a_v1_batch_fails_its_cases_are_retried_alone(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    # A process that dies when given more than one case (as on a GPU out of memory) and, for
    # one, writes the label map nnUNet_predict would (the liver by its intensity): what is checked
    # is the batching and the retry; the real nnUNet_predict runs in the tests around this one.
    one_case = (
        "import sys, SimpleITK as s; i = s.ReadImage(sys.argv[1] + '/b0000_0000.nii.gz'); "
        "s.WriteImage(s.Cast(i > 85, s.sitkUInt8), sys.argv[2] + '/b0000.nii.gz')"
    )
    command = _wrapper(
        tmp_path,
        f"""\
        if [ "$(ls "$2" | wc -l)" -gt 1 ]; then
          echo "RuntimeError: CUDA out of memory" >&2; exit 3
        fi
        mkdir -p "$4" && exec {sys.executable} -c "{one_case}" "$2" "$4"
        """,
    )
    phantoms = [make_phantom(rng, (24, 32, 32)) for _ in range(2)]
    entries = [{f"v{n}.nii.gz": nifti_bytes(p.image, p.spacing, p.origin)} for n, p in enumerate(phantoms)]
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    work = tmp_path / "work"
    settings = _v1_settings(work, queue_size=4)
    backend = _HeldUntilPrepared(
        work,
        2,
        build_backend(settings).info,
        v1_command=command,
        device="cpu",
        torch_threads=1,
        use_mirroring=False,
        v1_preprocess_threads=1,
        v1_export_threads=1,
    )
    result = await run_request(entries, settings, backend=backend)

    assert result.status == "done", result.report()
    assert backend.calls == [2, 1, 1]
    (failed,) = [e for e in _events(logs) if e["event"] == "predict.batch_failed"]
    assert failed["cases"] == 2
    assert failed["reason"] == "fake_predict exited with code 3: RuntimeError: CUDA out of memory"
    assert [c.stage_s["predict"] > 0 for c in result.cases] == [True] * 2
    assert not any(work.iterdir())


@needs_v1
async def test_a_v1_run_past_its_timeout_is_killed_with_its_workers(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    command = _wrapper(tmp_path, f"sleep 60 & echo $! > {pid_file}\nwait\n")
    phantom = make_phantom(np.random.default_rng(3), (16, 24, 24))
    result = await run_request(
        [nifti_bytes(phantom.image, phantom.spacing, phantom.origin)],
        _v1_settings(tmp_path / "work", v1_command=command, v1_case_timeout_s=1.0),
    )
    assert result.cases[0].error == (
        "predict: V1RunError: fake_predict stopped after 1 s (1 case(s) x v1_case_timeout_s)"
    )
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(worker):  # the run's own child is killed too (a zombie until init reaps it)
        assert time.monotonic() < deadline, "the run's worker process survived"
        time.sleep(0.05)


@needs_v1
@pytest.mark.slow
def test_real_v1_checkpoints_need_weights_only_loading_lifted(tmp_path: Path) -> None:
    """The trap the backend's environment handles: stock nnUNet_predict under torch >= 2.6."""
    import subprocess

    inputs = tmp_path / "in"
    inputs.mkdir()
    phantom = make_phantom(np.random.default_rng(4), (16, 24, 24))
    (inputs / "x_0000.nii.gz").write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    env = {k: v for k, v in os.environ.items() if "WEIGHTS_ONLY" not in k}
    env.update(RESULTS_FOLDER=str(RESULTS), CUDA_VISIBLE_DEVICES="")
    stock = [NNUNET_PREDICT, "-i", str(inputs), "-o", str(tmp_path / "out"), "-t", TASK, "-m", "3d_fullres"]
    stock += ["-chk", "model_final_checkpoint", "--disable_tta"]
    run = subprocess.run(stock, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "Weights only load failed" in run.stderr


def _stock_predict(results: Path, inputs: Path, out: Path, *options: str) -> None:
    """The stock ``nnUNet_predict`` as a user runs it, in the environment v1 models need."""
    env = {**os.environ, "RESULTS_FOLDER": str(results), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [NNUNET_PREDICT, "-i", str(inputs), "-o", str(out), "-t", TASK, "-f", "0", *options]
    done = subprocess.run([*command, "--disable_tta"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@needs_v1
def test_a_v1_cascade_runs_its_first_stage_as_nnunet_predict_does(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-m 3d_cascade_fullres``: nnUNet_predict runs 3d_lowres first (``-tr`` its trainer,
    ``-ctr`` the cascade's), both found in asyncflow's overlay of the results folder; the label
    map is the stock command's, voxel for voxel, and the report records the first stage."""
    from nnunet_models import V1_CASCADE_TRAINER, make_v1_cascade

    results = make_v1_cascade(tmp_path, RESULTS)
    cascade = results / "nnUNet" / "3d_cascade_fullres" / TASK / f"{V1_CASCADE_TRAINER}__nnUNetPlansv2.1"
    phantom = make_phantom(rng, (40, 60, 56), spacing=(1.1, 0.9, 1.7))
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "case_0000.nii.gz").write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    reference = tmp_path / "reference"
    _stock_predict(results, inputs, reference, "-m", "3d_cascade_fullres")
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(reference / "case.nii.gz")))
    lowres = sitk.GetArrayFromImage(sitk.ReadImage(str(reference / "3d_lowres_predictions" / "case.nii.gz")))
    assert set(np.unique(expected)) == {0, 1, 2}
    assert (expected != lowres).any(), "the second stage changed nothing"

    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["run", str(inputs / "case_0000.nii.gz"), "-o", str(out), "--work-dir", str(work)]
    argv += ["--model", str(cascade), "--device", "cpu", "--no-mirroring", "--threads", "1", "--json-logs"]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "nifti_seg" / "case.nii.gz")))
    np.testing.assert_array_equal(got, expected)
    parameters = json.loads((out / "report.json").read_text())["model"]["parameters"]
    assert parameters["configuration"] == "3d_cascade_fullres"
    assert parameters["cascade"] == "3d_lowres (folds 0) first, its segmentation read by 3d_cascade_fullres"
    assert not any(work.iterdir())


def test_a_v1_cascade_without_its_first_stage_is_refused_before_any_case(tmp_path: Path) -> None:
    from nnunet_models import V1_CASCADE_TRAINER, make_v1_cascade

    results = make_v1_cascade(tmp_path, RESULTS)
    shutil.rmtree(results / "nnUNet" / "3d_lowres")
    cascade = results / "nnUNet" / "3d_cascade_fullres" / TASK / f"{V1_CASCADE_TRAINER}__nnUNetPlansv2.1"
    with pytest.raises(ModelError, match="second stage of a v1 cascade: nnUNet_predict runs 3d_lowres first"):
        build_backend(Settings(model_dir=cascade, device="cpu"))

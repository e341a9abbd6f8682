"""asyncflow's label maps equal nnU-Net's own ``nnUNetv2_predict``, voxel for voxel.

asyncflow runs nnU-Net v2's preprocessing in the prepare stage, only the network in
the prediction worker, and the way back to the source grid in the export stage. The
reference is the stock command line's entry point (``nnUNetv2_predict``), run in a
subprocess on NIfTI files, on inputs where every one of those steps does real work:
anisotropic voxels that must be resampled to the model's 1 mm (thick slices through
nnU-Net's "separate z" path too), mirroring on, two
genuinely different folds ensembled, two channels, and a DICOM series (against nnU-Net
on the series converted to NIfTI by SimpleITK in slice order).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import dicom_bytes, make_tar

from asyncflow import run_request
from asyncflow.cli.synthetic import Phantom, dicom_series_datasets, make_phantom, nifti_bytes
from asyncflow.writing.nifti import read_nifti_seg
from asyncflow.writing.seg import read_dicom_seg

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.model]

ANISOTROPIC = (0.8, 0.8, 2.0)  # (x, y, z) mm; the model is planned at 1 mm
THICK = (0.8, 0.8, 5.0)  # slices more than 3x coarser: nnU-Net resamples z on its own
LABELS = {"liver": 1, "tumor": 2}
FIRST_CONV = "encoder.stages.0.0.convs.0.conv.weight"


def _variant(source: Path, target: Path, *, second_fold: bool = False, second_channel: bool = False) -> Path:
    """A copy of the tiny model with a second fold (fold 0's weights perturbed: another network,
    never a copy) and/or a second input channel (z-score normalised, its own first-layer weights)."""
    import torch

    shutil.copytree(source, target)
    generator = torch.Generator().manual_seed(20261130)
    checkpoint_path = target / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    if second_channel:
        first = weights[FIRST_CONV]
        wider = torch.cat([first, torch.randn(first.shape, generator=generator) * first.std()], 1)
        for name in [n for n, value in weights.items() if value.shape == first.shape]:
            weights[name] = wider  # the state dict names the first convolution under several keys
        dataset = json.loads((target / "dataset.json").read_text())
        dataset["channel_names"] = {"0": "CT", "1": "T1"}
        (target / "dataset.json").write_text(json.dumps(dataset))
        plans = json.loads((target / "plans.json").read_text())
        config = plans["configurations"]["3d_fullres"]
        config["normalization_schemes"] = ["CTNormalization", "ZScoreNormalization"]
        config["use_mask_for_norm"] = [False, False]
        intensities = plans["foreground_intensity_properties_per_channel"]
        intensities["1"] = intensities["0"]
        (target / "plans.json").write_text(json.dumps(plans))
        torch.save(checkpoint, checkpoint_path)
    if second_fold:
        other = {
            name: value * (1 + 0.3 * torch.randn(value.shape, generator=generator))
            if value.is_floating_point()
            else value
            for name, value in weights.items()
        }
        (target / "fold_1").mkdir()
        torch.save({**checkpoint, "network_weights": other}, target / "fold_1" / "checkpoint_final.pth")
    return target


def _nnunet_predict(tmp: Path, *runs: tuple[Path, Path, str, bool]) -> list[dict[str, np.ndarray]]:
    """nnU-Net's own ``nnUNetv2_predict`` on folders of ``<case>_<channel>.nii.gz`` files.

    Each run is ``(model, inputs, folds, mirroring)``. The runs go through the console
    script's own entry point, one after another in one fresh process (torch is imported
    once), in nnU-Net's sequential mode (``-npp 0 -nps 0``: no worker processes to spawn).
    """
    results = tmp / "nnUNet_results"
    argvs, outputs = [], []
    for number, (model, inputs, folds, mirroring) in enumerate(runs):
        dataset = f"Dataset{900 + number}_Reference"
        (results / dataset).mkdir(parents=True)
        (results / dataset / "Trainer__Plans__3d_fullres").symlink_to(model)
        outputs.append(tmp / f"nnunet_out_{number}")
        argv = ["-i", str(inputs), "-o", str(outputs[-1]), "-d", dataset, "-tr", "Trainer", "-p", "Plans"]
        argv += ["-c", "3d_fullres", "-f", *folds.split(), "-device", "cpu", "-npp", "0", "-nps", "0"]
        argvs.append(argv + ["--disable_progress_bar"] + ([] if mirroring else ["--disable_tta"]))
    script = (
        "import json, sys\n"
        "from nnunetv2.inference.predict_from_raw_data import predict_entry_point\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    sys.argv = ['nnUNetv2_predict', *argv]\n"
        "    predict_entry_point()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_results": str(results)}
    env |= {"nnUNet_raw": str(tmp), "nnUNet_preprocessed": str(tmp)}  # read by nnU-Net's imports only
    argv = [sys.executable, "-c", script, json.dumps(argvs)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [
        {
            path.name.removesuffix(".nii.gz"): sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            for path in output.glob("*.nii.gz")
        }
        for output in outputs
    ]


def _write_nifti(image: sitk.Image | Phantom, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, Phantom):
        path.write_bytes(nifti_bytes(image.image, image.spacing, image.origin))
    else:
        sitk.WriteImage(image, str(path))


def _series_as_nifti(datasets: list, folder: Path) -> sitk.Image:
    """The DICOM series read by SimpleITK in slice order (``dicom_series_datasets`` order)."""
    folder.mkdir(parents=True)
    paths = []
    for k, ds in enumerate(datasets):
        paths.append(folder / f"{k:04d}.dcm")
        paths[-1].write_bytes(dicom_bytes(ds))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    return reader.Execute()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "two_folds": _variant(model_dir, root / "two_folds", second_fold=True),
        "two_channels": _variant(model_dir, root / "two_channels", second_channel=True),
    }


async def test_anisotropic_mirrored_two_fold_nifti_and_dicom_equal_nnunet_predict(
    tmp_path: Path, settings_factory, models: dict[str, Path], rng: np.random.Generator
) -> None:
    model = models["two_folds"]
    nifti = make_phantom(rng, (24, 56, 56), spacing=ANISOTROPIC)
    thick = make_phantom(rng, (12, 56, 48), spacing=THICK)
    series = dicom_series_datasets(make_phantom(rng, (20, 60, 52), spacing=(0.7, 0.9, 2.5)))

    reference_inputs = tmp_path / "reference_in"
    _write_nifti(nifti, reference_inputs / "nifti_0000.nii.gz")
    _write_nifti(thick, reference_inputs / "thick_0000.nii.gz")
    _write_nifti(_series_as_nifti(series, tmp_path / "series"), reference_inputs / "dicom_0000.nii.gz")
    # The reference, and the test bites: each feature changes nnU-Net's answer on these inputs
    # (fold 1 is compared without mirroring, which costs an eighth).
    expected, plain, fold_0_plain = _nnunet_predict(
        tmp_path,
        (model, reference_inputs, "0 1", True),
        (model, reference_inputs, "0 1", False),
        (model, reference_inputs, "0", False),
    )
    for name in ("nifti", "dicom"):
        assert set(np.unique(expected[name])) == {0, 1, 2}, name
        assert (plain[name] != expected[name]).any(), f"{name}: mirroring changes nothing"
        assert (fold_0_plain[name] != plain[name]).any(), f"{name}: fold 1 changes nothing"
    assert set(np.unique(expected["thick"])) >= {0, 1}

    entries = [
        {"nifti.nii.gz": nifti_bytes(nifti.image, nifti.spacing, nifti.origin)},
        {"thick.nii.gz": nifti_bytes(thick.image, thick.spacing, thick.origin)},
        {"study.tar": make_tar({f"s/{k}.dcm": dicom_bytes(ds) for k, ds in enumerate(series)})},
    ]
    settings = settings_factory(tmp_path / "work", model_dir=model, use_mirroring=True)
    result = await run_request(entries, settings)
    assert result.status == "done", result.report()

    for name in ("nifti", "thick"):
        got = sitk.GetArrayFromImage(read_nifti_seg(result.nifti_seg_bytes[f"{name}.nii.gz"]))
        np.testing.assert_array_equal(got, expected[name])
    (seg,) = result.dicom_seg_bytes.values()
    numbers, names = read_dicom_seg(seg, [str(ds.SOPInstanceUID) for ds in series])
    got_dicom = np.zeros_like(numbers)
    for number, label in names.items():
        got_dicom[numbers == number] = LABELS[label]
    np.testing.assert_array_equal(got_dicom, expected["dicom"])


async def test_two_channels_equal_nnunet_predict(
    tmp_path: Path, settings_factory, models: dict[str, Path], rng: np.random.Generator
) -> None:
    model = models["two_channels"]
    phantom = make_phantom(rng, (20, 48, 40), spacing=ANISOTROPIC)
    second = (phantom.image.astype(np.float32) * 0.5 + rng.normal(0, 30, phantom.image.shape)).astype(
        np.int16
    )
    channels = [nifti_bytes(array, phantom.spacing, phantom.origin) for array in (phantom.image, second)]

    reference_inputs = tmp_path / "reference_in"
    reference_inputs.mkdir()
    for number, data in enumerate(channels):
        (reference_inputs / f"case_{number:04d}.nii.gz").write_bytes(data)
    (reference,) = _nnunet_predict(tmp_path, (model, reference_inputs, "0", False))
    expected = reference["case"]
    assert set(np.unique(expected)) >= {0, 1}

    entries = [make_tar({f"case_{number:04d}.nii.gz": data for number, data in enumerate(channels)})]
    settings = settings_factory(tmp_path / "work", model_dir=model, multi_modal=True)
    result = await run_request(entries, settings)
    assert result.status == "done", result.report()
    (output,) = result.nifti_seg_bytes.values()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_nifti_seg(output)), expected)

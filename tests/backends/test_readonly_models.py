"""Both backends with the model folder mounted read-only, as an image ships it.

Root ignores file modes, so the folder is made truly unwritable by a read-only
bind mount in a private mount namespace (``unshare -m``), around a real
``asyncflow run``. nnU-Net v1's ``nnUNet_predict`` writes a log into the fold
folder as it loads a checkpoint: without the backend's writable overlay every
case failed with ``OSError: [Errno 30] Read-only file system``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asyncflow.cli.synthetic import make_phantom, nifti_bytes

pytestmark = pytest.mark.model  # runs asyncflow on the packaged tiny models

MODELS = Path(__file__).parents[2] / "asyncflow" / "models"
V1_MODEL = Path("nnUNet/3d_fullres/Task998_AsyncflowTiny/nnUNetTrainerV2__nnUNetPlansv2.1")


def _read_only_mounts_work(folder: Path) -> bool:
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{folder}' '{folder}' && ! touch '{folder}/x'"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0 and not (folder / "x").exists()


def _as_an_old_v1_checkpoint(path: Path) -> None:
    """Checkpoints of nnU-Net's old code (the published Task029_LiTS weights among them) count one
    epoch more than their loss curve; loading one makes nnUNet_predict write a warning into a
    training log in the fold folder. The tiny model's checkpoint is made so."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["epoch"] = len(checkpoint["plot_stuff"][0]) + 1
    torch.save(checkpoint, path)


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("generation", "model"), [("v2", Path("tiny")), ("v1", Path("tiny_v1") / V1_MODEL)])
def test_a_request_succeeds_with_its_model_folder_read_only(
    tmp_path: Path, generation: str, model: Path
) -> None:
    if shutil.which("unshare") is None or not _read_only_mounts_work(tmp_path):
        pytest.skip("no private mount namespace here (needs root and unshare)")
    models = tmp_path / "models"
    shutil.copytree(MODELS / model.parts[0], models / model.parts[0])
    if generation == "v1":
        _as_an_old_v1_checkpoint(models / model / "fold_0" / "model_final_checkpoint.model")
    before = _files(models)
    inputs = tmp_path / "in"
    inputs.mkdir()
    phantom = make_phantom(np.random.default_rng(5), (24, 32, 32))
    (inputs / "scan.nii.gz").write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "asyncflow",
        "run",
        str(inputs),
        "-o",
        str(out),
        "--model",
        str(models / model),
    ]
    command += ["--no-mirroring", "--threads", "1", "--device", "cpu", "--json-logs"]
    script = f"mount --bind -o ro '{models}' '{models}' && exec \"$@\""
    run = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *command], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["done"]
    assert (out / "nifti_seg" / "scan.nii.gz").is_file()
    assert _files(models) == before  # nothing was written into the model folder

"""What the machine tells asyncflow: an NVIDIA GPU that torch cannot use is explained, not
silently replaced by the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncflow.machine import MIN_DRIVER, gpu_problem, nvidia_driver, unusable_gpu

# /proc/driver/nvidia/version as the proprietary and the open kernel modules write it.
PROPRIETARY = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
OPEN = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)\n"
)


def test_the_driver_version_is_read_from_either_kernel_module(tmp_path: Path) -> None:
    (tmp_path / "proprietary").write_text(PROPRIETARY)
    (tmp_path / "open").write_text(OPEN)
    (tmp_path / "odd").write_text("NVRM version: something else\n")
    assert nvidia_driver(tmp_path / "proprietary") == "550.54.15"
    assert nvidia_driver(tmp_path / "open") == "580.65.06"
    assert nvidia_driver(tmp_path / "odd") == "unknown"
    assert nvidia_driver(tmp_path / "absent") is None  # no driver loaded: no GPU to speak of


def test_a_driver_too_old_for_torchs_cuda_is_named_with_what_torch_needs() -> None:
    said = (
        "CUDA initialization: The NVIDIA driver on your system is too old (found version 12040). "
        "Please update your GPU driver by downloading and installing a new version from the URL: ..."
    )
    reason = unusable_gpu("550.54.15", "13.0", "2.14.1+cu130", said)
    assert reason == (
        f"NVIDIA driver 550.54.15 is older than {MIN_DRIVER[13]}, which torch 2.14.1+cu130 (built for "
        "CUDA 13.0) needs (torch: CUDA initialization: The NVIDIA driver on your system is too old "
        "(found version 12040))"
    )
    # A driver new enough, yet torch cannot use the GPU (no device files in the container...):
    assert unusable_gpu("580.95.05", "13.0", "2.14.1", None) == (
        "NVIDIA driver 580.95.05 is present, but torch 2.14.1 cannot use it"
    )
    assert (
        unusable_gpu(None, None, "2.14.1+cpu", None)
        == "an NVIDIA device is present, but torch 2.14.1+cpu is a CPU build"
    )


@pytest.mark.skipif(
    Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists(),
    reason="this machine shows an NVIDIA GPU",
)
def test_a_machine_without_a_gpu_gets_no_warning() -> None:
    assert gpu_problem() is None

"""What this machine offers the process: cores, memory still available, the peak it used, and
why an NVIDIA GPU it shows cannot be used.

Read from the operating system each time they are asked for (a container's cgroup
limits included); the settings' defaults and the backends' thread counts come from here.
"""

from __future__ import annotations

import os
import re
import resource
import warnings
from pathlib import Path

__all__ = [
    "MIN_DRIVER",
    "available_memory_bytes",
    "cores",
    "gpu_problem",
    "half_the_cores",
    "nvidia_driver",
    "peak_rss_bytes",
    "unusable_gpu",
]

#: The oldest NVIDIA Linux driver that runs each major CUDA version (CUDA's minor version
#: compatibility, CUDA Toolkit release notes): what a torch build for that CUDA needs of a node.
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
_DRIVER_FILE = Path("/proc/driver/nvidia/version")


def cores() -> int:
    """The CPU cores the OS reports, at least one."""
    return os.cpu_count() or 1


def half_the_cores() -> int:
    """One per two cores, at least one: for work that shares the machine with other CPU stages
    (torch beside the prepare and export threads; GIL-bound unpacking)."""
    return max(1, cores() // 2)


def available_memory_bytes() -> int | None:
    """Memory this process may still use: the cgroup's limit less its usage where a container
    sets one (cgroup v2, then v1), else the kernel's MemAvailable; None where neither is known."""
    limits = [
        (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
        (
            Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        ),
    ]
    free: list[int] = []
    for limit_file, usage_file in limits:
        try:
            limit = limit_file.read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:  # cgroup v1 says "no limit" with a huge number
                free.append(int(limit) - int(usage_file.read_text()))
                break
        except (OSError, ValueError):
            continue
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return max(0, min(free)) if free else None


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, which, unlike ``ru_maxrss``, does not
    carry over a parent's peak through fork and exec; ``ru_maxrss`` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def nvidia_driver(version_file: Path = _DRIVER_FILE) -> str | None:
    """The loaded NVIDIA kernel driver's version ("580.65.06"), "unknown" when its file says none
    legibly, None when no NVIDIA driver is loaded (no GPU visible)."""
    try:
        text = version_file.read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else "unknown"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def unusable_gpu(driver: str | None, cuda: str | None, torch_version: str, torch_said: str | None) -> str:
    """Why torch cannot use the GPU that ``driver`` (the NVIDIA driver's version, None: only a
    device file) shows: ``cuda`` is the CUDA torch was built for (None: a CPU build), ``torch_said``
    torch's own warning, if it gave one."""
    shown = f"NVIDIA driver {driver}" if driver else "an NVIDIA device"
    if cuda is None:
        return f"{shown} is present, but torch {torch_version} is a CPU build"
    needed = MIN_DRIVER.get(_version(cuda)[0])
    reason = f"{shown} is present, but torch {torch_version} cannot use it"
    if needed is not None and driver not in (None, "unknown") and _version(driver) < _version(needed):
        reason = f"{shown} is older than {needed}, which torch {torch_version} (built for CUDA {cuda}) needs"
    if torch_said:  # its first sentence: the rest is where to download drivers
        reason += f" (torch: {torch_said.split('. ')[0].strip()})"
    return reason


def gpu_problem() -> str | None:
    """Why torch cannot use the NVIDIA GPU this machine shows; None when it can, or shows none."""
    driver = nvidia_driver()
    if driver is None and not Path("/dev/nvidiactl").exists():
        return None
    import torch

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return None
    torch_said = next((str(w.message) for w in said), None)
    return unusable_gpu(driver, torch.version.cuda, torch.__version__, torch_said)

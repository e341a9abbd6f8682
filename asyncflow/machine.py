"""What this machine offers the process: cores, memory still available, and the peak it used.

Read from the operating system each time they are asked for (a container's cgroup
limits included); the settings' defaults and the backends' thread counts come from here.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

__all__ = ["available_memory_bytes", "cores", "half_the_cores", "peak_rss_bytes"]


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

"""``manifest.json``: what a run was, so that its outputs can be traced and compared across sites.

Written last into a run's output folder, beside ``report.json``: the software (asyncflow,
nnU-Net, torch and the libraries that read and write the images, with their versions),
the model (its name, framework, parameters and key; :mod:`asyncflow.pipeline.keys`),
every setting, the device and machine, the request's timings, and every file the run wrote
or kept (its cases' artifacts, report and statistics), with its size and sha256. A SEG's bytes hold when it was made, so for a
DICOM output the sha256 of its PixelData is given too: two runs of the same model on the
same data with the same settings give the same segments, and the same PixelData hash.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pydicom

from asyncflow._version import __version__
from asyncflow.digests import sha256_file
from asyncflow.result import Result
from asyncflow.settings import Settings

__all__ = ["MANIFEST", "MANIFEST_VERSION", "run_manifest"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# The distributions whose versions decide what a run's outputs hold.
_PACKAGES = (
    "nnunetv2",
    "nnunet",
    "torch",
    "numpy",
    "scipy",
    "SimpleITK",
    "pydicom",
    "highdicom",
    "nibabel",
    "pylibjpeg-openjpeg",
)
_OWN_FILES = ("report.json", "statistics.csv")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _plain(value: Any) -> Any:
    if isinstance(value, bool | int | float | str | type(None)):
        return value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return str(value)


def _device(settings: Settings) -> dict[str, Any]:
    """The device setting, and what torch saw, when this process loaded it (the v1 backend runs
    torch in nnUNet_predict's process)."""
    torch = sys.modules.get("torch")
    seen: dict[str, Any] = {"setting": settings.device, "devices": _plain(settings.devices)}
    if torch is not None:
        cuda = bool(torch.cuda.is_available())
        seen["cuda_available"] = cuda
        seen["gpus"] = (
            [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())] if cuda else []
        )
    return seen


def _outputs(result: Result, folder: Path) -> list[dict[str, Any]]:
    """Every file this run's cases wrote or kept (resumed), with its report and statistics, in path
    order; files of the user's or of an earlier run in the same folders are not this run's."""
    paths = {folder / name: False for name in _OWN_FILES if (folder / name).is_file()}
    for case in result.cases:
        for artifact in case.artifacts:
            if artifact.name is not None and (folder / artifact.folder / artifact.name).is_file():
                paths[folder / artifact.folder / artifact.name] = artifact.deliver  # a DICOM object
    entries = []
    for path, dicom in sorted(paths.items()):
        entry: dict[str, Any] = {
            "path": path.relative_to(folder).as_posix(),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        if dicom:  # the segments alone, without the object's creation date and time
            pixels = pydicom.dcmread(path, specific_tags=["PixelData"]).get("PixelData")
            entry["pixel_data_sha256"] = hashlib.sha256(pixels).hexdigest() if pixels else None
        entries.append(entry)
    return entries


def run_manifest(result: Result, settings: Settings, folder: Path) -> dict[str, Any]:
    """The manifest of ``result``, whose outputs and report are in ``folder``."""
    stages: dict[str, float] = {}
    for case in result.cases:
        for stage, seconds in case.stage_s.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    return {
        "manifest": MANIFEST_VERSION,
        "request_id": result.request_id,
        "status": str(result.status),
        "written_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "software": {
            "asyncflow": __version__,
            "python": platform.python_version(),
            **{package: _version(package) for package in _PACKAGES},
        },
        "model": result.model,
        "settings": {f.name: _plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)},
        "device": _device(settings),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "timings": {
            "duration_s": round(result.duration_s, 3),
            "cases": len(result.cases),
            "stage_s": {stage: round(seconds, 3) for stage, seconds in sorted(stages.items())},
        },
        "outputs": _outputs(result, folder),
    }

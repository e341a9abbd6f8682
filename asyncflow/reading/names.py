"""Names from the data made safe: archive member paths on disk, and the stems outputs are named by.

Names in a request are untrusted (object keys, archive members, file names): they
may hold ``..``, odd characters or a patient's name. Every one that becomes a path
or an output name goes through this module.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

__all__ = ["NIFTI_SUFFIXES", "TAR_SUFFIXES", "has_tar_suffix", "sanitise_relpath", "stem"]

# Names that promise an archive: such an input whose content is none is an error, not a loose file.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# What a name loses to become an output's stem.
_STEM_SUFFIXES = (*TAR_SUFFIXES, *NIFTI_SUFFIXES, ".dcm")
_SAFE = r"A-Za-z0-9._+\-"
_UNSAFE_IN_PATHS = re.compile(rf"[^{_SAFE} ]+")  # a member's path keeps its spaces
_UNSAFE_IN_STEMS = re.compile(rf"[^{_SAFE}]+")  # an output's name holds none
_MAX_COMPONENT = 120


def has_tar_suffix(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def sanitise_relpath(name: str, fallback: str = "input") -> PurePosixPath:
    """A safe relative path from an untrusted name: no '..', no root, tame characters, components
    of at most 120 characters."""
    parts = []
    for part in re.split(r"[\\/]+", name):
        if part in ("", ".", ".."):
            continue
        clean = _UNSAFE_IN_PATHS.sub("_", part).strip(" ")
        clean = clean.lstrip(".") or "_"
        parts.append(clean[:_MAX_COMPONENT])
    return PurePosixPath(*parts) if parts else PurePosixPath(fallback)


def stem(name: str) -> str:
    """The stem an output is named by: the last component of ``name`` without its archive, NIfTI
    or DICOM suffix, tame characters only (``case`` when nothing is left)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in _STEM_SUFFIXES:
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            base = base[: -len(suffix)]
            break
    return _UNSAFE_IN_STEMS.sub("_", base).strip("._") or "case"

"""Prepare one case as nnU-Net input: ``<case_id>_0000.nii.gz`` (one file per channel)."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from .case import Case, PreparedCase, SourceKind
from .dicom import order_series

__all__ = ["prepare_case"]

# gzip dominates a .nii.gz write; level 1 keeps most of the size gain at a fraction of the time.
_COMPRESSION_LEVEL = 1


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path), useCompression=True, compressionLevel=_COMPRESSION_LEVEL)
    return path


def _check_volume(image: sitk.Image, what: str) -> None:
    if image.GetDimension() != 3:
        raise ValueError(f"{what} is {image.GetDimension()}D; a 3D volume is needed")


def _with_nifti_suffix(source: Path, workdir: Path, number: int) -> Path:
    """The source under a name SimpleITK reads as NIfTI (it picks readers by suffix).

    Inputs are recognised by content, so a NIfTI may arrive as ``input-3`` or an
    S3 key without suffix: it is then linked into the case folder as ``.nii(.gz)``.
    """
    if source.name.lower().endswith((".nii", ".nii.gz")):
        return source
    with source.open("rb") as f:
        suffix = ".nii.gz" if f.read(2) == b"\x1f\x8b" else ".nii"
    link = workdir / f"source_{number:04d}{suffix}"
    link.symlink_to(source.resolve())
    return link


def prepare_case(case: Case, workdir: Path) -> PreparedCase:
    """Read the case's source into nnU-Net's input naming inside ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    if case.kind is SourceKind.DICOM:
        ordered = order_series(case.instances)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(i.path) for i in ordered])
        image = reader.Execute()
        _check_volume(image, "DICOM series")
        if image.GetSize()[2] != len(ordered):
            raise ValueError(f"series of {len(ordered)} slices read as {image.GetSize()[2]}")
        channel = _write(image, workdir / f"{case.case_id}_0000.nii.gz")
        return PreparedCase(case, workdir, [channel], [i.path for i in ordered])

    images = []
    sources = [_with_nifti_suffix(source, workdir, number) for number, source in enumerate(case.files)]
    for number, source in enumerate(sources):
        try:
            image = sitk.ReadImage(str(source))
        except RuntimeError as exc:
            raise ValueError(f"NIfTI channel {number} cannot be read") from exc
        _check_volume(image, f"NIfTI channel {number}")
        images.append(image)
    reference = images[0]
    for number, image in enumerate(images[1:], start=1):
        if image.GetSize() != reference.GetSize():
            raise ValueError(
                f"NIfTI channel {number} has size {image.GetSize()}, channel 0 {reference.GetSize()}"
            )
    channels = [
        _write(image, workdir / f"{case.case_id}_{number:04d}.nii.gz") for number, image in enumerate(images)
    ]
    return PreparedCase(case, workdir, channels, sources)

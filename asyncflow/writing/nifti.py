"""A prediction as a NIfTI label map on its source's grid, and reading one back.

SimpleITK writes a NIfTI's qform and sform codes as 1 ("scanner") whatever the
source said; a NIfTI source's own codes (2 "aligned", ...) are put back in the
header bytes here, so the label map lies where its source says it lies.
"""

from __future__ import annotations

import gzip
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import SimpleITK as sitk

from asyncflow.artifact import Artifact
from asyncflow.case import Geometry
from asyncflow.writing.base import LabelMap, Writer

__all__ = ["NiftiWriter", "nifti_seg_bytes", "read_nifti_seg"]

_NIFTI1_HEADER_BYTES = 348
_NIFTI1_XFORM_CODES = 252  # byte offset of qform_code, sform_code (two int16) in a NIfTI-1 header
_ITK_XFORM_CODES = (1, 1)  # what SimpleITK writes


def nifti_seg_bytes(labels: np.ndarray, geometry: Geometry, scratch: Path) -> bytes:
    """The label map as .nii.gz bytes on ``geometry`` (the model input's grid), keeping a NIfTI
    source's qform and sform codes; ``scratch`` is a file name to write through.

    SimpleITK writes both codes as 1 ("scanner") whatever the source said, and no metadata
    changes that: other codes are set in the header bytes and the file compressed here
    (ITK's own compression is faster and smaller, so it stays where the codes are 1).
    """
    if tuple(reversed(labels.shape)) != tuple(geometry.size):
        raise ValueError(f"prediction shape {labels.shape} does not match the input size {geometry.size}")
    image = geometry.apply(
        sitk.GetImageFromArray(labels.astype(np.uint8 if labels.max() < 256 else np.uint16))
    )
    codes = geometry.xform_codes
    compress_here = codes is not None and codes != _ITK_XFORM_CODES
    path = scratch.with_name(scratch.name.removesuffix(".gz").removesuffix(".nii") + ".nii")
    if not compress_here:
        path = path.with_name(path.name + ".gz")
    sitk.WriteImage(image, str(path), useCompression=not compress_here)
    data = path.read_bytes()
    path.unlink()
    if not compress_here:
        return data
    header = bytearray(data[:_NIFTI1_HEADER_BYTES])
    order = "<" if int.from_bytes(header[:4], "little") == _NIFTI1_HEADER_BYTES else ">"
    struct.pack_into(f"{order}hh", header, _NIFTI1_XFORM_CODES, *codes)  # type: ignore[misc]
    return gzip.compress(bytes(header) + data[_NIFTI1_HEADER_BYTES:], compresslevel=6, mtime=0)


def read_nifti_seg(data: bytes) -> sitk.Image:
    """Decode .nii.gz bytes (SimpleITK reads only from files)."""
    with tempfile.TemporaryDirectory(prefix="asyncflow-read-") as tmp:
        path = Path(tmp) / "seg.nii.gz"
        path.write_bytes(data)
        return sitk.ReadImage(str(path))


class NiftiWriter(Writer):
    """The label map as NIfTI on the prediction's grid: the output of a case without a DICOM
    source, and of a DICOM case whose SEG failed (``fallback`` says why)."""

    name = "nifti"
    title = "NIfTI"
    folder = "nifti_seg"
    result_key = "nifti_seg_bytes"
    report_defaults: ClassVar[Mapping[str, object]] = {"fallback": None}
    primary = True

    def applies(self, job: LabelMap, made: Mapping[str, Artifact]) -> bool:
        seg = made.get("dicom_seg")
        return seg is None or not seg.made

    def write(self, job: LabelMap, made: Mapping[str, Artifact]) -> Artifact:
        prepared = job.prepared
        data = nifti_seg_bytes(job.labels, prepared.geometry, prepared.workdir / "seg.nii.gz")
        seg = made.get("dicom_seg")
        if seg is None:
            return self.artifact(f"{job.stem}.nii.gz", data)
        # The prediction has the series' geometry in slice order: it is kept, with the reason.
        reason = f"DICOM SEG failed ({seg.error}); written as NIfTI"
        return self.artifact(f"{job.stem}.nii.gz", data, fallback=reason)

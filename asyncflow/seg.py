"""Write predictions: DICOM SEG (highdicom) for DICOM sources, NIfTI otherwise."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.sr.coding import Code as PydicomCode

from . import __version__
from .dicom import slice_normal
from .labels import Code, SegmentLabel, label_for

__all__ = [
    "Algorithm",
    "dicom_seg_bytes",
    "nifti_seg_bytes",
    "read_dicom_seg",
    "read_nifti_seg",
    "segment_values",
]

_AI_FAMILY = PydicomCode("123110", "DCM", "Artificial Intelligence")


@dataclass(frozen=True)
class Algorithm:
    """AlgorithmIdentification of the segments: what produced them."""

    name: str  # e.g. "nnU-Net Dataset029_LiTS"
    version: str  # e.g. "nnunetv2 2.8.1"
    parameters: Mapping[str, str] = field(default_factory=dict)  # trainer, plans, folds...


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def segment_values(labels: np.ndarray, declared: Mapping[int, SegmentLabel]) -> list[int]:
    """Label values that become segments: those present, or every declared one when none is."""
    present = [int(v) for v in np.unique(labels) if v != 0]
    return present or sorted(declared)


def dicom_seg_bytes(
    source_files: Sequence[Path],
    labels: np.ndarray,
    declared: Mapping[int, SegmentLabel],
    algorithm: Algorithm,
    *,
    series_number: int = 4242,
) -> bytes:
    """A BINARY DICOM SEG whose frame k lies on source instance k.

    ``labels`` is (z, y, x) with z in the order of ``source_files`` (sorted along
    the slice normal), y along rows and x along columns: exactly the source pixel
    grid, so the SEG decoded on its sources equals the prediction voxel for voxel.
    Segment numbers are 1..n over the label values in ascending order.
    """
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_files]
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if labels.shape != (len(sources), rows, columns):
        raise ValueError(
            f"prediction shape {labels.shape} does not match the source grid {(len(sources), rows, columns)}"
        )
    _fill_slice_thickness(sources)
    values = segment_values(labels, declared)
    if not values:
        raise ValueError("the model declares no foreground label and none was predicted")
    lookup = np.zeros(max(int(labels.max()), max(values)) + 1, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        lookup[value] = number
    pixel_array = lookup[labels]
    pixel_array = pixel_array.astype(np.uint8 if len(values) < 256 else np.uint16)
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        family=_AI_FAMILY,
        version=algorithm.version[:64],
        parameters=dict(algorithm.parameters) or None,
    )
    descriptions = []
    for number, value in enumerate(values, start=1):
        label = label_for(declared, value)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label.name[:64],
                segmented_property_category=_coded(label.category),
                segmented_property_type=_coded(label.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=identification,
            )
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="asyncflow",
        manufacturer_model_name=algorithm.name[:64],
        software_versions=f"asyncflow {__version__}",
        device_serial_number="0",
        series_description=f"{algorithm.name} segmentation"[:64],
        omit_empty_frames=True,
    )
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()


def _fill_slice_thickness(sources: Sequence[pydicom.Dataset]) -> None:
    """Give in-memory sources without SliceThickness (Type 2, often empty) the slice gap.

    highdicom copies the pixel measures of the first source; the files are untouched.
    """
    if sources[0].get("SliceThickness") or len(sources) < 2:
        return
    normal = slice_normal(sources[0].ImageOrientationPatient)
    first, second = (np.asarray(ds.ImagePositionPatient, dtype=float) for ds in sources[:2])
    gap = round(abs(float(np.dot(normal, second - first))), 6)
    for ds in sources:
        ds.SliceThickness = gap


def nifti_seg_bytes(labels: np.ndarray, reference: Path, scratch: Path) -> bytes:
    """The label map as .nii.gz in the geometry of the ``reference`` image file."""
    info = sitk.ImageFileReader()
    info.SetFileName(str(reference))
    info.ReadImageInformation()
    if tuple(reversed(labels.shape)) != tuple(info.GetSize()):
        raise ValueError(f"prediction shape {labels.shape} does not match the input size {info.GetSize()}")
    image = sitk.GetImageFromArray(labels.astype(np.uint8 if labels.max() < 256 else np.uint16))
    image.SetOrigin(info.GetOrigin())
    image.SetSpacing(info.GetSpacing())
    image.SetDirection(info.GetDirection())
    sitk.WriteImage(image, str(scratch), useCompression=True)
    return scratch.read_bytes()


def read_dicom_seg(data: bytes, source_sop_instance_uids: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
    """Decode a SEG onto its source instances, in the order given.

    Returns a (z, y, x) array of segment numbers (0 where no segment) and each
    segment number's label.
    """
    seg = hd.seg.segread(io.BytesIO(data))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(source_sop_instance_uids),
        combine_segments=True,
        assert_missing_frames_are_empty=True,  # empty frames are omitted on write
    )
    names = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    return np.asarray(pixels), names


def read_nifti_seg(data: bytes) -> sitk.Image:
    """Decode .nii.gz bytes (SimpleITK reads only from files)."""
    with tempfile.TemporaryDirectory(prefix="asyncflow-read-") as tmp:
        path = Path(tmp) / "seg.nii.gz"
        path.write_bytes(data)
        return sitk.ReadImage(str(path))

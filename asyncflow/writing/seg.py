"""DICOM SEG (highdicom) of a prediction on its DICOM sources: written, read back and checked.

A SEG's frames lie on its source instances (or the frames of one multi-frame
source), so the SEG decoded on its sources equals the prediction voxel for voxel;
:func:`dicom_seg_bytes` checks exactly that before it returns the bytes. A volume whose
slices are not its source's frames (one volume of a 4D multi-frame image, a Siemens
mosaic) gets a SEG on its own grid (:mod:`asyncflow.writing.planes`), checked there. Its UIDs
derive from :attr:`OutputOptions.uid_seed` (the case and model keys), so the same case
through the same model and settings gets the same SEG identity.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.coding import Code as PydicomCode
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from asyncflow._version import __version__
from asyncflow.artifact import Artifact
from asyncflow.case import Geometry
from asyncflow.enums import SourceKind
from asyncflow.errors import SegCheckError
from asyncflow.labels.segment import Code, SegmentLabel, label_for, label_values, segment_values
from asyncflow.reading.dicom import slice_normal
from asyncflow.writing.base import Algorithm, LabelMap, OutputOptions, Writer, output_series, uid_for
from asyncflow.writing.deidentify import deidentify
from asyncflow.writing.planes import decode_on_grid, seg_planes

__all__ = ["DicomSegWriter", "check_dicom_seg", "dicom_seg_bytes", "read_dicom_seg"]

_AI_FAMILY = PydicomCode("123110", "DCM", "Artificial Intelligence")


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


_TRANSFER_SYNTAXES = {
    "none": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
}
# Clinical Trial Subject and Study modules (and patient de-identification), copied from the
# source; the Clinical Trial Series attributes (0012,0060/0071/0072) describe the source series.
_SERIES_LEVEL_TRIAL_TAGS = {0x00120060, 0x00120071, 0x00120072}


def dicom_seg_bytes(
    source_files: Sequence[Path],
    labels: np.ndarray,
    declared: Mapping[int, SegmentLabel],
    algorithm: Algorithm,
    options: OutputOptions | None = None,
    present: Sequence[int] | None = None,
    grid: Geometry | None = None,
) -> bytes:
    """A DICOM SEG whose frames lie on the source instances, read back and checked.

    ``labels`` is (z, y, x) with z in the order of ``source_files`` (sorted along
    the slice normal), or of the frames of one multi-frame source, y along rows and
    x along columns: exactly the source pixel grid, so the SEG decoded on its sources equals the prediction voxel for voxel
    (checked before the bytes are returned, :class:`~asyncflow.errors.SegCheckError` otherwise).
    Segment numbers are 1..n over the label values present, in ascending order;
    when none is present, one empty segment per declared label says so.
    ``present`` is :func:`label_values` of ``labels``, when the caller has it already.

    With ``grid``, ``labels`` lies on that grid instead, and the SEG's frames on its planes: for
    a volume whose slices are not the source's frames one for one (one volume of a 4D
    multi-frame image, a Siemens mosaic's tiles). The SEG references its sources, and is
    checked decoded on the grid.
    """
    options = options or OutputOptions()
    sources = _sources_for(source_files, labels.shape if grid is None else None)
    values = segment_values(label_values(labels) if present is None else present, declared)
    if not values:
        raise ValueError("the model declares no foreground label and none was predicted")
    numbers = _segment_numbers(labels, values)
    seg = _segmentation(
        sources, numbers, [label_for(declared, value) for value in values], algorithm, options, grid
    )
    for element in sources[0]:
        if element.tag.group == 0x0012 and int(element.tag) not in _SERIES_LEVEL_TRIAL_TAGS:
            seg[element.tag] = element
    deidentify(seg, options.deidentify)
    buffer = io.BytesIO()
    seg.save_as(buffer)
    data = buffer.getvalue()
    check_dicom_seg(data, [str(ds.SOPInstanceUID) for ds in sources], numbers, options, grid)
    return data


def _sources_for(source_files: Sequence[Path], shape: tuple[int, ...] | None) -> list[pydicom.Dataset]:
    """The source headers, checked against the prediction's (z, y, x) ``shape`` when given."""
    sources: list[pydicom.Dataset] = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_files]
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    frames = int(sources[0].get("NumberOfFrames", 1) or 1)
    slices = frames if len(sources) == 1 and frames > 1 else len(sources)
    if shape is not None and shape != (slices, rows, columns):
        raise ValueError(f"prediction shape {shape} does not match the source grid {(slices, rows, columns)}")
    if frames == 1:
        _fill_slice_thickness(sources)
    else:
        _share_frame_groups(sources[0])
    return sources


def _segmentation(
    sources: list[pydicom.Dataset],
    numbers: np.ndarray,
    labels: Sequence[SegmentLabel],
    algorithm: Algorithm,
    options: OutputOptions,
    grid: Geometry | None = None,
) -> hd.seg.Segmentation:
    """highdicom's Segmentation of ``numbers`` (segment numbers 1..n, one per label) on ``sources``."""
    kind = hd.seg.SegmentationTypeValues(options.segmentation_type)
    pixel_array: np.ndarray = numbers
    if kind is hd.seg.SegmentationTypeValues.FRACTIONAL:
        # One probability plane per segment: 1.0 inside, 0.0 outside.
        pixel_array = (numbers[..., None] == np.arange(1, len(labels) + 1)).astype(np.float32)
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        family=_AI_FAMILY,
        version=algorithm.version[:64],
        parameters=dict(algorithm.parameters) or None,
    )
    seed = options.uid_seed
    descriptions = [
        _description(number, label, identification, uid_for(seed, f"tracking {number}"))
        for number, label in enumerate(labels, start=1)
    ]
    series_number, series_description = output_series(sources[0], "seg", algorithm, seed)
    found = (
        f"{algorithm.name} automatic segmentation" if numbers.any() else f"{algorithm.name}: no segment found"
    )
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=kind,
        segment_descriptions=descriptions,
        series_instance_uid=uid_for(seed, "series"),
        series_number=series_number,
        sop_instance_uid=uid_for(seed, "instance"),
        instance_number=1,
        manufacturer="asyncflow",
        manufacturer_model_name=algorithm.name[:64],
        software_versions=f"asyncflow {__version__}",
        device_serial_number="0",
        series_description=series_description,
        content_label="NNUNET",
        content_description=found[:64],
        content_creator_name="asyncflow^",  # software, not a person: one component
        transfer_syntax_uid=_TRANSFER_SYNTAXES[options.compression],
        omit_empty_frames=not options.keep_empty_frames,
        **(seg_planes(grid) if grid is not None else {}),
    )


def _segment_numbers(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``labels`` with each value in ``values`` replaced by its segment number 1..n."""
    dtype = np.uint8 if len(values) < 256 else np.uint16
    if list(values) == list(range(1, len(values) + 1)):  # labels 1..n already are the numbers
        return labels if labels.dtype == dtype else labels.astype(dtype)
    lookup = np.zeros(max(int(labels.max()), max(values)) + 1, dtype=dtype)
    for number, value in enumerate(values, start=1):
        lookup[value] = number
    return lookup[labels]


def _description(
    number: int, label: SegmentLabel, identification: hd.AlgorithmIdentificationSequence, tracking_uid: str
) -> hd.seg.SegmentDescription:
    tracking_id = label.tracking_id or (label.name[:64] if label.tracking_uid else None)
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label.name[:64],
        segmented_property_category=_coded(label.category),
        segmented_property_type=_coded(label.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identification,
        # TrackingID and TrackingUID come together: a given id gets a UID of its own.
        tracking_id=tracking_id,
        tracking_uid=label.tracking_uid or (tracking_uid if tracking_id else None),
        anatomic_regions=[_coded(label.anatomic_region)] if label.anatomic_region else None,
        display_color=hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in label.rgb)),
    )
    if label.description:  # Segment Description (0062,0006), ST: what highdicom does not take
        description.SegmentDescription = label.description[:1024]
    if label.type_modifier is not None:  # highdicom takes no modifier: it goes into the type's item
        item = description.SegmentedPropertyTypeCodeSequence[0]
        item.SegmentedPropertyTypeModifierCodeSequence = [_coded(label.type_modifier)]
    return description


def _expected_frames(numbers: np.ndarray, segments: int, options: OutputOptions) -> int:
    """Frames highdicom writes: one per slice (LABELMAP) or per slice and segment, empty ones
    omitted unless asked for, or unless everything is empty (a SEG needs a frame)."""
    per_slice = 1 if options.segmentation_type == "LABELMAP" else segments
    if options.keep_empty_frames or not numbers.any():
        return numbers.shape[0] * per_slice
    if options.segmentation_type == "LABELMAP":
        return int(numbers.any(axis=(1, 2)).sum())
    return sum(int((numbers == n).any(axis=(1, 2)).sum()) for n in range(1, segments + 1))


def check_dicom_seg(
    data: bytes,
    source_sop_instance_uids: Sequence[str],
    numbers: np.ndarray,
    options: OutputOptions,
    grid: Geometry | None = None,
) -> None:
    """Read a SEG back: its sources, frame count and voxels (on its sources, or on ``grid``)
    must be what was meant."""
    seg = hd.seg.segread(io.BytesIO(data))
    referenced = {
        str(instance.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for instance in series.ReferencedInstanceSequence
    }
    if referenced != set(source_sop_instance_uids):
        raise SegCheckError(
            f"SEG references {len(referenced)} instances, the source series has {len(source_sop_instance_uids)}"
        )
    frames = int(seg.NumberOfFrames)
    expected = _expected_frames(numbers, len(seg.SegmentSequence), options)
    if frames != expected:
        raise SegCheckError(f"SEG has {frames} frames, {expected} expected")
    if grid is None:
        decoded, _ = _decode(seg, source_sop_instance_uids, numbers.shape[0])
    else:
        decoded = decode_on_grid(seg, grid)
    if not np.array_equal(decoded, numbers):
        raise SegCheckError(
            f"SEG decodes to other voxels than the prediction ({int((decoded != numbers).sum())} differ)"
        )


def _decode(
    seg: hd.seg.Segmentation, source_sop_instance_uids: Sequence[str], slices: int
) -> tuple[np.ndarray, dict[int, str]]:
    """Segment numbers (z, y, x) on the given source instances (or on the ``slices`` frames of
    one multi-frame source), and each segment's label."""
    fractional = seg.segmentation_type is hd.seg.SegmentationTypeValues.FRACTIONAL
    if len(source_sop_instance_uids) == 1 and slices > 1:
        pixels = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=source_sop_instance_uids[0],
            source_frame_numbers=list(range(1, slices + 1)),
            combine_segments=not fractional,
            assert_missing_frames_are_empty=True,  # empty frames may be omitted
        )
    else:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(source_sop_instance_uids),
            combine_segments=not fractional,
            assert_missing_frames_are_empty=True,
        )
    pixels = np.asarray(pixels)
    if fractional:  # (z, y, x, segment) probabilities: the segment that holds the voxel
        numbers = np.where(pixels.max(axis=-1) > 0.5, pixels.argmax(axis=-1) + 1, 0)
        pixels = numbers.astype(np.uint16)
    names = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    return pixels, names


def _share_frame_groups(source: pydicom.Dataset) -> None:
    """Give an in-memory multi-frame source whose pixel measures and plane orientation are the
    same in every frame's functional groups (as Philips writes them) those in its shared group,
    where highdicom reads them; the file is untouched."""
    per_frame = source.get("PerFrameFunctionalGroupsSequence") or []
    shared = (source.get("SharedFunctionalGroupsSequence") or [None])[0]
    if shared is None or not per_frame:
        return
    for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        items = [frame.get(keyword) for frame in per_frame]
        if keyword not in shared and items[0] and all(item == items[0] for item in items):
            shared[keyword] = per_frame[0][keyword]


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


def read_dicom_seg(
    data: bytes, source_sop_instance_uids: Sequence[str], source_frames: int = 1
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode a SEG onto its source instances, in the order given, or onto the frames
    1..``source_frames`` of its one multi-frame source.

    Returns a (z, y, x) array of segment numbers (0 where no segment) and each
    segment number's label.
    """
    return _decode(hd.seg.segread(io.BytesIO(data)), source_sop_instance_uids, source_frames)


class DicomSegWriter(Writer):
    """A DICOM case's label map as a DICOM SEG on its source images, the case's output. When it
    fails, the NIfTI writer keeps the label map, with the reason."""

    name = "dicom_seg"
    title = "DICOM SEG"
    folder = "dicom_seg"
    result_key = "dicom_seg_bytes"
    primary = True
    deliver = True

    def applies(self, job: LabelMap, made: Mapping[str, Artifact]) -> bool:
        return job.prepared.case.kind is SourceKind.DICOM

    def write(self, job: LabelMap, made: Mapping[str, Artifact]) -> Artifact:
        labels, grid = job.on_source
        data = dicom_seg_bytes(
            job.prepared.source_files, labels, job.definitions, job.algorithm, job.options, job.present, grid
        )
        return self.artifact(f"{job.stem}.dcm", data)

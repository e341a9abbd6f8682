"""A case's label map as a DICOM RT Structure Set, for radiotherapy planning systems.

One ROI per label present (name and colour from the label metadata; RTROIInterpretedType
from its category: ORGAN for an anatomical structure, else empty), its contours traced per
slice on the source images' own planes (scikit-image's marching squares at half a pixel:
around the label's pixel centres, holes as contours of their own, read by the even-odd rule),
each contour referencing its source image. Written with pydicom: RT Series, Frame of
Reference, Structure Set, ROI Contour, RT ROI Observations and SOP Common modules, the Patient
and Study modules copied from the source in its character set (de-identified as the SEG is),
its series numbered and described as :func:`asyncflow.writing.base.output_series` says, and
UIDs derived from the SEG's seed. Only for a series of single-frame images (a tilted one
included: the contours lie on its own images), not for a multi-frame image or a mosaic.
"""

from __future__ import annotations

import datetime
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian
from skimage import measure

from asyncflow._version import __version__
from asyncflow.artifact import Artifact
from asyncflow.labels.segment import ANATOMICAL_STRUCTURE, SegmentLabel, label_for
from asyncflow.writing.base import Algorithm, LabelMap, OutputOptions, Writer, output_series, uid_for
from asyncflow.writing.deidentify import deidentify

__all__ = ["RT_STRUCTURE_SET_STORAGE", "RtStructWriter", "contours_of", "rtstruct_bytes"]

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_COPIED = (  # the Patient and General Study modules, from the source
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
# RTROIInterpretedType (PS3.3 C.8.8.8) of a segment's category (CID 7150): an anatomical
# structure is an ORGAN; anything else (a lesion, tissue, a substance, a device) has no defined
# term that an automatic segmentation can claim (a lesion is no organ, and a target volume such
# as GTV is a clinician's decision): empty, which Type 2 allows and reads "not known".
_INTERPRETED_TYPE = {ANATOMICAL_STRUCTURE.value: "ORGAN"}


def contours_of(mask: np.ndarray) -> list[np.ndarray]:
    """The closed contours (each an (n, 2) array of (row, column), in pixels) around the
    pixel centres of a 2D ``mask``; holes are contours of their own."""
    padded = np.pad(mask.astype(np.uint8), 1)
    return [contour[:-1] - 1 for contour in measure.find_contours(padded, 0.5) if len(contour) > 3]


def _ascii(ds: Dataset) -> bool:
    """Whether every text of ``ds`` (its items' included) is ASCII."""
    return all(
        str(element.value).isascii()
        for element in ds.iterall()
        if element.VR in ("LO", "SH", "PN", "ST", "LT", "UC", "UT")
    )


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def rtstruct_bytes(
    source_files: Sequence[Path],
    labels: np.ndarray,
    declared: Mapping[int, SegmentLabel],
    algorithm: Algorithm,
    options: OutputOptions,
) -> bytes:
    """The RT Structure Set of ``labels`` ((z, y, x) on ``source_files``, in slice order)."""
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in source_files]
    if labels.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise ValueError(f"label map {labels.shape} is not on the {len(sources)} source images")
    first = sources[0]
    frame_of_reference = str(first.FrameOfReferenceUID)
    now = datetime.datetime.now(datetime.UTC)
    ds = Dataset()
    if "SpecificCharacterSet" in first:  # the copied names are written in the source's character set
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    for keyword in _COPIED:
        setattr(ds, keyword, first.get(keyword, ""))
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = uid_for(options.uid_seed, "rtstruct instance")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = uid_for(options.uid_seed, "rtstruct series")
    ds.SeriesNumber, ds.SeriesDescription = output_series(first, "rtstruct", algorithm, options.uid_seed)
    ds.OperatorsName = ""
    ds.Manufacturer = "asyncflow"
    ds.ManufacturerModelName = algorithm.name[:64]
    ds.SoftwareVersions = f"asyncflow {__version__}"
    ds.InstanceNumber = 1
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.FrameOfReferenceUID = frame_of_reference  # the Frame of Reference module: the source's
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel = "NNUNET"
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    images = [
        _item(ReferencedSOPClassUID=src.SOPClassUID, ReferencedSOPInstanceUID=src.SOPInstanceUID)
        for src in sources
    ]
    series = _item(SeriesInstanceUID=first.SeriesInstanceUID, ContourImageSequence=DicomSequence(images))
    study = _item(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",  # Detached Study Management, as PS3.3 asks
        ReferencedSOPInstanceUID=first.StudyInstanceUID,
        RTReferencedSeriesSequence=DicomSequence([series]),
    )
    ds.ReferencedFrameOfReferenceSequence = DicomSequence(
        [_item(FrameOfReferenceUID=frame_of_reference, RTReferencedStudySequence=DicomSequence([study]))]
    )
    rois, roi_contours, observations = [], [], []
    row, column = (np.asarray(first.ImageOrientationPatient[k : k + 3], dtype=np.float64) for k in (0, 3))
    spacing_between_rows, spacing_between_columns = (float(v) for v in first.PixelSpacing)
    for number, value in enumerate(sorted(int(v) for v in np.unique(labels) if v), start=1):
        label = label_for(declared, value)
        contours = []
        for k, src in enumerate(sources):
            origin = np.asarray(src.ImagePositionPatient, dtype=np.float64)
            for contour in contours_of(labels[k] == value):
                points = (
                    origin
                    + np.outer(contour[:, 1] * spacing_between_columns, row)
                    + np.outer(contour[:, 0] * spacing_between_rows, column)
                )
                contours.append(
                    _item(
                        ContourImageSequence=DicomSequence([images[k]]),
                        ContourGeometricType="CLOSED_PLANAR",
                        NumberOfContourPoints=len(points),
                        ContourData=[f"{v:.4f}" for v in points.ravel()],
                    )
                )
        rois.append(
            _item(
                ROINumber=number,
                ReferencedFrameOfReferenceUID=frame_of_reference,
                ROIName=label.name[:64],
                ROIGenerationAlgorithm="AUTOMATIC",
            )
        )
        roi_contours.append(
            _item(
                ROIDisplayColor=[round(255 * c) for c in label.rgb],
                ReferencedROINumber=number,
                ContourSequence=DicomSequence(contours),
            )
        )
        observations.append(
            _item(
                ObservationNumber=number,
                ReferencedROINumber=number,
                RTROIInterpretedType=_INTERPRETED_TYPE.get(label.category.value, ""),
                ROIInterpreter="",
            )
        )
    if not rois:
        raise ValueError("no label was predicted: an RT Structure Set needs a structure")
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    if "SpecificCharacterSet" not in ds and not _ascii(ds):  # names of our own (labels) beyond ASCII
        ds.SpecificCharacterSet = "ISO_IR 192"
    deidentify(ds, options.deidentify)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class RtStructWriter(Writer):
    """Asked for: beside each DICOM SEG of a series of single-frame images, its label map as an
    RT Structure Set."""

    name = "rtstruct"
    title = "RT Structure Set"
    folder = "dicom_seg"
    beside = "dicom_seg"
    result_key = "dicom_rtstruct_bytes"
    report_field = "rtstruct"
    deliver = True
    optional = True
    flag = "--rtstruct"
    setting = "rtstruct"
    help = (
        "beside each DICOM SEG, its label map as a DICOM RT Structure Set (contours per source "
        "image, <case>.rtstruct.dcm), for radiotherapy planning systems; sent with the SEG under --send"
    )

    def write(self, job: LabelMap, made: Mapping[str, Artifact]) -> Artifact:
        labels, grid = job.on_source
        if grid is not None or job.prepared.frame_order is not None:
            return self.missing(
                "an RT Structure Set needs a series of single-frame images (not a multi-frame image or a mosaic)"
            )
        data = rtstruct_bytes(job.prepared.source_files, labels, job.definitions, job.algorithm, job.options)
        return self.artifact(f"{job.stem}.rtstruct.dcm", data)

"""Synthetic CT-like phantoms, written as DICOM series, TAR archives and NIfTI.

One generator serves the tiny model's training script, ``asyncflow demo`` and the
tests, so the model is always asked about the kind of image it was trained on.

A phantom is a noisy body with a bright ellipsoid (label 1, "liver") and a dark
sphere inside it (label 2, "tumor"). Its centre sits off the middle along z, so
a volume whose slices were stacked in the wrong order no longer matches its
ground truth.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "Phantom",
    "dicom_series_datasets",
    "dicom_series_tar",
    "make_phantom",
    "nifti_bytes",
    "replanned_model",
]

BACKGROUND_HU = 0.0
LIVER_HU = 140.0
TUMOR_HU = 30.0
NOISE_HU = 25.0
REFERENCE_EXTENT_MM = 64.0


@dataclass(frozen=True)
class Phantom:
    """A synthetic volume in SimpleITK array order (z, y, x) with its geometry."""

    image: np.ndarray  # int16, Hounsfield units
    labels: np.ndarray  # uint8: 0 background, 1 liver, 2 tumor
    spacing: tuple[float, float, float]  # (x, y, z) in mm, SimpleITK order
    origin: tuple[float, float, float]  # (x, y, z) in mm
    # The liver ellipsoid's (labels 1 and 2) analytic volume, 4/3 pi abc in ml, where the volume holds it whole.
    liver_ml: float = 0.0


def make_phantom(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (64, 64, 64),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin: tuple[float, float, float] = (-32.0, -32.0, -40.0),
) -> Phantom:
    """Draw one phantom; ``shape`` is (z, y, x), ``spacing`` and ``origin`` are (x, y, z)."""
    nz, ny, nx = shape
    sx, sy, sz = spacing
    extent = np.array([nz * sz, ny * sy, nx * sx])  # mm along (z, y, x)
    zz, yy, xx = np.meshgrid(
        (np.arange(nz) + 0.5) * sz,
        (np.arange(ny) + 0.5) * sy,
        (np.arange(nx) + 0.5) * sx,
        indexing="ij",
    )
    # Off-centre along z (30-42 % of the extent), roughly central in-plane.
    centre = extent * np.array([rng.uniform(0.30, 0.42), rng.uniform(0.42, 0.58), rng.uniform(0.42, 0.58)])
    # Object sizes are absolute (as in the 64 mm training volumes), whatever the extent.
    radii = REFERENCE_EXTENT_MM * rng.uniform(0.18, 0.26, size=3)
    ellipsoid = (
        ((zz - centre[0]) / radii[0]) ** 2
        + ((yy - centre[1]) / radii[1]) ** 2
        + ((xx - centre[2]) / radii[2]) ** 2
    ) <= 1.0
    # The tumour sits inside the liver, towards its upper (higher z) half.
    tumor_radius = float(min(radii) * rng.uniform(0.45, 0.6))
    offset = radii * np.array([rng.uniform(0.2, 0.4), rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2)])
    tumor_centre = centre + offset
    tumor = (
        (zz - tumor_centre[0]) ** 2 + (yy - tumor_centre[1]) ** 2 + (xx - tumor_centre[2]) ** 2
    ) <= tumor_radius**2
    labels = np.zeros(shape, dtype=np.uint8)
    labels[ellipsoid] = 1
    labels[ellipsoid & tumor] = 2
    image = np.full(shape, BACKGROUND_HU, dtype=np.float32)
    image[labels == 1] = LIVER_HU
    image[labels == 2] = TUMOR_HU
    image += rng.normal(0.0, NOISE_HU, size=shape).astype(np.float32)
    return Phantom(
        image=np.round(image).astype(np.int16),
        labels=labels,
        spacing=spacing,
        origin=origin,
        liver_ml=float(4 / 3 * np.pi * np.prod(radii) / 1000),
    )


def dicom_series_datasets(
    phantom: Phantom,
    *,
    patient_name: str = "Demo^Synthetic",
    patient_id: str = "SYNTH-0001",
    series_number: int = 1,
    study_uid: str | None = None,
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    slice_shift: Sequence[float] = (0.0, 0.0, 0.0),
) -> list[FileDataset]:
    """One CT Image Storage instance per slice, in slice order (along the slice normal).

    ``orientation`` is ImageOrientationPatient (row and column direction cosines);
    slice k lies at ``origin + k * spacing_z * normal``.

    InstanceNumber counts *down* along z, as on many head-first scanners, so code
    that sorts by InstanceNumber stacks the volume upside down. ``slice_shift``
    (mm per slice, patient coordinates) moves each slice sideways as a gantry
    tilt does.
    """
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_of_reference_uid = generate_uid()
    sx, sy, sz = phantom.spacing
    ox, oy, oz = phantom.origin
    nz, ny, nx = phantom.image.shape
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    datasets = []
    for k in range(nz):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = "SYNTH"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.Modality = "CT"
        ds.Manufacturer = "asyncflow synthetic"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = nz - k
        ds.AcquisitionNumber = 1
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "ABDOMEN"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        position = np.array([ox, oy, oz]) + k * (sz * normal + np.asarray(slice_shift, dtype=float))
        ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceLocation = round(float(np.dot(position, normal)), 4)
        ds.SliceThickness = sz
        ds.PixelSpacing = [sy, sx]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        stored = np.clip(phantom.image[k].astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        datasets.append(ds)
    return datasets


def dicom_series_tar(
    series: Sequence[Sequence[FileDataset]],
    *,
    compression: str = "gz",
    folder: str = "DICOM",
) -> bytes:
    """Pack DICOM series into one TAR, files without extension in shuffled order."""
    buffer = io.BytesIO()
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(fileobj=buffer, mode=mode) as tar:  # type: ignore[call-overload]
        for s, datasets in enumerate(series):
            # Names sort opposite to the slice order: a reader that trusts names fails.
            for k, ds in reversed(list(enumerate(datasets))):
                payload = io.BytesIO()
                pydicom.dcmwrite(payload, ds, enforce_file_format=True)
                data = payload.getvalue()
                info = tarfile.TarInfo(f"{folder}/S{s + 1:02d}/IM{len(datasets) - k:05d}")
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def nifti_bytes(image: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> bytes:
    """Encode a (z, y, x) array as .nii.gz bytes with the given (x, y, z) geometry."""
    itk_image = sitk.GetImageFromArray(image)
    itk_image.SetSpacing(tuple(float(s) for s in spacing))
    itk_image.SetOrigin(tuple(float(o) for o in origin))
    with tempfile.TemporaryDirectory(prefix="asyncflow-nifti-") as tmp:
        path = Path(tmp) / "image.nii.gz"
        sitk.WriteImage(itk_image, str(path), useCompression=True)
        return path.read_bytes()


def replanned_model(target: Path, spacing_zyx: Sequence[float]) -> Path:
    """A copy of the packaged tiny model whose ``3d_fullres`` configuration is planned at
    ``spacing_zyx`` mm, so that nnU-Net resamples as it does for real CT (benchmarks and tests:
    its weights were trained at 1 mm)."""
    from asyncflow.settings import packaged_demo_model

    shutil.copytree(packaged_demo_model(), target)
    plans = json.loads((target / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = list(spacing_zyx)
    plans["original_median_spacing_after_transp"] = list(spacing_zyx)
    (target / "plans.json").write_text(json.dumps(plans, indent=1))
    return target

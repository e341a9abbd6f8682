"""Prepare one case as nnU-Net input: one image per channel in memory and, for backends that
read files, ``<case_id>_0000.nii.gz``, ``_0001`` ...

Writing is the expensive part: gzip dominates a .nii.gz write (measured here for a
512x512x200 CT: 3.05 s at level 1, 0.06 s uncompressed, and 1.0 s to read it back),
so the v2 backend takes the images from memory and nothing is written for it.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import SimpleITK as sitk

from asyncflow.case import Case, DicomInstance, Geometry, PreparedCase, Shear
from asyncflow.enums import SourceKind
from asyncflow.reading.dicom import (
    frame_pixel_spacing,
    frame_rescale,
    mosaic_tiles,
    order_positions,
    order_series,
    slice_normal,
)
from asyncflow.reading.names import NIFTI_SUFFIXES
from asyncflow.reading.tilt import shear_of, untilted

__all__ = ["prepare_case"]

# Level 1 keeps most of gzip's size gain at a fraction of its time (nnU-Net v1 wants .nii.gz).
_COMPRESSION_LEVEL = 1
_NIFTI1_MAX_SIZE = 32767  # NIfTI-1 stores each axis' size as int16


def _prepared(
    case: Case,
    workdir: Path,
    images: list[sitk.Image],
    sources: list[Path],
    write_files: bool,
    frame_order: list[int] | None = None,
) -> PreparedCase:
    files = []
    if write_files:
        for number, image in enumerate(images):
            files.append(workdir / f"{case.case_id}_{number:04d}.nii.gz")
            sitk.WriteImage(image, str(files[-1]), useCompression=True, compressionLevel=_COMPRESSION_LEVEL)
    prepared = PreparedCase(case, workdir, images, Geometry.of(images[0]), files, sources, frame_order)
    prepared.intensities = images[0]
    return prepared


def _check_volume(image: sitk.Image, what: str) -> None:
    if image.GetDimension() != 3:
        raise ValueError(f"{what} is {image.GetDimension()}D; a 3D volume is needed")


def _with_nifti_suffix(source: Path, workdir: Path, number: int) -> Path:
    """The source under a name SimpleITK reads as NIfTI (it picks readers by suffix).

    Inputs are recognised by content, so a NIfTI may arrive as ``input-3`` or an
    S3 key without suffix: it is then linked into the case folder as ``.nii(.gz)``.
    """
    if source.name.lower().endswith(NIFTI_SUFFIXES):
        return source
    with source.open("rb") as f:
        suffix = ".nii.gz" if f.read(2) == b"\x1f\x8b" else ".nii"
    link = workdir / f"source_{number:04d}{suffix}"
    link.symlink_to(source.resolve())
    return link


def _as_nifti1(source: Path, workdir: Path, number: int) -> Path:
    """``source``, or for a NIfTI-2 file a NIfTI-1 copy in the case folder: SimpleITK reads NIfTI-1
    only. The copy keeps voxels (scaled as nibabel scales them), affines and their codes."""
    with source.open("rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    with (gzip.open if compressed else open)(source, "rb") as f:
        if f.read(8)[4:8] != b"n+2\0":
            return source
    try:
        image = nibabel.Nifti2Image.from_filename(source)
    except Exception as exc:  # nibabel raises many types; the case fails with the reason
        raise ValueError(f"NIfTI-2 channel {number} cannot be read: {type(exc).__name__}: {exc}") from exc
    if any(size > _NIFTI1_MAX_SIZE for size in image.shape):
        raise ValueError(
            f"NIfTI-2 channel {number} of size {image.shape} is larger than NIfTI-1 allows "
            f"({_NIFTI1_MAX_SIZE} voxels per axis), which the reader needs"
        )
    copy = nibabel.Nifti1Image(np.asanyarray(image.dataobj), None)
    copy.set_qform(image.get_qform(), int(image.header["qform_code"]))
    copy.set_sform(image.get_sform(), int(image.header["sform_code"]))
    copy.header.set_xyzt_units(*image.header.get_xyzt_units())
    target = workdir / f"nifti1_{number:04d}.nii"
    nibabel.save(copy, target)
    return target


def _multiframe_volume(
    instance: DicomInstance, frames: tuple[int, ...] | None
) -> tuple[sitk.Image, list[int]]:
    """An enhanced multi-frame image (or the ``frames`` of one of its volumes) as a volume in
    slice order, and the frame of each slice."""
    assert instance.orientation is not None
    chosen = list(frames) if frames is not None else list(range(instance.frames))
    positions = [instance.frame_positions[k] for k in chosen]
    order = [chosen[k] for k in order_positions(positions, instance.orientation, "frames")]
    ds = pydicom.dcmread(instance.path)
    stored = ds.pixel_array.reshape(instance.frames, instance.rows, instance.columns)
    rescale = [frame_rescale(ds, k) for k in order]
    integral = all(float(s).is_integer() and float(i).is_integer() for s, i in rescale)
    volume = np.stack(
        [stored[k] * slope + intercept for k, (slope, intercept) in zip(order, rescale, strict=True)]
    )
    image = sitk.GetImageFromArray(volume.astype(np.int16 if integral else np.float32))
    row_spacing, column_spacing = frame_pixel_spacing(ds)
    normal = slice_normal(instance.orientation)
    first, second = (np.asarray(instance.frame_positions[k], dtype=float) for k in order[:2])
    image.SetSpacing((column_spacing, row_spacing, float(np.dot(second - first, normal))))
    image.SetOrigin(instance.frame_positions[order[0]])
    row, column = np.asarray(instance.orientation[:3]), np.asarray(instance.orientation[3:6])
    image.SetDirection(tuple(np.column_stack([row, column, normal]).ravel()))
    return image, order


def _mosaic_volume(instance: DicomInstance) -> sitk.Image:
    """A Siemens mosaic's tiles as a volume, placed as nibabel.nicom places them (from the CSA
    header's slice count and normal)."""
    if instance.mosaic < 1:
        raise ValueError(
            "Siemens mosaic (ImageType MOSAIC) whose CSA header does not give NumberOfImagesInMosaic: "
            "its tiles cannot be placed; convert the series with dcm2niix and send the NIfTI"
        )
    try:
        data, affine = mosaic_tiles(instance.path)
    except Exception as exc:  # nibabel raises many types; the case fails with the reason
        raise ValueError(
            f"Siemens mosaic of {instance.mosaic} slices cannot be untiled ({type(exc).__name__}: {exc}); "
            "convert the series with dcm2niix and send the NIfTI"
        ) from exc
    volume = data.transpose(2, 0, 1)  # nibabel's (row, column, slice) -> (z, y, x)
    integral = np.array_equal(volume, np.rint(volume)) and np.abs(volume).max() <= np.iinfo(np.int16).max
    image = sitk.GetImageFromArray(volume.astype(np.int16 if integral else np.float32))
    steps = np.linalg.norm(affine[:3, :3], axis=0)  # mm per row, per column, per slice
    image.SetSpacing((float(steps[1]), float(steps[0]), float(steps[2])))
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    axes = affine[:3, :3] / steps
    image.SetDirection(tuple(np.column_stack([axes[:, 1], axes[:, 0], axes[:, 2]]).ravel()))
    return image


def _single_frame_volume(case: Case) -> tuple[sitk.Image, list[Path], Shear | None]:
    """A series of single-frame images as a volume, its files in slice order, and the shear
    of a gantry-tilted series, which the volume is resampled from (:mod:`asyncflow.reading.tilt`)."""
    ordered = order_series(case.instances, tilted=True)
    paths = [i.path for i in ordered]
    image = _read_series(paths)
    orientation = ordered[0].orientation
    assert orientation is not None
    spacing = image.GetSpacing()
    shear = shear_of([i.position for i in ordered], orientation, (spacing[1], spacing[0]))  # type: ignore[misc]
    if shear is None:
        return image, paths, None
    normal = slice_normal(orientation)
    first, last = (np.asarray(i.position, dtype=float) for i in (ordered[0], ordered[-1]))
    volume = sitk.GetArrayViewFromImage(image)
    (row, column), _ = shear.extent(volume.shape)
    upright = sitk.GetImageFromArray(untilted(volume, shear))
    upright.SetSpacing((spacing[0], spacing[1], float(np.dot(last - first, normal)) / (len(ordered) - 1)))
    along_row, along_column = np.asarray(orientation[:3]), np.asarray(orientation[3:6])
    upright.SetOrigin(tuple(first + column * spacing[0] * along_row + row * spacing[1] * along_column))
    upright.SetDirection(tuple(np.column_stack([orientation[:3], orientation[3:6], normal]).ravel()))
    return upright, paths, shear


def _read_series(paths: list[Path]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(path) for path in paths])
    image = reader.Execute()
    _check_volume(image, "DICOM series")
    if image.GetSize()[2] != len(paths):
        raise ValueError(f"series of {len(paths)} slices read as {image.GetSize()[2]}")
    return image


def _read_nifti(source: Path, workdir: Path, number: int) -> sitk.Image:
    try:
        image = sitk.ReadImage(str(_as_nifti1(source, workdir, number)))
    except RuntimeError as exc:
        raise ValueError(f"NIfTI channel {number} cannot be read") from exc
    _check_volume(image, f"NIfTI channel {number}")
    return image


def prepare_case(case: Case, workdir: Path, write_files: bool = True) -> PreparedCase:
    """Read the case's source as model input; with ``write_files``, also as nnU-Net's input files
    inside ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    first = case.instances[0] if case.kind is SourceKind.DICOM else None
    if first is not None and first.frames > 1:
        image, frame_order = _multiframe_volume(first, case.frames)
        return _prepared(case, workdir, [image], [first.path], write_files, frame_order)
    if first is not None and first.mosaic:
        return _prepared(case, workdir, [_mosaic_volume(first)], [first.path], write_files)
    if first is not None:
        image, paths, shear = _single_frame_volume(case)
        prepared = _prepared(case, workdir, [image], paths, write_files)
        prepared.shear = shear
        return prepared

    sources = [_with_nifti_suffix(source, workdir, number) for number, source in enumerate(case.files)]
    images = [_read_nifti(source, workdir, number) for number, source in enumerate(sources)]
    reference = images[0]
    for number, image in enumerate(images[1:], start=1):
        if image.GetSize() != reference.GetSize():
            raise ValueError(
                f"NIfTI channel {number} has size {image.GetSize()}, channel 0 {reference.GetSize()}"
            )
    return _prepared(case, workdir, images, sources, write_files)

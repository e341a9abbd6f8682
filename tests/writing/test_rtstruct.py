"""Each SEG's label map as an RT Structure Set: accepted by dciodvfy, and its contours, filled
again by the even-odd rule, give back the label map the SEG holds (Dice per label)."""

from __future__ import annotations

import io
from pathlib import Path

import anyio
import numpy as np
import pydicom
from helpers import dciodvfy_lines, dice, dicom_bytes, make_tar
from skimage.draw import polygon

from asyncflow import run_request
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.labels.segment import color_for
from asyncflow.writing.rtstruct import contours_of
from asyncflow.writing.seg import read_dicom_seg


def _filled(structure: pydicom.Dataset, datasets: list[pydicom.Dataset], roi_number: int) -> np.ndarray:
    """One ROI's contours, each on the image it references, filled (even-odd: a hole is a contour)."""
    slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(datasets)}
    shape = (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns))
    mask = np.zeros(shape, dtype=bool)
    (roi,) = [r for r in structure.ROIContourSequence if r.ReferencedROINumber == roi_number]
    for contour in roi.ContourSequence:
        k = slice_of[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
        ds = datasets[k]
        points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3) - np.asarray(
            ds.ImagePositionPatient, dtype=np.float64
        )
        cosines = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        rows = points @ cosines[3:] / float(ds.PixelSpacing[0])
        columns = points @ cosines[:3] / float(ds.PixelSpacing[1])
        layer = np.zeros(shape[1:], dtype=bool)
        layer[polygon(rows, columns, shape[1:])] = True
        mask[k] ^= layer
    return mask


def test_contours_keep_holes_as_contours_of_their_own() -> None:
    ring = np.zeros((20, 20), dtype=bool)
    ring[4:16, 4:16] = True
    ring[8:12, 8:12] = False
    contours = contours_of(ring)
    assert len(contours) == 2
    filled = np.zeros_like(ring)
    for contour in contours:
        layer = np.zeros_like(ring)
        layer[polygon(contour[:, 0], contour[:, 1], ring.shape)] = True
        filled ^= layer
    assert dice(filled, ring) >= 0.95 and not filled[9, 9]


def test_the_model_s_labels_come_back_from_the_rtstruct(
    tmp_path: Path, settings_factory, loaded_backend, rng: np.random.Generator
) -> None:
    phantom = make_phantom(rng, (32, 32, 32))
    datasets = dicom_series_datasets(phantom)
    tar = make_tar({f"ct/{k:03d}": dicom_bytes(ds) for k, ds in enumerate(datasets)})
    settings = settings_factory(tmp_path / "work", outputs=("rtstruct",))
    result = anyio.run(lambda: run_request([tar], settings, backend=loaded_backend))
    (case,) = result.report()["cases"]
    assert case["rtstruct"] == "input-0.rtstruct.dcm" and "rtstruct_error" not in case
    data = result.dicom_rtstruct_bytes["input-0.rtstruct.dcm"]
    structure = pydicom.dcmread(io.BytesIO(data))
    assert structure.Modality == "RTSTRUCT" and structure.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert structure.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    numbers, names = read_dicom_seg(
        result.dicom_seg_bytes["input-0.dcm"], [str(ds.SOPInstanceUID) for ds in datasets]
    )
    rois = {str(roi.ROIName): int(roi.ROINumber) for roi in structure.StructureSetROISequence}
    assert sorted(rois) == sorted(names.values()) == ["liver", "tumor"]
    colours = {
        int(r.ReferencedROINumber): [int(v) for v in r.ROIDisplayColor] for r in structure.ROIContourSequence
    }
    for number, name in names.items():
        assert colours[rois[name]] == [round(255 * c) for c in color_for(name)]
        # The contours, filled again, are the SEG's label: the same voxels but at the edges.
        assert dice(_filled(structure, datasets, rois[name]), numbers == number) >= 0.95, name
    (tmp_path / "rt.dcm").write_bytes(data)
    assert dciodvfy_lines(tmp_path / "rt.dcm") == []

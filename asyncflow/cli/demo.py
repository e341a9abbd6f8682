"""``asyncflow demo``: synthetic CT archives and a NIfTI through the built-in tiny model.

The demo writes its inputs to ``<output>/inputs`` (so they can be run again with
``asyncflow run``), segments them, and scores every output against the
phantoms' ground truth: a real model, real files, a checkable answer.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from asyncflow.cli.synthetic import (
    Phantom,
    dicom_series_datasets,
    dicom_series_tar,
    make_phantom,
    nifti_bytes,
)
from asyncflow.writing.nifti import read_nifti_seg
from asyncflow.writing.seg import read_dicom_seg

__all__ = ["DemoInputs", "score", "write_demo_inputs"]


@dataclass
class DemoInputs:
    paths: list[Path]
    # DICOM ground truth by SeriesInstanceUID: (labels in slice order, SOPInstanceUIDs in slice order)
    dicom_truth: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)
    nifti_truth: dict[str, np.ndarray] = field(default_factory=dict)  # by output name


def write_demo_inputs(folder: Path, seed: int = 7) -> DemoInputs:
    """Two TAR archives of CT series (three series) and one NIfTI volume."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    inputs = DemoInputs(paths=[])
    plan: list[tuple[str, str, list[Phantom]]] = [
        ("ct_study_a.tar.gz", "gz", [make_phantom(rng, (56, 64, 64))]),
        ("ct_study_b.tar", "", [make_phantom(rng, (64, 64, 64)), make_phantom(rng, (48, 64, 64))]),
    ]
    for name, compression, phantoms in plan:
        series = []
        for number, phantom in enumerate(phantoms, start=1):
            datasets = dicom_series_datasets(phantom, series_number=number)
            inputs.dicom_truth[str(datasets[0].SeriesInstanceUID)] = (
                phantom.labels,
                [str(ds.SOPInstanceUID) for ds in datasets],
            )
            series.append(datasets)
        path = folder / name
        path.write_bytes(dicom_series_tar(series, compression=compression))
        inputs.paths.append(path)
    phantom = make_phantom(rng, (64, 64, 64))
    path = folder / "phantom_nifti.nii.gz"
    path.write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
    inputs.paths.append(path)
    inputs.nifti_truth["phantom_nifti.nii.gz"] = phantom.labels
    return inputs


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def score(output: Path, inputs: DemoInputs, label_values: dict[str, int]) -> dict[str, dict[str, float]]:
    """Dice per output file in ``output`` (as ``asyncflow run`` writes it) and label name, against
    the phantoms' ground truth."""
    scores: dict[str, dict[str, float]] = {}
    for path in sorted((output / "dicom_seg").glob("*.dcm")):
        data = path.read_bytes()
        series_uid = str(pydicom.dcmread(io.BytesIO(data)).ReferencedSeriesSequence[0].SeriesInstanceUID)
        truth, sop_uids = inputs.dicom_truth[series_uid]
        numbers, names = read_dicom_seg(data, sop_uids)
        predicted = np.zeros_like(truth)
        for number, label in names.items():
            predicted[numbers == number] = label_values[label]
        scores[path.name] = {
            label: _dice(predicted == value, truth == value) for label, value in label_values.items()
        }
    for path in sorted((output / "nifti_seg").glob("*.nii.gz")):
        truth = inputs.nifti_truth[path.name]
        predicted = sitk.GetArrayFromImage(read_nifti_seg(path.read_bytes()))
        scores[path.name] = {
            label: _dice(predicted == value, truth == value) for label, value in label_values.items()
        }
    return scores

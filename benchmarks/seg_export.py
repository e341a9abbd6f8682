"""Time DICOM SEG export of one 512x512x200 CT series, with and without the read-back self-check.

    python benchmarks/seg_export.py

Writes a synthetic series to a temporary folder, then builds the BINARY SEG of a
large ellipsoid label map (14 % of the voxels, on 139 slices) twice per run.
Not a test: it prints what it measured.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

import asyncflow.writing.seg as seg
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.labels.segment import labels_from_dataset_json


def main() -> None:
    rng = np.random.default_rng(0)
    datasets = dicom_series_datasets(make_phantom(rng, (200, 512, 512), spacing=(0.8, 0.8, 1.5)))
    folder = Path(tempfile.mkdtemp(prefix="asyncflow-bench-"))
    paths = []
    for k, ds in enumerate(datasets):
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        paths.append(folder / f"f{k}")
        paths[-1].write_bytes(buffer.getvalue())
    z, y, x = np.ogrid[:200, :512, :512]
    labels = np.zeros((200, 512, 512), np.uint8)
    labels[((z - 100) / 70) ** 2 + ((y - 250) / 150) ** 2 + ((x - 200) / 170) ** 2 < 1] = 1
    labels[((z - 110) / 15) ** 2 + ((y - 260) / 30) ** 2 + ((x - 220) / 25) ** 2 < 1] = 2
    declared = labels_from_dataset_json({"labels": {"background": 0, "liver": 1, "tumor": 2}})
    algorithm = seg.Algorithm("nnU-Net Benchmark", "nnunetv2", {})
    check = seg.check_dicom_seg
    for run in range(3):
        started = time.perf_counter()
        data = seg.dicom_seg_bytes(paths, labels, declared, algorithm)
        with_check = time.perf_counter() - started
        seg.check_dicom_seg = lambda *args, **kwargs: None  # type: ignore[assignment]
        started = time.perf_counter()
        seg.dicom_seg_bytes(paths, labels, declared, algorithm)
        without = time.perf_counter() - started
        seg.check_dicom_seg = check
        print(
            f"run {run}: {with_check:.2f} s with the self-check, {without:.2f} s without; {len(data) / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    main()

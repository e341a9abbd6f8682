"""One predicted case to its outputs: DICOM SEG (+ MITK label JSON) or NIfTI.

A plain synchronous function the pipeline runs in a worker thread. Label
metadata is merged here, per case: the model's labels, the user's label
configuration, then a ``*.mitklabel.json`` supplied with the case's input.
When the SEG of a DICOM case cannot be written (or fails its self-check), the
prediction is still returned, as NIfTI in the series' geometry, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from asyncflow.case import PredictedCase, PreparedCase
from asyncflow.enums import DeidentifyProfile, OutputFormat, SourceKind
from asyncflow.labels.config import merge_labels
from asyncflow.labels.mitk import MITK_SUFFIX, mitk_label_json, read_mitk_labels
from asyncflow.labels.segment import SegmentLabel, label_for
from asyncflow.log import Stopwatch
from asyncflow.reading.prepare import source_image
from asyncflow.reading.tilt import to_source_grid
from asyncflow.stats.measure import LabelStatistics, measure_labels
from asyncflow.writing.nifti import nifti_seg_bytes
from asyncflow.writing.rtstruct import rtstruct_bytes
from asyncflow.writing.seg import Algorithm, SegOptions, dicom_seg_bytes, label_values, segment_values
from asyncflow.writing.sr import measurement_report_bytes

if TYPE_CHECKING:
    from asyncflow.backends.base import ModelSteps

__all__ = ["Exported", "export_case", "export_output"]


@dataclass(frozen=True)
class Exported:
    name: str  # <case>.dcm or <case>.nii.gz
    data: bytes
    labels_present: list[int]
    labels_absent: list[int]  # declared by the model, not found in the prediction
    label_json: tuple[str, bytes] | None = None  # <case>.mitklabel.json beside a SEG
    fallback: str | None = None  # why a DICOM case came out as NIfTI
    statistics: list[LabelStatistics] | None = None  # None when they could not be measured
    statistics_error: str | None = None  # why not
    sr: tuple[str, bytes] | None = None  # <case>.sr.dcm: the measurements as DICOM SR, beside the SEG
    sr_error: str | None = None  # why a SEG asked to have one has none
    rtstruct: tuple[str, bytes] | None = None  # <case>.rtstruct.dcm: the label map as RT Structure Set
    rtstruct_error: str | None = None  # why a SEG asked to have one has none

    @property
    def format(self) -> OutputFormat:
        return OutputFormat.DICOM_SEG if self.name.endswith(".dcm") else OutputFormat.NIFTI


def export_case(
    predicted: PredictedCase,
    model_labels: Mapping[int, SegmentLabel],
    label_config: Mapping[int, Mapping[str, Any]],
    algorithm: Algorithm,
    options: SegOptions,
) -> Exported:
    prepared = predicted.prepared
    case = prepared.case
    present = label_values(predicted.labels)
    absent = sorted(set(model_labels) - set(present))
    if case.kind is not SourceKind.DICOM:
        data = nifti_seg_bytes(predicted.labels, prepared.geometry, prepared.workdir / "seg.nii.gz")
        return Exported(f"{case.output_name}.nii.gz", data, present, absent)
    try:
        return _dicom_outputs(predicted, model_labels, label_config, algorithm, options, present, absent)
    except Exception as exc:  # noqa: BLE001 - the prediction is kept as NIfTI, with the reason
        # The nnU-Net input has the series' geometry in slice order, as the prediction.
        data = nifti_seg_bytes(predicted.labels, prepared.geometry, prepared.workdir / "seg.nii.gz")
        reason = f"DICOM SEG failed ({type(exc).__name__}: {exc}); written as NIfTI"
        return Exported(f"{case.output_name}.nii.gz", data, present, absent, fallback=reason)


def export_output(
    prepared: PreparedCase,
    output: Any,
    steps: ModelSteps | None,
    model_labels: Mapping[int, SegmentLabel],
    label_config: Mapping[int, Mapping[str, Any]],
    algorithm: Algorithm,
    options: SegOptions,
) -> tuple[Exported, dict[str, float]]:
    """The export stage's work for one case: the backend's output to a label map on the source
    grid (``steps.to_labels``; v2: nnU-Net's resampling and argmax), :func:`export_case`, then the
    label statistics on the source voxels, read again (a failure there keeps the outputs, with the
    reason). The seconds of the first and last step come back beside the outputs."""
    watch = Stopwatch()
    labels = output if steps is None else steps.to_labels(prepared, output)
    to_labels_s = watch.seconds
    exported = export_case(PredictedCase(prepared, labels), model_labels, label_config, algorithm, options)
    watch = Stopwatch()
    try:
        image = source_image(prepared)  # held while its voxels are read through the view
        definitions = merge_labels(model_labels, label_config)
        spacing = prepared.geometry.spacing
        statistics = measure_labels(labels, sitk.GetArrayViewFromImage(image), spacing, definitions)
        exported = replace(exported, statistics=statistics)
    except Exception as exc:  # noqa: BLE001 - the segmentation is kept; the report says why
        exported = replace(exported, statistics_error=f"{type(exc).__name__}: {exc}")
    if options.measurement_report and exported.format is OutputFormat.DICOM_SEG:
        exported = _with_measurement_report(
            prepared, exported, model_labels, label_config, algorithm, options
        )
    return exported, {"to_labels_s": to_labels_s, "statistics_s": watch.seconds}


def _with_measurement_report(
    prepared: PreparedCase,
    exported: Exported,
    model_labels: Mapping[int, SegmentLabel],
    label_config: Mapping[int, Mapping[str, Any]],
    algorithm: Algorithm,
    options: SegOptions,
) -> Exported:
    """``exported`` with its SR (or the reason it has none: the SEG is kept either way)."""
    if exported.statistics is None:
        return replace(exported, sr_error=f"no measurements: {exported.statistics_error}")
    try:
        values = segment_values(exported.labels_present, merge_labels(model_labels, label_config))
        segments = {value: number for number, value in enumerate(values, start=1)}
        data = measurement_report_bytes(
            exported.data, prepared.source_files, exported.statistics, segments, algorithm, options
        )
    except Exception as exc:  # noqa: BLE001 - the SEG is kept; the report says why
        return replace(exported, sr_error=f"{type(exc).__name__}: {exc}")
    return replace(exported, sr=(f"{prepared.case.output_name}.sr.dcm", data))


def _dicom_outputs(
    predicted: PredictedCase,
    model_labels: Mapping[int, SegmentLabel],
    label_config: Mapping[int, Mapping[str, Any]],
    algorithm: Algorithm,
    options: SegOptions,
    present: list[int],
    absent: list[int],
) -> Exported:
    prepared = predicted.prepared
    case = prepared.case
    sources: list[Mapping[int, Mapping[str, Any]]] = [label_config]
    if case.label_file is not None:
        sources.append(read_mitk_labels(case.label_file.read_bytes(), case.label_file.name))
    labels = merge_labels(model_labels, *sources)
    on_source, grid = predicted.labels, None
    if case.frames is not None or case.instances[0].mosaic:  # slices that are not the source's frames
        grid = prepared.geometry
    elif prepared.shear is not None:  # a tilted series: back onto its sheared grid
        shape = (len(prepared.source_files), case.instances[0].rows, case.instances[0].columns)
        on_source = to_source_grid(predicted.labels, prepared.shear, shape)
    elif prepared.frame_order is not None:  # a multi-frame source: its frames in their own order
        on_source = np.empty_like(predicted.labels)
        on_source[prepared.frame_order] = predicted.labels
    data = dicom_seg_bytes(prepared.source_files, on_source, labels, algorithm, options, present, grid)
    described = [label_for(labels, v) for v in segment_values(present, labels)]
    references = [path.name for path in prepared.source_files]
    if options.deidentify != DeidentifyProfile.NONE:
        # File names may carry the patient's name; the SOPInstanceUIDs stay in the SEG anyway.
        uids = {instance.path: instance.sop_instance_uid for instance in case.instances}
        references = [uids[path] for path in prepared.source_files]
    label_json = mitk_label_json(described, references, series_description=algorithm.series_description)
    exported = Exported(
        f"{case.output_name}.dcm", data, present, absent, (f"{case.output_name}{MITK_SUFFIX}", label_json)
    )
    if not options.rtstruct:
        return exported
    if grid is not None or prepared.frame_order is not None:
        reason = (
            "an RT Structure Set needs a series of single-frame images (not a multi-frame image or a mosaic)"
        )
        return replace(exported, rtstruct_error=reason)
    try:
        structures = rtstruct_bytes(prepared.source_files, on_source, labels, algorithm, options)
    except Exception as exc:  # noqa: BLE001 - the SEG is kept; the report says why
        return replace(exported, rtstruct_error=f"{type(exc).__name__}: {exc}")
    return replace(exported, rtstruct=(f"{case.output_name}.rtstruct.dcm", structures))

"""A case's measurements as DICOM SR: a TID 1500 Measurement Report (highdicom) beside its SEG.

One Comprehensive 3D SR per DICOM SEG, as Kaapana's and dcmqi's readers expect it: a
measurement group (TID 1411) per segment, naming the SEG's segment and its source
series, with the label's volume (SNOMED CT Volume, UCUM ``ml``) and its intensity (CT:
DICOM's Attenuation Coefficient in Hounsfield units; MR: MR signal intensity) as its
mean, standard deviation and median (SNOMED CT derivations) — the figures of
``statistics.csv`` (:mod:`asyncflow.stats.measure`). Each group's Finding is its segment's
property type and its Finding Site the segment's anatomic region (an anatomical structure's:
the structure), with the type's laterality, as in the SEG. The observer is the device asyncflow; the contributing equipment is the source's
scanner (acquisition) and highdicom (creation). The SR is de-identified as the SEG is, its
series numbered and described as :func:`asyncflow.writing.base.output_series` says, and its UIDs
derive from the same seed.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from asyncflow._version import __version__
from asyncflow.artifact import Artifact
from asyncflow.labels.segment import ANATOMICAL_STRUCTURE, SegmentLabel, label_for, segment_values
from asyncflow.labels.segment import Code as LabelCode
from asyncflow.stats.measure import LabelStatistics
from asyncflow.writing.base import Algorithm, LabelMap, OutputOptions, Writer, output_series, uid_for
from asyncflow.writing.deidentify import deidentify

__all__ = ["MeasurementReportWriter", "measurement_report_bytes"]

MILLILITER = Code("ml", "UCUM", "milliliter")
# Modality -> (what the intensity is, its unit); other modalities get the volume alone.
_INTENSITY = {
    "CT": (codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit),
    "MR": (codes.DCM.MRSignalIntensity, Code("{signal}", "UCUM", "signal")),
}


def _measurements(statistics: LabelStatistics, modality: str | None) -> list[hd.sr.Measurement]:
    found = [hd.sr.Measurement(name=codes.SCT.Volume, value=statistics.volume_ml, unit=MILLILITER)]
    if modality in _INTENSITY and statistics.voxels:
        name, unit = _INTENSITY[modality]
        for derivation, value in (
            (codes.SCT.Mean, statistics.intensity_mean),
            (codes.SCT.StandardDeviation, statistics.intensity_sd),
            (codes.SCT.Median, statistics.intensity_p50),
        ):
            if value is not None:
                found.append(hd.sr.Measurement(name=name, value=value, unit=unit, derivation=derivation))
    return found


def _code(code: LabelCode) -> Code:
    return Code(code.value, code.scheme, code.meaning)


def _finding_sites(label: SegmentLabel) -> list[hd.sr.FindingSite] | None:
    """Where the segment lies: its anatomic region, or, for an anatomical structure, the
    structure itself; with its type's laterality (CID 244)."""
    site = label.anatomic_region
    if site is None and label.category.value == ANATOMICAL_STRUCTURE.value:
        site = label.type
    if site is None:
        return None
    laterality = _code(label.type_modifier) if label.type_modifier is not None else None
    return [hd.sr.FindingSite(_code(site), laterality=laterality)]


def measurement_report_bytes(
    seg_bytes: bytes,
    source_files: Sequence[Path],
    statistics: Sequence[LabelStatistics],
    segments: Mapping[int, int],
    definitions: Mapping[int, SegmentLabel],
    algorithm: Algorithm,
    options: OutputOptions,
) -> bytes:
    """The SR of ``statistics`` (per label value) for the segments of the SEG ``seg_bytes``
    (``segments``: label value -> segment number; ``definitions``: the labels' codes), on the
    SEG's study and sources."""
    seg = pydicom.dcmread(io.BytesIO(seg_bytes))
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in source_files]
    modality = str(sources[0].get("Modality", "")) or None
    source_series = hd.sr.SourceSeriesForSegmentation(str(sources[0].SeriesInstanceUID))
    groups = []
    for label in statistics:
        if label.label not in segments:
            continue
        number, defined = segments[label.label], label_for(definitions, label.label)
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uid_for(options.uid_seed, f"sr tracking {number}"),
                    identifier=f"segment {number}: {label.name}",
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=number,
                    source_series=source_series,
                ),
                finding_type=_code(defined.type),
                finding_sites=_finding_sites(defined),
                measurements=_measurements(label, modality),
            )
        )
    if not groups:
        raise ValueError("no segment of the SEG has measurements")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid_for(options.uid_seed, "sr device"), name="asyncflow", model_name=algorithm.name[:64]
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    series_number, series_description = output_series(sources[0], "sr", algorithm, options.uid_seed)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg],  # the first: whose equipment acquired the images (highdicom)
        content=report,
        series_instance_uid=uid_for(options.uid_seed, "sr series"),
        series_number=series_number,
        sop_instance_uid=uid_for(options.uid_seed, "sr instance"),
        instance_number=1,
        manufacturer="asyncflow",
        is_complete=True,
        software_versions=f"asyncflow {__version__}",
        series_description=series_description,
    )
    deidentify(sr, options.deidentify)
    buffer = io.BytesIO()
    sr.save_as(buffer)
    return buffer.getvalue()


class MeasurementReportWriter(Writer):
    """Asked for: beside each DICOM SEG, its measurements as a TID 1500 Measurement Report."""

    name = "sr"
    title = "DICOM SR"
    folder = "dicom_seg"
    beside = "dicom_seg"
    result_key = "dicom_sr_bytes"
    report_field = "measurement_report"
    deliver = True
    optional = True
    flag = "--sr"
    setting = "measurement_report"
    help = (
        "beside each DICOM SEG, its label volumes and intensities as a DICOM SR (TID 1500 "
        "Measurement Report, <case>.sr.dcm), sent with the SEG under --send"
    )

    def write(self, job: LabelMap, made: Mapping[str, Artifact]) -> Artifact:
        seg, statistics = made["dicom_seg"], made.get("statistics")
        if statistics is None or not statistics.made:
            reason = statistics.error if statistics is not None else "not measured"
            return self.missing(f"no measurements: {reason}")
        measured = [LabelStatistics.from_dict(row) for row in statistics.report["statistics"]]
        values = segment_values(job.present, job.definitions)
        segments = {value: number for number, value in enumerate(values, start=1)}
        assert seg.data is not None
        data = measurement_report_bytes(
            seg.data,
            job.prepared.source_files,
            measured,
            segments,
            job.definitions,
            job.algorithm,
            job.options,
        )
        return self.artifact(f"{job.stem}.sr.dcm", data)

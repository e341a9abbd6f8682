"""Every kind of output, in the order they are written: the one list that says what a case gives.

A writer comes after those whose artifacts it reads (the label file, SR and RT
Structure Set read the SEG's; the NIfTI writer takes over when the SEG failed;
the SR reads the statistics). :func:`write_outputs` runs each writer that
applies to a case (an optional one only when asked for) and keeps whatever the
others made when one fails. Adding an output is a writer module and a line in
:data:`WRITERS`; the ledger, result, report, journal, sender, command line,
settings and FLAME bundle take it from here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace

from asyncflow.artifact import Artifact
from asyncflow.log import Stopwatch
from asyncflow.writing.base import LabelMap, Writer
from asyncflow.writing.labelfile import MitkLabelWriter
from asyncflow.writing.nifti import NiftiWriter
from asyncflow.writing.rtstruct import RtStructWriter
from asyncflow.writing.seg import DicomSegWriter
from asyncflow.writing.sr import MeasurementReportWriter
from asyncflow.writing.statistics import StatisticsWriter

__all__ = [
    "OPTIONAL",
    "WRITERS",
    "contract_keys",
    "folders",
    "outputs_summary",
    "report_defaults",
    "result_keys",
    "write_outputs",
]

WRITERS: tuple[Writer, ...] = (
    DicomSegWriter(),
    MitkLabelWriter(),
    NiftiWriter(),
    StatisticsWriter(),
    MeasurementReportWriter(),
    RtStructWriter(),
)
# The writers that run only when asked for, by name.
OPTIONAL: dict[str, Writer] = {writer.name: writer for writer in WRITERS if writer.optional}


def write_outputs(job: LabelMap) -> list[Artifact]:
    """Every output of one case, in :data:`WRITERS` order; one that fails is an artifact with its
    error, and the others are still written. When no writer could make the case's output (its
    primary artifact), that writer's error is raised: the case fails with it."""
    made: dict[str, Artifact] = {}
    lost: Exception | None = None  # the last error of a primary writer
    for writer in WRITERS:
        if writer.optional and writer.name not in job.options.extras:
            continue
        if not writer.applies(job, made):
            continue
        watch = Stopwatch()
        try:
            artifact = writer.write(job, made)
        except Exception as exc:  # noqa: BLE001 - this output is missing, with the reason; the others stay
            artifact = writer.missing(f"{type(exc).__name__}: {exc}")
            lost = exc if writer.primary else lost
        made[writer.name] = replace(artifact, seconds=watch.seconds)
    if lost is not None and not any(a.primary and a.made for a in made.values()):
        raise lost
    return list(made.values())


def result_keys() -> list[str]:
    """The result's maps of output files (``dicom_seg_bytes`` ...), each present in every result."""
    return [writer.result_key for writer in WRITERS if writer.result_key is not None]


def contract_keys() -> list[str]:
    """The result maps of the cases' outputs (``dicom_seg_bytes``, ``nifti_seg_bytes``): the
    result contract's, which every asyncflow result has held."""
    return [writer.result_key for writer in WRITERS if writer.primary and writer.result_key is not None]


def folders() -> list[tuple[str, str]]:
    """(folder, result key) of each result map: where its files go in an output folder or bundle."""
    return [(writer.folder, writer.result_key) for writer in WRITERS if writer.result_key is not None]


def report_defaults() -> dict[str, object]:
    """The output fields every case's report holds before its outputs are written."""
    defaults: dict[str, object] = {}
    for writer in WRITERS:
        defaults.update(writer.report_defaults)
    return defaults


def outputs_summary(artifacts: Iterable[Artifact]) -> str:
    """``3 DICOM SEG, 1 NIfTI``: the cases' outputs (primary artifacts) by kind, each kind named."""
    counts = Counter(artifact.writer for artifact in artifacts if artifact.primary and artifact.made)
    titles: Mapping[str, str] = {writer.name: writer.title for writer in WRITERS if writer.primary}
    return ", ".join(f"{counts[name]} {title}" for name, title in titles.items())

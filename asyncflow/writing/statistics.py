"""Each label's measurements (:mod:`asyncflow.stats.measure`) on the source's intensities, as
report data: the case report's ``statistics`` (or ``statistics_error``), ``statistics.csv`` and
what the SR reports. A failure keeps the case's other outputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import SimpleITK as sitk

from asyncflow.artifact import Artifact
from asyncflow.stats.measure import measure_labels
from asyncflow.writing.base import LabelMap, Writer

__all__ = ["StatisticsWriter"]


class StatisticsWriter(Writer):
    name = "statistics"
    title = "statistics"
    report_field = "statistics"
    report_defaults: ClassVar[Mapping[str, object]] = {"statistics": None}

    def write(self, job: LabelMap, made: Mapping[str, Artifact]) -> Artifact:
        if job.intensities is None:
            raise ValueError("the source's intensities are not at hand")
        voxels = sitk.GetArrayViewFromImage(job.intensities)  # the image is held by the job
        spacing = job.prepared.geometry.spacing
        measured = measure_labels(job.labels, voxels, spacing, job.definitions)
        return self.artifact(None, None, statistics=[label.as_dict() for label in measured])

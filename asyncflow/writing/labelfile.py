"""The MITK label stack JSON beside each DICOM SEG: its segments' names, values and colours, and
the source images it was made on (by SOPInstanceUID when the SEG is de-identified: file names
may carry a patient's name)."""

from __future__ import annotations

import io
from collections.abc import Mapping

import pydicom

from asyncflow.artifact import Artifact
from asyncflow.enums import DeidentifyProfile
from asyncflow.labels.mitk import MITK_SUFFIX, mitk_label_json
from asyncflow.labels.segment import label_for, segment_values
from asyncflow.writing.base import LabelMap, Writer

__all__ = ["MitkLabelWriter"]


class MitkLabelWriter(Writer):
    name = "mitk_label"
    title = "MITK label file"
    folder = "dicom_seg"
    beside = "dicom_seg"
    result_key = "label_json_bytes"

    def write(self, job: LabelMap, made: Mapping[str, Artifact]) -> Artifact:
        prepared = job.prepared
        described = [label_for(job.definitions, v) for v in segment_values(job.present, job.definitions)]
        references = [path.name for path in prepared.source_files]
        if job.options.deidentify != DeidentifyProfile.NONE:
            uids = {instance.path: instance.sop_instance_uid for instance in prepared.case.instances}
            references = [uids[path] for path in prepared.source_files]
        seg = made["dicom_seg"].data
        assert seg is not None
        header = pydicom.dcmread(
            io.BytesIO(seg), stop_before_pixels=True, specific_tags=["SeriesDescription"]
        )
        description = str(header.get("SeriesDescription", ""))  # the SEG's (none when de-identified)
        data = mitk_label_json(described, references, series_description=description)
        return self.artifact(f"{job.stem}{MITK_SUFFIX}", data)

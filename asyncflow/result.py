"""What a request gives back: the result contract, the per-case report, progress.

Kept apart from the orchestrator (:mod:`asyncflow.pipeline.run`) so that the CLI,
the demo, the FLAME shell and the Hub reporter read results without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from asyncflow.case import CaseReport, SkippedFile
from asyncflow.enums import RequestStatus

__all__ = ["Progress", "Result"]


@dataclass(frozen=True)
class Progress:
    """Sent after every case that ends, and after every object fetched (or given up) when the
    request's inputs are objects in a store; ``total`` is None until all inputs are assembled."""

    done: int
    failed: int
    total: int | None
    fetched: int = 0  # objects whose fetch has ended, fetched or lost
    objects: int = 0  # objects the request fetches (0: its inputs came as bytes or files)


@dataclass
class Result:
    request_id: str
    status: RequestStatus
    dicom_seg_bytes: dict[str, bytes]
    nifti_seg_bytes: dict[str, bytes]
    label_json_bytes: dict[str, bytes]  # <case>.mitklabel.json beside each DICOM SEG
    cases: list[CaseReport]
    inputs: list[dict[str, Any]]
    skipped: list[SkippedFile]
    duration_s: float
    error: str | None = None  # why the request ended before its cases did (status error)
    model: dict[str, Any] | None = None  # name, framework and parameters of what produced the outputs
    dicom_sr_bytes: dict[str, bytes] = field(default_factory=dict)  # <case>.sr.dcm: measurements as SR
    dicom_rtstruct_bytes: dict[str, bytes] = field(default_factory=dict)  # <case>.rtstruct.dcm

    def report(self) -> dict[str, Any]:
        """JSON-serialisable account of every input, case and skipped file (what of it may leave
        a FLAME node: :func:`asyncflow.flame.redact.redact_report`)."""
        return {
            "request_id": self.request_id,
            "status": self.status,
            "duration_s": round(self.duration_s, 3),
            "error": self.error,
            "model": self.model,
            "cases": [c.as_dict() for c in self.cases],
            "inputs": self.inputs,
            "skipped_files": [s.as_dict() for s in self.skipped],
        }

    def as_dict(self) -> dict[str, Any]:
        """The reference result contract plus the report (see :meth:`report`)."""
        return {
            "status": self.status,
            "dicom_seg_bytes": self.dicom_seg_bytes,
            "nifti_seg_bytes": self.nifti_seg_bytes,
            "label_json_bytes": self.label_json_bytes,
            "dicom_sr_bytes": self.dicom_sr_bytes,
            "dicom_rtstruct_bytes": self.dicom_rtstruct_bytes,
            "report": self.report(),
        }

"""What a request gives back: the result contract, the per-case report, progress.

Kept apart from the orchestrator (:mod:`asyncflow.pipeline.run`) so that the CLI,
the demo, the FLAME shell and the Hub reporter read results without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    known: int = 0  # cases assembled so far (``total`` once every input is read)
    inputs_read: int = 0  # inputs unpacked and assembled, or lost
    inputs: int = 0  # the request's inputs


@dataclass
class Result:
    """A request's outcome. ``files`` holds the output files by result map (``dicom_seg_bytes``,
    ``nifti_seg_bytes`` ... : one per kind of output file, :mod:`asyncflow.writing.registry`), each
    ``{name: bytes}``, and each is also an attribute: ``result.dicom_seg_bytes``."""

    request_id: str
    status: RequestStatus
    files: dict[str, dict[str, bytes]]
    cases: list[CaseReport]
    inputs: list[dict[str, Any]]
    skipped: list[SkippedFile]
    duration_s: float
    error: str | None = None  # why the request ended before its cases did (status error)
    model: dict[str, Any] | None = None  # name, framework and parameters of what produced the outputs

    def __getattr__(self, name: str) -> dict[str, bytes]:
        files = self.__dict__.get("files")
        if files is not None and name in files:
            return files[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
        """The reference result contract (``status``, ``dicom_seg_bytes``, ``nifti_seg_bytes``) with
        every other map of output files, plus the report (see :meth:`report`)."""
        return {"status": self.status, **self.files, "report": self.report()}

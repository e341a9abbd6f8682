"""One output of a case: what a writer (:mod:`asyncflow.writing.registry`) made, or why it did not;
and what became of a case's DICOM objects at a PACS (:mod:`asyncflow.delivery.pacs`).

The ledger, the result, the report, the journal, the sender and the FLAME bundle
handle every output through this one type, never by its kind: a new output is a
writer, not a new field in each of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

__all__ = ["Artifact", "Delivery"]


@dataclass(frozen=True)
class Artifact:
    """An output of one case.

    ``writer`` names the writer that made it (its kind: ``dicom_seg``, ``nifti``, ``sr`` ...);
    ``folder`` and ``name`` are where its file goes in an output folder and in the FLAME bundle
    (no ``name``: the output is report data alone, as the statistics are); ``data`` its bytes
    (None once booked or read back from a journal); ``result_key`` the result map that holds it
    (``dicom_seg_bytes`` ...); ``report`` the fields it puts in its case's report; ``error`` why
    it was asked for and not made. ``primary``: the case's output (the report's ``output``);
    ``deliver``: sent to a PACS with the case; ``seconds``: what its writer took; ``model``: which
    of several models made it (its tag; None for a request of one model).
    """

    writer: str
    folder: str = ""
    name: str | None = None
    data: bytes | None = field(default=None, repr=False)
    result_key: str | None = None
    report: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    primary: bool = False
    deliver: bool = False
    seconds: float = 0.0  # its writer's
    model: str | None = None

    @property
    def made(self) -> bool:
        return self.error is None

    def without_data(self) -> Artifact:
        return replace(self, data=None) if self.data is not None else self

    def record(self) -> dict[str, Any]:
        """Plain data for a journal line (everything but the bytes)."""
        return {
            "writer": self.writer,
            "folder": self.folder,
            "name": self.name,
            "result_key": self.result_key,
            "report": dict(self.report),
            "error": self.error,
            "primary": self.primary,
            "deliver": self.deliver,
            "seconds": self.seconds,
            **({"model": self.model} if self.model is not None else {}),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Artifact:
        """The inverse of :meth:`record`; KeyError or TypeError for a record that is not one."""
        name, key, error = record["name"], record["result_key"], record["error"]
        if not isinstance(record["report"], Mapping):
            raise TypeError("an artifact's report is a mapping")
        return cls(
            writer=str(record["writer"]),
            folder=str(record["folder"]),
            name=None if name is None else str(name),
            result_key=None if key is None else str(key),
            report=dict(record["report"]),
            error=None if error is None else str(error),
            primary=bool(record["primary"]),
            deliver=bool(record["deliver"]),
            seconds=float(record.get("seconds") or 0.0),
            model=None if record.get("model") is None else str(record["model"]),
        )


@dataclass(frozen=True)
class Delivery:
    """What became of one case's objects at its destination."""

    destination: str
    status: Literal["sent", "failed"]
    objects: int
    tries: int
    duration_s: float
    reason: str | None = None

    @property
    def sent(self) -> bool:
        return self.status == "sent"

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "destination": self.destination,
            "status": self.status,
            "objects": self.objects,
            "tries": self.tries,
            "duration_s": round(self.duration_s, 3),
        }
        if self.reason is not None:
            entry["reason"] = self.reason
        return entry

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Delivery:
        """The inverse of :meth:`as_dict` (a report's or a journal line's ``delivery``)."""
        status: Literal["sent", "failed"] = "sent" if entry["status"] == "sent" else "failed"
        return cls(
            str(entry["destination"]),
            status,
            int(entry["objects"]),
            int(entry["tries"]),
            float(entry["duration_s"]),
            entry.get("reason"),
        )

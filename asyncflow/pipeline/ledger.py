"""The books of one request: each case's report, what it wrote, its end, progress, the Result.

A case is opened when it leaves assembly and ends once, done or failed with a
reason (``case.failed``, ``case.finished``). A case the assembly withdraws (its
series grew or lost an input after it was made) is forgotten with whatever it
wrote: a partial volume is never returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from asyncflow.case import Case, CaseReport, SkippedFile
from asyncflow.enums import CaseStatus, OutputFormat, RequestStatus, Stage
from asyncflow.log import get_logger, scrub
from asyncflow.result import Progress, Result

if TYPE_CHECKING:
    from asyncflow.reading.archives import UnpackedInput
    from asyncflow.writing.export import Exported

__all__ = ["Ledger", "case_identity"]

# Told of a withdrawn case's key and the (folder, name) outputs it had written.
OnWithdraw = Callable[[str | None, list[tuple[str, str]]], None]

log = get_logger(__name__)


def case_identity(case: Case) -> dict[str, Any]:
    """What names a case in its events without patient data: series UID, number, modality, part."""
    return case.source.event_fields() if case.source else {}


class Ledger:
    """Reports, outputs and inputs of one request, and the :class:`Result` they make."""

    def __init__(
        self,
        on_progress: Callable[[Progress], None] | None,
        *,
        keep_bytes: bool = True,
        on_withdraw: OnWithdraw | None = None,
        on_stage: Callable[[str, str | None, Progress], None] | None = None,
        objects: int = 0,
        model: dict[str, Any] | None = None,
    ) -> None:
        self.on_progress = on_progress
        self.model = model  # the report's: what produced the outputs (asyncflow.pipeline.keys)
        self.on_stage = on_stage  # told when a case enters a stage, and when it ends (None), with the counts
        self.keep_bytes = keep_bytes  # False: outputs went to a sink, the Result names them only
        self.on_withdraw = on_withdraw  # told of the outputs a withdrawn case had written
        self.reports: dict[str, CaseReport] = {}
        self.keys: dict[str, str | None] = {}  # case id -> its key (asyncflow.pipeline.keys)
        self.withdrawn: set[str] = set()  # case ids whose results must not be returned
        # case id -> its outputs: (the Result's map, folder in an output folder, name)
        self.written: dict[str, list[tuple[dict[str, bytes], str, str]]] = {}
        self.inputs: list[dict[str, Any]] = []  # the report's, one per input read
        self.dicom: dict[str, bytes] = {}
        self.nifti: dict[str, bytes] = {}
        self.label_json: dict[str, bytes] = {}
        self.dicom_sr: dict[str, bytes] = {}
        self.dicom_rtstruct: dict[str, bytes] = {}
        self.total: int | None = None  # cases, once every input is assembled
        self.objects = objects  # inputs to fetch from a store
        self.fetched = 0  # of those, the ones whose fetch has ended

    def add_input(self, unpacked: UnpackedInput) -> None:
        """An input has been read (or failed to be): the report's entry for it."""
        item = unpacked.item
        self.inputs.append(
            {
                "index": item.index,
                "name": item.name,
                "kind": unpacked.kind,
                "files": len(unpacked.files),
                "bytes": item.size,
                "error": unpacked.error,
                "failure": unpacked.failure,
            }
        )

    def fetch_ended(self) -> None:
        """One more object of the request is on disk, or lost: progress says so."""
        self.fetched += 1
        if self.on_progress is not None:
            self.on_progress(self.progress())

    def assembled(self) -> int:
        """Every input is assembled: the number of cases is final (and known to progress)."""
        self.total = len(self.live_reports())
        return self.total

    def open(self, case: Case, key: str | None) -> None:
        """A case leaves assembly, with its key (None when a source's hash is unknown)."""
        self.reports[case.case_id] = CaseReport(case.case_id, case.kind, case.origin, source=case.source)
        self.keys[case.case_id] = key
        log.info(
            "case.assembled",
            case_id=case.case_id,
            kind=str(case.kind),
            files=len(case.files),
            **case_identity(case),
        )

    def enter(self, case: Case, stage: Stage) -> None:
        """``case`` is now in ``stage`` (for a live display)."""
        if self.on_stage is not None:
            self.on_stage(case.case_id, str(stage), self.progress())

    def progress(self) -> Progress:
        statuses = [r.status for r in self.live_reports()]
        return Progress(
            done=statuses.count(CaseStatus.DONE) + statuses.count(CaseStatus.RESUMED),
            failed=statuses.count(CaseStatus.FAILED),
            total=self.total,
            fetched=self.fetched,
            objects=self.objects,
        )

    def add_seconds(self, case: Case, stage: Stage, seconds: float) -> None:
        """A stage may take several steps (prepare: read, then the model's preprocessing)."""
        stage_s = self.reports[case.case_id].stage_s
        stage_s[stage] = stage_s.get(stage, 0.0) + seconds

    def seconds(self, case: Case, stage: Stage) -> float:
        return self.reports[case.case_id].stage_s[stage]

    def report(self, case: Case) -> CaseReport:
        return self.reports[case.case_id]

    def key(self, case: Case) -> str | None:
        return self.keys.get(case.case_id)

    def is_withdrawn(self, case: Case) -> bool:
        return case.case_id in self.withdrawn

    def end(self, case: Case, *, stage: Stage | None = None, error: Exception | None = None) -> None:
        """Book a case as done or failed (a withdrawn case is forgotten), report progress."""
        if case.case_id in self.withdrawn:
            self.forget(case.case_id)
            return
        report = self.reports[case.case_id]
        if error is not None:
            report.status = CaseStatus.FAILED
            report.error = f"{stage}: {type(error).__name__}: {error}"
            report.error_stage, report.error_type = stage, type(error).__name__
            log.warning(
                "case.failed",
                stage=stage,
                error_type=type(error).__name__,
                reason=scrub(str(error)),
                **case_identity(case),
            )
        else:
            report.status = CaseStatus.DONE
        self._finished(case, report)

    def resume(self, case: Case, earlier: Mapping[str, Any], outputs: list[tuple[str, str]]) -> None:
        """Book a case an earlier run finished (its journal line's report): its ``outputs``
        ((folder, name) in the output folder) are kept, and go if the case is withdrawn."""
        self.written[case.case_id] = [({}, folder, name) for folder, name in outputs]
        report = self.reports[case.case_id]
        report.status = CaseStatus.RESUMED
        report.output = earlier.get("output")
        report.labels_present = list(earlier.get("labels_present") or [])
        report.labels_absent = list(earlier.get("labels_absent") or [])
        report.fallback = earlier.get("fallback")
        report.statistics = earlier.get("statistics")
        report.measurement_report = earlier.get("measurement_report")
        report.rtstruct = earlier.get("rtstruct")
        report.delivery = earlier.get("delivery")  # sent: a resumed case is never sent again
        log.info("case.resumed", case_id=case.case_id, **case_identity(case))
        self._finished(case, report)

    def _finished(self, case: Case, report: CaseReport) -> None:
        if self.on_stage is not None:
            self.on_stage(case.case_id, None, self.progress())
        log.info(
            "case.finished",
            case_id=case.case_id,  # not bound for a resumed case: it never entered a stage
            status=str(report.status),
            kind=str(report.kind),
            **case_identity(case),
            **{f"{stage}_s": round(seconds, 4) for stage, seconds in report.stage_s.items()},
        )
        if self.on_progress is not None:
            self.on_progress(self.progress())

    def keep(self, case: Case, exported: Exported) -> list[tuple[str, str, bytes]]:
        """Book what a case's export made (its output, and a label file beside a SEG), name it in
        the case's report; the files as (output folder, name, bytes)."""
        kept = self.dicom if exported.format is OutputFormat.DICOM_SEG else self.nifti
        files = [(kept, exported.format.folder, exported.name, exported.data)]
        if exported.label_json is not None:  # beside its SEG
            files.append((self.label_json, OutputFormat.DICOM_SEG.folder, *exported.label_json))
        if exported.sr is not None:  # its measurements as DICOM SR, beside its SEG
            files.append((self.dicom_sr, OutputFormat.DICOM_SEG.folder, *exported.sr))
        if exported.rtstruct is not None:  # its label map as an RT Structure Set, beside its SEG
            files.append((self.dicom_rtstruct, OutputFormat.DICOM_SEG.folder, *exported.rtstruct))
        for outputs, where, name, data in files:
            if self.keep_bytes:
                outputs[name] = data
            self.written.setdefault(case.case_id, []).append((outputs, where, name))
        report = self.reports[case.case_id]
        report.output, report.fallback = exported.name, exported.fallback
        report.labels_present, report.labels_absent = exported.labels_present, exported.labels_absent
        if exported.statistics is not None:
            report.statistics = [label.as_dict() for label in exported.statistics]
        report.statistics_error = exported.statistics_error
        report.measurement_report = exported.sr[0] if exported.sr is not None else None
        report.measurement_report_error = exported.sr_error
        report.rtstruct = exported.rtstruct[0] if exported.rtstruct is not None else None
        report.rtstruct_error = exported.rtstruct_error
        return [(where, name, data) for _, where, name, data in files]

    def withdraw(self, case: Case) -> None:
        """Drop a case the assembly withdrew: now if it has ended, else when it ends."""
        self.withdrawn.add(case.case_id)
        log.info("case.withdrawn", case_id=case.case_id)
        if self.reports[case.case_id].status is not CaseStatus.PENDING:
            self.forget(case.case_id)

    def forget(self, case_id: str) -> None:
        self.reports.pop(case_id, None)
        if self.on_stage is not None:
            self.on_stage(case_id, None, self.progress())
        written = self.written.pop(case_id, [])
        # A file of the same name another case wrote since (the grown series' case) stays.
        claimed = {(where, name) for files in self.written.values() for _, where, name in files}
        written = [entry for entry in written if (entry[1], entry[2]) not in claimed]
        for outputs, _, name in written:
            outputs.pop(name, None)
        if written and self.on_withdraw is not None:
            self.on_withdraw(self.keys.get(case_id), [(where, name) for _, where, name in written])

    def live_reports(self) -> list[CaseReport]:
        """Reports of the cases that count: all but the withdrawn."""
        return [r for case_id, r in self.reports.items() if case_id not in self.withdrawn]

    def result(
        self,
        request_id: str,
        duration_s: float,
        skipped: list[SkippedFile],
        status: RequestStatus | None = None,
        error: str | None = None,
    ) -> Result:
        """The result so far; ``status`` overrides the one the cases and inputs give (cancelled,
        error), ``error`` says why the request ended early."""
        reports = sorted(self.live_reports(), key=lambda r: r.case_id)
        failed = sum(r.status not in (CaseStatus.DONE, CaseStatus.RESUMED) for r in reports)
        # An input that could not be read, or whose members were refused, is lost like a failed case.
        lost_inputs = any(i["error"] for i in self.inputs) or any(s.refused for s in skipped)
        # A case segmented whose outputs did not reach their PACS is not done as asked.
        undelivered = any(r.delivery is not None and r.delivery["status"] != "sent" for r in reports)
        if status is None:
            status = (
                RequestStatus.FAILED
                if failed == len(reports)
                else RequestStatus.PARTIAL
                if failed or lost_inputs or undelivered
                else RequestStatus.DONE
            )
        return Result(
            request_id=request_id,
            status=status,
            dicom_seg_bytes=self.dicom,
            nifti_seg_bytes=self.nifti,
            label_json_bytes=self.label_json,
            dicom_sr_bytes=self.dicom_sr,
            dicom_rtstruct_bytes=self.dicom_rtstruct,
            cases=reports,
            inputs=sorted(self.inputs, key=lambda i: i["index"]),
            skipped=skipped,
            duration_s=duration_s,
            error=error,
            model=self.model,
        )

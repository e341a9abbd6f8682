"""The books of one request: each case's report, what it wrote, its end, progress, the Result.

A case is opened when it leaves assembly and ends once, done or failed with a
reason (``case.failed``, ``case.finished``). A case the assembly withdraws (its
series grew or lost an input after it was made) is forgotten with whatever it
wrote: a partial volume is never returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from asyncflow.artifact import Artifact, Delivery
from asyncflow.case import Case, CaseReport, SkippedFile
from asyncflow.enums import CaseStatus, InputFailure, RequestStatus, Stage
from asyncflow.log import get_logger, scrub
from asyncflow.reading.archives import UnpackedInput
from asyncflow.reading.request import InputItem
from asyncflow.result import Progress, Result
from asyncflow.writing.registry import report_defaults, result_keys

__all__ = ["Labels", "Ledger", "case_identity"]

# The values a label map holds (present) and those its model declares that it does not (absent).
Labels = tuple[list[int], list[int]]

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
        items: Sequence[InputItem] = (),
    ) -> None:
        self.on_progress = on_progress
        self.model = model  # the report's: what produced the outputs (asyncflow.pipeline.keys)
        self.on_stage = on_stage  # told when a case enters a stage, and when it ends (None), with the counts
        self.keep_bytes = keep_bytes  # False: outputs went to a sink, the Result names them only
        self.on_withdraw = on_withdraw  # told of the outputs a withdrawn case had written
        self.reports: dict[str, CaseReport] = {}
        self.keys: dict[str, str | None] = {}  # case id -> its key (asyncflow.pipeline.keys)
        self.withdrawn: set[str] = set()  # case ids whose results must not be returned
        self.started: set[str] = set()  # case ids in a stage, not ended
        # case id -> the files it wrote: (the Result's map they are in, folder in an output folder, name)
        self.written: dict[str, list[tuple[str | None, str, str]]] = {}
        self.inputs: list[dict[str, Any]] = []  # the report's, one per input read
        self.files: dict[str, dict[str, bytes]] = {key: {} for key in result_keys()}  # the Result's
        self.total: int | None = None  # cases, once every input is assembled
        self.objects = objects  # inputs to fetch from a store
        self.items = items  # the request's inputs, read or not
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

    def _unread(self) -> list[dict[str, Any]]:
        """The report's entries of the inputs a stopped request did not read (or not whole)."""
        read = {entry["index"] for entry in self.inputs}
        return [
            {
                "index": item.index,
                "name": item.name,
                "kind": None,
                "files": 0,
                "bytes": item.size,
                "error": "not read (or not whole): the request stopped first",
                "failure": InputFailure.NOT_READ,
            }
            for item in self.items
            if item.index not in read
        ]

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
        self.reports[case.case_id] = CaseReport(
            case.case_id, case.kind, case.origin, source=case.source, outputs=report_defaults()
        )
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
        self.started.add(case.case_id)
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
            known=len(statuses),
            inputs_read=len(self.inputs),
            inputs=len(self.items),
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

    def resume(self, case: Case, earlier: Mapping[str, Any]) -> None:
        """Book a case an earlier run finished, from its journal line: its artifacts and report
        fields as that run booked them. An output folder's files stay where they are (and go if
        the case is withdrawn); a sink that keeps no files (a FLAME node's storage) gives their
        bytes back (``data``, one per artifact), and they go into the Result's maps."""
        report = self.reports[case.case_id]
        artifacts = [Artifact.from_record(record) for record in earlier["artifacts"]]
        booked = earlier["report"]
        each = booked.get("models") or [{**booked, "model": None}]
        labels = {m["model"]: (m.get("labels_present") or [], m.get("labels_absent") or []) for m in each}
        self._book(report, artifacts, labels)
        delivered = booked.get("delivery")  # a resumed case is never sent again to the same PACS
        report.delivery = Delivery.from_dict(delivered) if delivered is not None else None
        every = booked.get("deliveries") or ([delivered] if delivered is not None else [])
        report.deliveries = [Delivery.from_dict(d) for d in every]
        if earlier.get("data") is not None:
            data = earlier["data"]
            self._keep_files(case, [replace(a, data=d) for a, d in zip(artifacts, data, strict=True)])
        else:
            self.written[case.case_id] = [(None, a.folder, a.name) for a in artifacts if a.name is not None]
        report.status = CaseStatus.RESUMED
        log.info("case.resumed", case_id=case.case_id, **case_identity(case))
        self._finished(case, report)

    def in_flight(self) -> int:
        """Cases that entered a stage and have not ended."""
        return len(self.started)

    def _finished(self, case: Case, report: CaseReport) -> None:
        self.started.discard(case.case_id)
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

    def keep(self, case: Case, artifacts: list[Artifact], labels: Mapping[str | None, Labels]) -> None:
        """Book what a case's export made: its files (into the Result's maps, unless they go to a
        sink) and its report's fields; ``labels``: the values present and absent in each model's
        label map (by the tag of its artifacts)."""
        self._book(self.reports[case.case_id], artifacts, labels)
        self._keep_files(case, artifacts)

    def _keep_files(self, case: Case, artifacts: list[Artifact]) -> None:
        for artifact in artifacts:
            if artifact.name is None or artifact.data is None:
                continue
            if self.keep_bytes and artifact.result_key is not None:
                self.files[artifact.result_key][artifact.name] = artifact.data
            where = (artifact.result_key, artifact.folder, artifact.name)
            self.written.setdefault(case.case_id, []).append(where)

    @staticmethod
    def _book(report: CaseReport, artifacts: list[Artifact], labels: Mapping[str | None, Labels]) -> None:
        """A case's artifacts into its report: each one's fields, its output's name, its labels.
        Several models: the report's fields are the first model's, and ``models`` holds each one's."""
        report.artifacts = [artifact.without_data() for artifact in artifacts]
        tags = list(dict.fromkeys(a.model for a in artifacts)) or [None]
        sections: list[dict[str, Any]] = []
        for tag in tags:
            made = [a for a in artifacts if a.model == tag]
            fields = report_defaults()
            for artifact in made:
                fields.update(artifact.report)
            primary = next((a for a in made if a.primary and a.made), None)
            output = primary.name if primary is not None else None
            present, absent = (list(values) for values in labels.get(tag, ([], [])))
            if tag == tags[0]:
                report.outputs, report.output = fields, output
                report.labels_present, report.labels_absent = present, absent
            section = {"model": tag, "output": output, "labels_present": present, "labels_absent": absent}
            sections.append({**section, **fields})
        report.models = sections if tags[0] is not None else None

    def delivered(self, case: Case, delivery: Delivery) -> None:
        """What became of a case's DICOM objects at this run's PACS (the last word for that PACS)."""
        report = self.reports[case.case_id]
        report.delivery = delivery
        others = [d for d in report.deliveries if d.destination != delivery.destination]
        report.deliveries = [*others, delivery]

    def withdraw(self, case: Case) -> None:
        """Drop a case the assembly withdrew: now if it has ended, else when it ends."""
        self.withdrawn.add(case.case_id)
        log.info("case.withdrawn", case_id=case.case_id)
        if self.reports[case.case_id].status is not CaseStatus.PENDING:
            self.forget(case.case_id)

    def forget(self, case_id: str) -> None:
        self.reports.pop(case_id, None)
        self.started.discard(case_id)
        if self.on_stage is not None:
            self.on_stage(case_id, None, self.progress())
        written = self.written.pop(case_id, [])
        # A file of the same name another case wrote since (the grown series' case) stays.
        claimed = {(where, name) for files in self.written.values() for _, where, name in files}
        written = [entry for entry in written if (entry[1], entry[2]) not in claimed]
        for key, _, name in written:
            if key is not None:
                self.files[key].pop(name, None)
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
        undelivered = any(r.delivery is not None and not r.delivery.sent for r in reports)
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
            files=self.files,
            cases=reports,
            inputs=sorted([*self.inputs, *self._unread()], key=lambda i: i["index"]),
            skipped=skipped,
            duration_s=duration_s,
            error=error,
            model=self.model,
        )

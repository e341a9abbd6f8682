"""The export stage: N workers turn each predicted case into its outputs and hand them on.

For each case: the backend's output to a label map on the source grid (v2:
nnU-Net's resampling of the logits), DICOM SEG or NIfTI and the label statistics
(:func:`asyncflow.writing.export.export_output`), then the outputs into the ledger,
with ``send`` the SEG to its PACS (:mod:`asyncflow.delivery.pacs`) and, with a sink,
onto disk with the case's journal line, before the case ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from asyncflow.backends.base import ModelInfo, ModelSteps
from asyncflow.case import Case, PreparedCase
from asyncflow.delivery.pacs import Delivery, Sender, parse_destination
from asyncflow.enums import OutputFormat, SourceKind, Stage
from asyncflow.log import bound_case, get_logger, scrub
from asyncflow.pipeline.flow import CaseFlow
from asyncflow.pipeline.journal import CaseSink
from asyncflow.pipeline.keys import model_parameters
from asyncflow.settings import Settings
from asyncflow.writing.export import Exported, export_output
from asyncflow.writing.seg import Algorithm, SegOptions

__all__ = ["Export"]

log = get_logger(__name__)


class Export:
    """The export workers of a request. ``sources`` gives the sha256 of a case's source files
    (its journal line keeps them); ``model`` is the model key."""

    def __init__(
        self,
        flow: CaseFlow,
        settings: Settings,
        info: ModelInfo,
        steps: ModelSteps | None,
        label_config: Mapping[int, Mapping[str, Any]],
        sink: CaseSink | None,
        model: str,
        sources: Callable[[Case], list[str]],
    ) -> None:
        self.flow, self.info, self.steps, self.label_config = flow, info, steps, label_config
        self.sink, self.model, self.sources = sink, model, sources
        self.sender = (
            Sender(
                parse_destination(settings.send), tries=settings.send_tries, backoff_s=settings.send_backoff_s
            )
            if settings.send is not None
            else None
        )
        self.seg_options = SegOptions(
            settings.seg_type,
            settings.seg_keep_empty_frames,
            settings.seg_compression,
            settings.deidentify,
            measurement_report=settings.measurement_report,
            rtstruct=settings.rtstruct,
        )
        self.algorithm = Algorithm(f"nnU-Net {info.name}", info.framework, model_parameters(info, settings))

    async def worker(self, receive: MemoryObjectReceiveStream[tuple[PreparedCase, Any]], _: None) -> None:
        async with receive:
            async for prepared, output in receive:
                case = prepared.case
                if not self.flow.enter(case, Stage.EXPORT):
                    continue
                with bound_case(case.case_id):
                    done = await self._export(prepared, output)
                    del output  # the logits: often the largest thing a case holds
                    if done is not None:
                        await self._finish(case, *done)

    async def _export(self, prepared: PreparedCase, output: Any) -> tuple[Exported, dict[str, float]] | None:
        """The case's outputs and the seconds of their steps, or None when the case failed."""
        key = self.flow.ledger.key(prepared.case)
        # The SEG's UIDs derive from the case and the model: the same run again writes the same SEG.
        options = replace(self.seg_options, uid_seed=f"{self.model}|{key}") if key else self.seg_options
        return await self.flow.step(
            prepared.case,
            Stage.EXPORT,
            export_output,
            prepared,
            output,
            self.steps,
            self.info.labels,
            self.label_config,
            self.algorithm,
            options,
        )

    async def _finish(self, case: Case, exported: Exported, seconds: dict[str, float]) -> None:
        """Book the outputs, send a SEG to the PACS, write the outputs to the sink with the journal
        line (not for a case whose delivery failed: ``--resume`` does it again), log, end the case."""
        ledger = self.flow.ledger
        files = ledger.keep(case, exported)
        journaled = True
        if self.sender is not None and exported.format is OutputFormat.DICOM_SEG:
            journaled = await self._send(case, exported)
        elif self.sender is not None and case.kind is SourceKind.DICOM:  # its SEG failed: NIfTI instead
            reason = "nothing sent: the case's DICOM SEG failed and it was written as NIfTI (see fallback)"
            self._book(case, Delivery(self.sender.destination.text, "failed", 0, 0, 0.0, reason))
        if self.sink is not None:
            report = ledger.report(case).as_dict()
            key, sources = ledger.key(case) if journaled else None, self.sources(case)
            finished = await self.flow.step(
                case, Stage.EXPORT, _finish_case, self.sink, key, self.model, files, report, sources
            )
            if not finished:
                return
        notes: dict[str, Any] = {"fallback": scrub(exported.fallback)} if exported.fallback else {}
        if exported.statistics is not None:
            notes["statistics"] = [label.as_dict() for label in exported.statistics]
        else:
            notes["statistics_error"] = scrub(exported.statistics_error or "")
        log.info(
            "case.exported",
            format=exported.format,
            bytes=len(exported.data),
            duration_s=round(ledger.seconds(case, Stage.EXPORT), 4),
            **{name: round(value, 4) for name, value in seconds.items()},
            **notes,
        )
        self.flow.end(case)

    async def _send(self, case: Case, exported: Exported) -> bool:
        """The case's SEG to the PACS, booked in its report and logged; True once it is there."""
        assert self.sender is not None
        extras = (exported.sr, exported.rtstruct)
        objects = [exported.data, *(extra[1] for extra in extras if extra is not None)]
        delivery = await anyio.to_thread.run_sync(self.sender.send, objects)
        self._book(case, delivery)
        return delivery.sent

    def _book(self, case: Case, delivery: Delivery) -> None:
        """A case's delivery into its report and the log."""
        assert self.sender is not None
        self.flow.ledger.report(case).delivery = delivery.as_dict()
        fields = {
            "destination": self.sender.destination.kind,
            "status": delivery.status,
            "objects": delivery.objects,
            "tries": delivery.tries,
            "duration_s": round(delivery.duration_s, 4),
        }
        if delivery.sent:
            log.info("case.delivered", **fields)
        else:
            log.warning("case.delivered", **fields, reason=scrub(delivery.reason or ""))


def _finish_case(
    sink: CaseSink, key: str | None, model: str, files: list[Any], report: dict[str, Any], sources: list[str]
) -> bool:
    """The sink's ``finish_case``, True once done (a step's None means it failed)."""
    sink.finish_case(key, model, files, report, sources)
    return True

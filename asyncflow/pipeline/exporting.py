"""The export stage: N workers turn each predicted case into its outputs and hand them on.

For each case, in a worker thread: the backend's output to a label map on the
prediction grid (the plan's steps; v2: nnU-Net's resampling of the logits), the
case's label definitions merged once (the model's, the user's configuration, a
MITK label file supplied with the case), then every writer that applies
(:func:`asyncflow.writing.registry.write_outputs`). Several models not merged: each
model's label map and outputs in turn, its files named after the model
(``<case>_<tag>``), its artifacts tagged with it. Then the artifacts into the
ledger, with ``send`` the case's DICOM objects to its PACS
(:mod:`asyncflow.delivery.pacs`) and, with a sink, onto disk with the case's
journal line, before the case ends. A case an earlier run finished (``--resume``) is
sent to this run's PACS unless the journal says it got there (:meth:`Export.resumed`),
and its journal line then records that delivery beside the earlier ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from asyncflow.artifact import Artifact, Delivery
from asyncflow.backends.base import ModelSteps
from asyncflow.backends.models import ModelsSteps
from asyncflow.backends.plan import ModelPlan
from asyncflow.case import Case, PreparedCase
from asyncflow.delivery.pacs import Sender
from asyncflow.enums import SourceKind, Stage
from asyncflow.labels.segment import SegmentLabel
from asyncflow.log import Stopwatch, bound_case, get_logger, scrub
from asyncflow.pipeline.flow import CaseFlow
from asyncflow.pipeline.journal import CaseSink
from asyncflow.pipeline.keys import model_parameters
from asyncflow.pipeline.ledger import Labels
from asyncflow.settings import Settings
from asyncflow.writing.base import Algorithm, LabelMap, OutputOptions
from asyncflow.writing.registry import write_outputs

__all__ = ["Export"]

log = get_logger(__name__)


@dataclass(frozen=True)
class _Exported:
    """What one case's export made (the labels of each model's label map, by its tag), and the
    seconds of its two steps."""

    artifacts: list[Artifact]
    labels: dict[str | None, Labels]
    to_labels_s: float
    write_s: float


@dataclass(frozen=True)
class _Outputs:
    """What turns a predicted case into its outputs, as a step that may run on another machine
    (it holds no state of the request): the plan's ``steps``, and for each label map its tag,
    labels and algorithm."""

    steps: ModelSteps | None
    each: tuple[tuple[str | None, Mapping[int, SegmentLabel], Algorithm], ...]
    label_config: Mapping[int, Mapping[str, Any]]

    def __call__(self, prepared: PreparedCase, output: Any, options: OutputOptions) -> _Exported:
        """One case's outputs: its label map on the prediction grid (or each of several models'),
        then every writer that applies."""
        watch = Stopwatch()
        steps = self.steps
        if len(self.each) > 1:
            assert isinstance(steps, ModelsSteps)
            maps = steps.each_labels(prepared, output)
        else:
            maps = [output if steps is None else steps.to_labels(prepared, output)]
        to_labels_s = watch.seconds
        watch = Stopwatch()
        artifacts: list[Artifact] = []
        labels: dict[str | None, Labels] = {}
        for (tag, declared, algorithm), label_map in zip(self.each, maps, strict=True):
            seed = f"{options.uid_seed}|{tag}" if tag is not None and options.uid_seed else options.uid_seed
            job = LabelMap.of(
                prepared,
                label_map,
                declared,
                self.label_config,
                algorithm,
                replace(options, uid_seed=seed),
            )
            job = replace(job, suffix=f"_{tag}") if tag is not None else job
            artifacts += [replace(a, model=tag) for a in write_outputs(job)]
            labels[tag] = (job.present, job.absent)
        return _Exported(artifacts, labels, to_labels_s, watch.seconds)


class Export:
    """The export workers of a request. ``sources`` gives the sha256 of a case's source files
    (its journal line keeps them); ``model`` is the model key."""

    def __init__(
        self,
        flow: CaseFlow,
        settings: Settings,
        plan: ModelPlan,
        label_config: Mapping[int, Mapping[str, Any]],
        sink: CaseSink | None,
        model: str,
        sources: Callable[[Case], list[str]],
    ) -> None:
        self.flow = flow
        self.sink, self.model, self.sources = sink, model, sources
        self.sender = (
            Sender(settings.send, tries=settings.send_tries, backoff_s=settings.send_backoff_s)
            if settings.send is not None
            else None
        )
        self.options = OutputOptions(
            settings.seg_type,
            settings.seg_keep_empty_frames,
            settings.seg_compression,
            settings.deidentify,
            extras=frozenset(settings.outputs),
        )
        # What each label map is written as: the plan's (one model, or several merged), or each of
        # several models' own, with its tag.
        each: list[tuple[str | None, Mapping[int, SegmentLabel], Algorithm]] = [
            (None, plan.labels, _algorithm(plan, settings))
        ]
        if plan.models and plan.merge is None:
            each = [
                (t, p.labels, _algorithm(p, settings)) for t, p in zip(plan.tags, plan.models, strict=True)
            ]
        self.outputs = _Outputs(plan.steps, tuple(each), dict(label_config))

    async def worker(self, receive: MemoryObjectReceiveStream[tuple[PreparedCase, Any]], _: None) -> None:
        async with receive:
            async for prepared, output in receive:
                case = prepared.case
                if not self.flow.enter(case, Stage.EXPORT):
                    continue
                with bound_case(case.case_id):
                    # The case's UIDs derive from the case and the model: the same run again writes
                    # the same DICOM objects.
                    key = self.flow.ledger.key(case)
                    options = replace(self.options, uid_seed=f"{self.model}|{key}") if key else self.options
                    exported = await self.flow.step(
                        case, Stage.EXPORT, self.outputs, prepared, output, options
                    )
                    del output  # the logits: often the largest thing a case holds
                    if exported is not None:
                        await self._finish(case, exported)

    async def _finish(self, case: Case, exported: _Exported) -> None:
        """Book the artifacts, send the case's DICOM objects to the PACS, write its files to the
        sink with the journal line (not for a case whose delivery failed: ``--resume`` does it
        again), log, end the case."""
        ledger = self.flow.ledger
        artifacts = exported.artifacts
        ledger.keep(case, artifacts, exported.labels)
        journaled = True
        if self.sender is not None:
            journaled = await self._send(case, artifacts)
        if self.sink is not None:
            report = ledger.report(case).as_dict()
            key, sources = ledger.key(case) if journaled else None, self.sources(case)
            finished = await self.flow.step(
                case,
                Stage.EXPORT,
                _finish_case,
                self.sink,
                key,
                self.model,
                artifacts,
                report,
                sources,
                here=True,
            )
            if not finished:
                return
        first = [a for a in artifacts if a.model == artifacts[0].model] if artifacts else []
        primary = next((a for a in first if a.primary and a.made), None)
        log.info(
            "case.exported",
            format=primary.writer if primary is not None else None,
            bytes=len(primary.data or b"") if primary is not None else 0,
            outputs=[a.writer for a in artifacts if a.made],
            duration_s=round(ledger.seconds(case, Stage.EXPORT), 4),
            to_labels_s=round(exported.to_labels_s, 4),
            write_s=round(exported.write_s, 4),
            writers_s={a.writer: round(a.seconds, 4) for a in first},
            **_event_fields(first),  # several models: the first's, as in the report
        )
        self.flow.end(case)

    async def resumed(self, case: Case, key: str, earlier: Mapping[str, Any]) -> None:
        """A case an earlier run finished (booked from its journal line ``earlier``): its DICOM
        objects to this run's PACS unless they got there before; once sent, a journal line
        that says so too."""
        if self.sender is None:
            return
        ledger, here = self.flow.ledger, self.sender.destination.text
        report = ledger.report(case)
        there = next((d for d in report.deliveries if d.destination == here and d.sent), None)
        if there is not None:
            report.delivery = there
            return
        assert self.sink is not None  # resumed cases come from a sink
        data = await anyio.to_thread.run_sync(self.sink.data, earlier)
        records = earlier["artifacts"]
        artifacts = [replace(Artifact.from_record(r), data=d) for r, d in zip(records, data, strict=True)]
        with bound_case(case.case_id):
            if not await self._send(case, artifacts) or report.delivery is None:
                return  # not sent: its journal line stays as it was, and a resume tries again
            deliveries = {
                "delivery": report.delivery.as_dict(),
                "deliveries": [d.as_dict() for d in report.deliveries],
            }
            kept = [a.without_data() for a in artifacts] if self.sink.keeps_files else artifacts
            sources = earlier.get("sources") or []
            entry = {**earlier["report"], **deliveries}
            await anyio.to_thread.run_sync(self.sink.finish_case, key, self.model, kept, entry, sources)

    async def _send(self, case: Case, artifacts: list[Artifact]) -> bool:
        """The case's DICOM objects to the PACS, booked in its report and logged. False when they
        did not get there (its journal line waits for a resume that sends them); a DICOM case whose
        objects failed has nothing to send, which its report says."""
        assert self.sender is not None
        objects = [a.data for a in artifacts if a.deliver and a.data is not None]
        if objects:
            delivery = await anyio.to_thread.run_sync(self.sender.send, objects)
        elif case.kind is SourceKind.DICOM:  # its DICOM objects failed: its label map was kept otherwise
            reason = "nothing sent: no DICOM object of the case could be written (see its fallback)"
            delivery = Delivery(self.sender.destination.text, "failed", 0, 0, 0.0, reason)
        else:
            return True
        self.flow.ledger.delivered(case, delivery)
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
        return delivery.sent or not objects


def _algorithm(plan: ModelPlan, settings: Settings) -> Algorithm:
    """What made a plan's segments (the SEG's AlgorithmIdentification)."""
    return Algorithm(f"nnU-Net {plan.name}", plan.model.framework, model_parameters(plan, settings))


def _event_fields(artifacts: Iterable[Artifact]) -> dict[str, Any]:
    """What ``case.exported`` says of the artifacts: each report field of those made but their
    file names (which may carry a patient's name), and why each missing one is missing
    (``outputs_missing``), messages scrubbed of paths."""
    fields: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for artifact in artifacts:
        if artifact.error is not None:
            missing[artifact.writer] = scrub(artifact.error)
            continue
        for name, value in artifact.report.items():
            if value is not None and value != artifact.name:
                fields[name] = scrub(value) if isinstance(value, str) else value
    return {**fields, **({"outputs_missing": missing} if missing else {})}


def _finish_case(
    sink: CaseSink,
    key: str | None,
    model: str,
    artifacts: list[Artifact],
    report: dict[str, Any],
    sources: list[str],
) -> bool:
    """The sink's ``finish_case``, True once done (a step's None means it failed)."""
    sink.finish_case(key, model, artifacts, report, sources)
    return True

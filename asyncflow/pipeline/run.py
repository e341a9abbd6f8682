"""The request pipeline: stages joined by bounded streams, one prediction worker per device.

::

    items -> unpack + scan (N) -> assemble (1) -> prepare (N) -> predict (1 per device) -> export (N) -> result

Every arrow is a bounded anyio memory object stream, so a slow stage holds the
ones before it back. CPU work runs in worker threads; the event loop only
schedules, logs and keeps the books. The model's CPU steps (``Backend.steps``;
v2: nnU-Net's preprocessing, and the logits' way back to the source grid) run in
the prepare and export workers, so a prediction worker is held for the network
alone; a case enters them only when its memory estimate fits in the request's
``MemoryBudget``. The model loads while the first inputs
are unpacked. Every case ends as done or failed with a reason; a case's working
folder is removed as soon as the case ends, the request's folder in ``finally``
on success, error and cancellation alike.

This module wires the stages and owns their concurrency (the unpack workers and
the assembly are :mod:`asyncflow.pipeline.intake`'s, the prediction workers
:mod:`asyncflow.pipeline.prediction`'s); the stage functions it calls are plain
synchronous functions from the domain modules, the request's temporary folder is
a :class:`~asyncflow.pipeline.workspace.Workspace` and its books a :class:`~asyncflow.pipeline.ledger.Ledger`.
"""

from __future__ import annotations

import errno
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from asyncflow.backends.base import Backend
from asyncflow.backends.build import build_backend, build_backends
from asyncflow.case import Case, PreparedCase
from asyncflow.enums import CaseStatus, RequestStatus, Stage
from asyncflow.errors import RequestError
from asyncflow.labels.segment import load_label_config
from asyncflow.log import get_logger, scrub
from asyncflow.pipeline.budget import MemoryBudget, peak_rss_bytes
from asyncflow.pipeline.intake import Intake
from asyncflow.pipeline.journal import CaseSink, model_key
from asyncflow.pipeline.ledger import Ledger
from asyncflow.pipeline.prediction import PredictionWorker, nbytes
from asyncflow.pipeline.workspace import (
    Workspace,
    check_free_space,
    inputs_on_disk_at_once,
    prepared_queue_size,
)
from asyncflow.reading.archives import Entry, InputItem, request_items
from asyncflow.reading.prepare import prepare_case
from asyncflow.result import Progress, Result
from asyncflow.settings import Settings
from asyncflow.writing.export import export_output
from asyncflow.writing.seg import Algorithm, SegOptions

__all__ = [
    "Progress",
    "RequestError",
    "Result",
    "build_backend",
    "build_backends",
    "peak_rss_bytes",
    "run_request",
    "run_request_sync",
]

log = get_logger("asyncflow.pipeline.run")
R = TypeVar("R")


def _stream(size: int) -> tuple[MemoryObjectSendStream[Any], MemoryObjectReceiveStream[Any]]:
    return anyio.create_memory_object_stream[Any](size)


class _Request:
    def __init__(
        self,
        settings: Settings,
        backends: Sequence[Backend],
        workspace: Workspace,
        ledger: Ledger,
        label_config: Mapping[int, Mapping[str, Any]],
        budget: MemoryBudget,
        sink: CaseSink | None,
        model: str,
    ) -> None:
        self.settings = settings
        self.sink = sink  # where outputs go as cases end, and what an earlier run finished
        self.model = model  # the model key (asyncflow.pipeline.journal): resume and SEG UIDs
        self.backends = backends  # one prediction worker each
        self.needs_files = any(b.needs_files for b in backends)  # else the model input stays in memory
        self.workspace = workspace
        self.ledger = ledger
        self.intake = intake = Intake(settings, workspace, ledger, sink, model, self._fail)
        if sink is not None:
            ledger.on_forget = lambda case_id, files: sink.withdraw(intake.keys.get(case_id), files)
        self.label_config = label_config
        self.seg_options = SegOptions(
            settings.seg_type, settings.seg_keep_empty_frames, settings.seg_compression, settings.deidentify
        )
        # The model's CPU work around the network (v2), done by the prepare and export workers;
        # a case starts it only when its memory estimate fits in the budget.
        self.steps = backends[0].steps
        self.budget = budget
        info = self.info = backends[0].info
        self.algorithm = Algorithm(f"nnU-Net {info.name}", info.framework, info.parameters)

    # -- orchestration -----------------------------------------------------------

    async def run(self, items: list[InputItem]) -> None:
        size = self.settings.queue_size
        unpacked_send, unpacked_recv = _stream(size)
        cases_send, cases_recv = _stream(size)
        prepared_send, prepared_recv = _stream(prepared_queue_size(self.settings, self.backends))
        predicted_send, predicted_recv = _stream(size)
        async with anyio.create_task_group() as tg:
            self._fan_out(
                tg, self.settings.unpack_workers, self.intake.unpack_worker, iter(items), unpacked_send
            )
            tg.start_soon(self.intake.assemble, unpacked_recv, cases_send)
            self._fan_out(tg, self.settings.prepare_workers, self._prepare_worker, cases_recv, prepared_send)
            for number, backend in enumerate(self.backends):  # each takes the next prepared case
                worker = PredictionWorker(number, backend, self.ledger, self._fail, self._end_case)
                tg.start_soon(worker.run, prepared_recv.clone(), predicted_send.clone())
            prepared_recv.close()
            predicted_send.close()
            self._fan_out(tg, self.settings.export_workers, self._export_worker, predicted_recv, None)

    @staticmethod
    def _fan_out(
        tg: TaskGroup,
        count: int,
        worker: Callable[[Any, Any], Coroutine[Any, Any, None]],
        source: Any,
        send: MemoryObjectSendStream[Any] | None,
    ) -> None:
        """``count`` workers share ``source``; ``send`` closes when the last worker ends."""
        shared_receive = isinstance(source, MemoryObjectReceiveStream)
        for _ in range(count):
            tg.start_soon(
                worker, source.clone() if shared_receive else source, send.clone() if send else None
            )
        if shared_receive:
            source.close()
        if send is not None:
            send.close()

    async def _step(self, case: Case, stage: Stage, fn: Callable[..., R], *args: Any) -> R | None:
        """Run one stage of one case in a worker thread; a failure ends the case."""
        started = time.perf_counter()
        try:
            result = await anyio.to_thread.run_sync(fn, *args)
        except Exception as exc:  # noqa: BLE001 - any error of one case fails that case alone
            self._fail(case, stage, exc, time.perf_counter() - started)
            return None
        self._add_seconds(case, stage, time.perf_counter() - started)
        return result

    def _add_seconds(self, case: Case, stage: Stage, seconds: float) -> None:
        self.ledger.add_seconds(case, stage, seconds)

    def _fail(self, case: Case, stage: Stage, error: Exception, seconds: float) -> None:
        self._add_seconds(case, stage, seconds)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            error = OSError(error.errno, f"disk full while writing the case's files ({error.strerror})")
        self._end_case(case, stage=stage, error=error)

    def _end_case(self, case: Case, *, stage: Stage | None = None, error: Exception | None = None) -> None:
        """The case has ended: free its files and memory, book it."""
        self.workspace.end_case(case)
        self.budget.release(case.case_id)
        self.ledger.end(case, stage=stage, error=error)

    # -- stages --------------------------------------------------------------------

    async def _prepare_worker(
        self, receive: MemoryObjectReceiveStream[Case], send: MemoryObjectSendStream[PreparedCase]
    ) -> None:
        async with receive, send:
            async for case in receive:
                if case.case_id in self.ledger.withdrawn:
                    self._end_case(case)
                    continue
                self.ledger.enter(case, Stage.PREPARE)
                with structlog.contextvars.bound_contextvars(case_id=case.case_id):
                    prepared = await self._step(
                        case,
                        Stage.PREPARE,
                        prepare_case,
                        case,
                        self.workspace.case_dir(case),
                        self.needs_files,
                    )
                    if prepared is None:
                        continue
                    channels = len(prepared.images)
                    read_s = self.ledger.seconds(case, Stage.PREPARE)
                    admitted = await self._preprocess(prepared)
                    if admitted is None:
                        continue
                    reserved, memory_wait_s = admitted
                    prepare_s = self.ledger.seconds(case, Stage.PREPARE)
                    log.info(
                        "case.prepared",
                        channels=channels,
                        duration_s=round(prepare_s, 4),
                        preprocess_s=round(prepare_s - read_s, 4),
                        model_input_bytes=nbytes(prepared.model_input),
                        memory_reserved_bytes=reserved,
                        memory_wait_s=round(memory_wait_s, 4),
                        predict_queue=send.statistics().current_buffer_used,
                    )
                    await send.send(prepared)

    async def _preprocess(self, prepared: PreparedCase) -> tuple[int, float] | None:
        """The model's CPU preprocessing of a read case, once its memory estimate fits in the
        budget; the bytes it holds and the seconds it waited for them, or None if it failed."""
        if self.steps is None:
            return 0, 0.0
        case = prepared.case
        try:
            estimate = self.steps.memory_bytes(prepared)
        except Exception as exc:  # noqa: BLE001 - a case nnU-Net cannot size fails alone
            self._fail(case, Stage.PREPARE, exc, 0.0)
            return None
        started = time.perf_counter()
        reserved = await self.budget.admit(case.case_id, estimate)
        waited = time.perf_counter() - started
        model_input = await self._step(case, Stage.PREPARE, self.steps.preprocess, prepared)
        if model_input is None:
            return None
        prepared.images, prepared.model_input = [], model_input  # it replaces the images
        return reserved, waited

    async def _export_worker(
        self, receive: MemoryObjectReceiveStream[tuple[PreparedCase, Any]], _: None
    ) -> None:
        async with receive:
            async for prepared, output in receive:
                case = prepared.case
                if case.case_id in self.ledger.withdrawn:
                    self._end_case(case)
                    continue
                self.ledger.enter(case, Stage.EXPORT)
                with structlog.contextvars.bound_contextvars(case_id=case.case_id):
                    key = self.intake.keys.get(case.case_id)
                    done = await self._step(
                        case,
                        Stage.EXPORT,
                        export_output,
                        prepared,
                        output,
                        self.steps,
                        self.info.labels,
                        self.label_config,
                        self.algorithm,
                        replace(self.seg_options, uid_seed=f"{self.model}|{key}")
                        if key
                        else self.seg_options,
                    )
                    del output  # the logits: often the largest thing a case holds
                    if done is None:
                        continue
                    exported, seconds = done
                    files = self.ledger.keep(case, exported)
                    if self.sink is not None:
                        report = self.ledger.report(case).as_dict()
                        if not await self._step(
                            case,
                            Stage.EXPORT,
                            _finish,
                            self.sink,
                            key,
                            self.model,
                            files,
                            report,
                            self.intake.sources(case),
                        ):
                            continue
                    notes: dict[str, Any] = (
                        {"fallback": scrub(exported.fallback)} if exported.fallback else {}
                    )
                    if exported.statistics is not None:
                        notes["statistics"] = [label.as_dict() for label in exported.statistics]
                    else:
                        notes["statistics_error"] = scrub(exported.statistics_error or "")
                    log.info(
                        "case.exported",
                        format=exported.format,
                        bytes=len(exported.data),
                        duration_s=round(self.ledger.seconds(case, Stage.EXPORT), 4),
                        **{name: round(value, 4) for name, value in seconds.items()},
                        **notes,
                    )
                    self._end_case(case)


async def run_request(
    entries: Iterable[Entry],
    settings: Settings | None = None,
    *,
    backend: Backend | Sequence[Backend] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_finish: Callable[[Result], None] | None = None,
    sink: CaseSink | None = None,
    on_stage: Callable[[str, str | None, Progress], None] | None = None,
) -> Result:
    """Segment every volume of a request.

    ``entries`` is a list of ``bytes``, ``{name: bytes}`` mappings or local paths.
    Pass a loaded ``backend`` to reuse a model across requests, or several
    (one per device): each is one prediction worker, one call at a time (v2: one case;
    v1: a batch of waiting cases per ``nnUNet_predict``). ``on_progress`` is called as each
    case ends, ``on_stage`` as a case enters a stage (and with None as it ends), with the
    progress so far. ``on_finish``
    receives the result as it stands when the request ends in any way, also on
    error or cancellation (cases not reached are ``pending``). With a ``sink``
    (:class:`asyncflow.pipeline.journal.OutputFolder`), each case's outputs go to it as the case
    ends, the result's byte maps stay empty, and cases the sink's journal holds as finished
    with the same content, model and settings are not done again (status ``resumed``). Raises
    :class:`RequestError` when the request holds no usable case, and the
    backend's :class:`ModelError` when the model cannot load.
    """
    settings = settings or Settings.from_env()
    items = request_items(entries)
    if not items:
        raise RequestError("the request has no inputs")
    label_config = load_label_config(settings.label_config) if settings.label_config else {}
    if backend is None:
        backends = build_backends(settings)
    else:
        backends = list(backend) if isinstance(backend, Sequence) else [backend]
    at_once = inputs_on_disk_at_once(settings, backends)
    check_free_space(settings.work_dir, settings.disk_headroom, [i.size for i in items], at_once)
    request_id = uuid.uuid4().hex[:12]
    started = time.perf_counter()
    workspace = Workspace(request_id, settings.work_dir, items, settings.archive_limits())
    ledger = Ledger(on_progress, keep_bytes=sink is None, on_stage=on_stage)
    model = await anyio.to_thread.run_sync(model_key, backends[0].info, settings)
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        budget = MemoryBudget(settings.memory_budget_bytes())
        log.info(
            "request.started",
            inputs=len(items),
            bytes=sum(i.size for i in items),
            memory_budget_bytes=budget.limit,
        )
        request = _Request(settings, backends, workspace, ledger, label_config, budget, sink, model)
        status, error, error_type = RequestStatus.ERROR, None, None
        try:
            try:
                await request.run(items)
            except BaseExceptionGroup as group:
                if group.subgroup(KeyboardInterrupt):  # Ctrl-C reached a stage: the request is cancelled
                    raise KeyboardInterrupt from None
                # One failing stage cancels the others; surface its error, not the group.
                errors = [e for e in group.exceptions if not isinstance(e, anyio.get_cancelled_exc_class())]
                if len(errors) == 1 and isinstance(errors[0], Exception):
                    raise errors[0] from None
                raise
            result = ledger.result(request_id, time.perf_counter() - started, request.intake.builder.skipped)
            status = result.status
            return result
        except (anyio.get_cancelled_exc_class(), KeyboardInterrupt):
            status = RequestStatus.CANCELLED
            raise
        except Exception as exc:
            error, error_type = f"{type(exc).__name__}: {exc}", type(exc).__name__
            raise
        finally:
            workspace.close()
            if on_finish is not None:
                final = status if status in (RequestStatus.ERROR, RequestStatus.CANCELLED) else None
                elapsed = time.perf_counter() - started
                on_finish(ledger.result(request_id, elapsed, request.intake.builder.skipped, final, error))
            statuses = [r.status for r in ledger.live_reports()]
            log.info(
                "request.finished",
                status=status,
                cases=len(statuses),
                cases_done=statuses.count(CaseStatus.DONE),
                cases_failed=statuses.count(CaseStatus.FAILED),
                cases_resumed=statuses.count(CaseStatus.RESUMED),
                files_skipped=len(request.intake.builder.skipped),
                duration_s=round(time.perf_counter() - started, 4),
                peak_rss_bytes=peak_rss_bytes(),
                **({"error_type": error_type, "reason": scrub(error.partition(": ")[2])} if error else {}),
            )


def _finish(
    sink: CaseSink, key: str | None, model: str, files: list[Any], report: dict[str, Any], sources: list[str]
) -> bool:
    sink.finish_case(key, model, files, report, sources)
    return True


def run_request_sync(entries: Iterable[Entry], settings: Settings | None = None, **kwargs: Any) -> Result:
    """:func:`run_request` for synchronous callers (the CLI, FLAME's ``analysis_method``)."""
    return anyio.run(lambda: run_request(entries, settings, **kwargs))

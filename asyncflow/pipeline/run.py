"""The request pipeline: stages joined by bounded streams, one prediction worker per device.

::

    items -> feed (fetch: a window) -> unpack + scan (N) -> assemble (1) -> prepare (N)
          -> predict (1 per device) -> export (N) -> result

Every arrow is a bounded anyio memory object stream, so a slow stage holds the
ones before it back. CPU work runs in worker threads; the event loop only
schedules, logs and keeps the books. The model's CPU steps (``Backend.steps``;
v2: nnU-Net's preprocessing, and the logits' way back to the source grid) run in
the prepare and export workers, so a prediction worker is held for the network
alone; a case enters them only when its memory estimate fits in the request's
``MemoryBudget``. The model loads while the first inputs are unpacked. Every case
ends as done or failed with a reason; a case's working folder is removed as soon
as the case ends, the request's folder in ``finally`` on success, error and
cancellation alike.

This module creates every stream and the task group and starts the workers of
each stage: :mod:`~asyncflow.pipeline.intake` (unpack and assemble),
:mod:`~asyncflow.pipeline.preparing`, :mod:`~asyncflow.pipeline.prediction` and
:mod:`~asyncflow.pipeline.exporting`. What they share about a case is its
:class:`~asyncflow.pipeline.flow.CaseFlow`: the request's temporary folder
(:class:`~asyncflow.pipeline.workspace.Workspace`), its books
(:class:`~asyncflow.pipeline.ledger.Ledger`) and its memory budget.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from asyncflow.backends.base import Backend
from asyncflow.backends.plan import ModelPlan
from asyncflow.case import Case, SkippedFile
from asyncflow.cluster.session import Cluster, connect
from asyncflow.enums import CaseStatus, RequestStatus
from asyncflow.errors import Interrupted, RequestError
from asyncflow.labels.config import load_label_config
from asyncflow.log import Stopwatch, get_logger, scrub
from asyncflow.machine import peak_rss_bytes
from asyncflow.pipeline.budget import MemoryBudget
from asyncflow.pipeline.exporting import Export
from asyncflow.pipeline.flow import CaseFlow
from asyncflow.pipeline.intake import Intake
from asyncflow.pipeline.journal import CaseSink
from asyncflow.pipeline.keys import model_key, model_provenance
from asyncflow.pipeline.ledger import Ledger
from asyncflow.pipeline.model import build_plan
from asyncflow.pipeline.prediction import PredictionWorker
from asyncflow.pipeline.preparing import Preparation
from asyncflow.pipeline.stopping import Stop, can_watch_signals
from asyncflow.pipeline.workspace import Workspace, check_free_space, sweep_stale
from asyncflow.reading.request import Entry, InputItem, request_items
from asyncflow.result import Progress, Result
from asyncflow.settings import Settings

__all__ = ["run_request", "run_request_sync"]

log = get_logger(__name__)


def _stream(size: int) -> tuple[MemoryObjectSendStream[Any], MemoryObjectReceiveStream[Any]]:
    return anyio.create_memory_object_stream[Any](size)


def prepared_queue_size(settings: Settings, plan: ModelPlan) -> int:
    """Room for a whole batch: the prediction worker takes every prepared case that waits."""
    return max(settings.queue_size, plan.max_batch)


def inputs_on_disk_at_once(settings: Settings, plan: ModelPlan) -> int:
    """At most how many inputs have files on disk at once: those fetched (a store's objects),
    being unpacked, queued or assembled, and one per case in flight (a file is deleted when
    its last case ends)."""
    size = settings.queue_size
    waiting = max(settings.unpack_workers + size, settings.fetch_window_size()) + 1
    in_flight = (
        size  # assembled cases queued for prepare
        + settings.prepare_workers
        + prepared_queue_size(settings, plan)
        + len(plan.workers)  # one batch per prediction worker
        + size  # predicted cases queued for export
        + settings.export_workers
    )
    return waiting + in_flight


class _Request:
    """One request's stages, ready to run over its inputs."""

    def __init__(
        self,
        settings: Settings,
        plan: ModelPlan,
        flow: CaseFlow,
        label_config: Mapping[int, Mapping[str, Any]],
        sink: CaseSink | None,
        model: str,
        cluster: Cluster | None = None,
    ) -> None:
        self.settings = settings
        self.cluster = cluster
        self.plan = plan  # one prediction worker per backend
        self.flow = flow
        self.intake = Intake(settings, flow, sink, model)
        self.preparation = Preparation(flow, plan.steps, plan.needs_files)
        self.export = Export(flow, settings, plan, label_config, sink, model, self.intake.sources)
        self.intake.resumed = self.export.resumed

    async def run(self, items: list[InputItem], watch_signals: bool) -> None:
        """Every stage until the last case has ended; a stage's error (no usable case, a model
        that cannot load) cancels the others and is raised alone. With ``watch_signals``,
        interrupts stop the request in two steps (:mod:`asyncflow.pipeline.stopping`); a
        stopped request raises :class:`~asyncflow.errors.Interrupted` once its stages end."""
        stop = self.flow.stop
        try:
            async with anyio.create_task_group() as watcher:
                if watch_signals:
                    watcher.start_soon(stop.watch, self.flow.ledger.in_flight)
                if self.cluster is not None:
                    watcher.start_soon(self.cluster.watch)
                with stop.stages:
                    await self._stages(items)
                watcher.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if group.subgroup(KeyboardInterrupt):  # Ctrl-C reached a stage: the request is cancelled
                raise KeyboardInterrupt from None
            errors = [e for e in _leaves(group) if not isinstance(e, anyio.get_cancelled_exc_class())]
            if len(errors) == 1 and isinstance(errors[0], Exception):
                raise errors[0] from None
            raise
        if stop.signum is not None:
            raise Interrupted(stop.signum)

    async def _intake(self, items: list[InputItem], cases: MemoryObjectSendStream[Case]) -> None:
        """Feed, unpack and assemble until every input is read, or the request stops taking new
        cases (``stop.intake``); every stream end it made is closed either way, so the stages
        after it see their input end."""
        fed_send, fed_recv = _stream(0)  # the fetch window, not this stream, bounds what waits
        unpacked_send, unpacked_recv = _stream(self.settings.queue_size)
        ends: list[Any] = []

        def end(stream: Any) -> Any:
            ends.append(stream.clone())
            return ends[-1]

        try:
            with self.flow.stop.intake:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.intake.fetcher.feed, items, end(fed_send), end(unpacked_send))
                    for _ in range(self.settings.unpack_workers):
                        tg.start_soon(self.intake.unpack_worker, end(fed_recv), end(unpacked_send))
                    tg.start_soon(self.intake.assemble, end(unpacked_recv), end(cases))
                    for stream in (fed_send, fed_recv, unpacked_send, unpacked_recv, cases):
                        stream.close()
        finally:
            for stream in ends:  # a task cancelled before it ran never closed its own
                stream.close()

    async def _stages(self, items: list[InputItem]) -> None:
        size = self.settings.queue_size
        cases_send, cases_recv = _stream(size)
        prepared_send, prepared_recv = _stream(prepared_queue_size(self.settings, self.plan))
        predicted_send, predicted_recv = _stream(size)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._intake, items, cases_send)
            prepare = self.preparation.worker
            _fan_out(tg, self.settings.prepare_workers, prepare, cases_recv, prepared_send)
            # A cascade's CPU work between its stages: as many threads as prepare workers.
            stage_threads = anyio.CapacityLimiter(self.settings.prepare_workers)
            for number, backend in enumerate(self.plan.workers):  # each takes the next prepared case
                worker = PredictionWorker(number, backend, self.flow, stage_threads)
                tg.start_soon(worker.run, prepared_recv.clone(), predicted_send.clone())
            prepared_recv.close()
            predicted_send.close()
            _fan_out(tg, self.settings.export_workers, self.export.worker, predicted_recv, None)


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
        tg.start_soon(worker, source.clone() if shared_receive else source, send.clone() if send else None)
    if shared_receive:
        source.close()
    if send is not None:
        send.close()


async def run_request(
    entries: Iterable[Entry],
    settings: Settings | None = None,
    *,
    backend: ModelPlan | Backend | Sequence[Backend] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_finish: Callable[[Result], None] | None = None,
    sink: CaseSink | None = None,
    on_stage: Callable[[str, str | None, Progress], None] | None = None,
    stop: Stop | None = None,
) -> Result:
    """Segment every volume of a request.

    ``entries`` is a list of ``bytes``, ``{name: bytes}`` mappings, local paths or objects of a
    store (:class:`~asyncflow.reading.request.RemoteObject`: each fetched to disk as the
    pipeline is ready for it, within ``settings.fetch_window``).
    Pass a loaded ``backend`` to reuse a model across requests, or several
    (one per device), or their :class:`~asyncflow.backends.plan.ModelPlan` (by default the
    settings' own, :func:`asyncflow.pipeline.model.build_plan`): each backend is one prediction worker, one call at a time (v2: one case;
    v1: a batch of waiting cases per ``nnUNet_predict``). ``on_progress`` is called as each
    case ends, ``on_stage`` as a case enters a stage (and with None as it ends), with the
    progress so far. ``on_finish`` receives the result as it stands when the request ends
    in any way, also on error or cancellation (cases not reached are ``pending``). With a
    ``sink`` (:class:`asyncflow.pipeline.journal.OutputFolder`), each case's outputs go to it
    as the case ends, the result's byte maps stay empty (unless the sink keeps no files, as a
    FLAME node's storage), and cases the sink's journal holds
    as finished with the same content, model and settings are not done again (status
    ``resumed``). Raises :class:`~asyncflow.errors.RequestError` when the request holds no
    usable case, and :class:`~asyncflow.errors.ModelError` when the model cannot load. With a
    ``stop`` (:class:`~asyncflow.pipeline.stopping.Stop`) and in the main thread, SIGINT, SIGTERM
    and SIGHUP stop the request in two steps, and it raises :class:`~asyncflow.errors.Interrupted`.
    With ``settings.cluster``, the steps run on that Ray cluster and the books stay here
    (:mod:`asyncflow.cluster`; :class:`~asyncflow.errors.ClusterError` when it cannot).
    """
    settings = settings or Settings.from_env()
    items = request_items(entries)
    if not items:
        raise RequestError("the request has no inputs")
    label_config = load_label_config(settings.label_config) if settings.label_config else {}
    plan = build_plan(settings) if backend is None else ModelPlan.of(backend)
    model = await anyio.to_thread.run_sync(model_key, plan, settings)  # before any file
    cluster = None
    if settings.cluster is not None:  # asyncflow.cluster: the steps on its nodes, the books here
        cluster = await anyio.to_thread.run_sync(connect, settings.cluster)
        await anyio.to_thread.run_sync(cluster.check, settings.work_dir or Path(tempfile.gettempdir()), plan)
        settings, plan = cluster.per_node(settings), cluster.plan(plan, settings)
    at_once = inputs_on_disk_at_once(settings, plan)
    check_free_space(settings.work_dir, settings.disk_headroom, [i.size for i in items], at_once)
    request_id = uuid.uuid4().hex[:12]
    watch = Stopwatch()
    ledger = Ledger(
        on_progress,
        keep_bytes=sink is None or not sink.keeps_files,
        on_withdraw=sink.withdraw if sink is not None else None,
        on_stage=on_stage,
        objects=sum(1 for item in items if item.remote is not None),
        model=model_provenance(plan, settings, model),
        items=items,
    )
    budget = MemoryBudget(settings.memory_budget_bytes())
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        log.info(
            "request.started",
            inputs=len(items),
            bytes=sum(i.size for i in items),
            memory_budget_bytes=budget.limit,
        )
        swept, swept_bytes = await anyio.to_thread.run_sync(sweep_stale, settings.work_dir)
        if swept:
            log.info("workspace.swept", folders=swept, bytes=swept_bytes)
        status, error = RequestStatus.ERROR, None
        request: _Request | None = None
        # The request's folder exists from here: whatever happens next, ``finally`` removes it.
        workspace = Workspace(request_id, settings.work_dir, items, settings.archive_limits())
        try:
            offload = cluster.offload() if cluster is not None else None
            flow = CaseFlow(ledger, workspace, budget, stop or Stop(settings.grace_s), offload)
            request = _Request(settings, plan, flow, label_config, sink, model, cluster)
            watch_signals = stop is not None and (not stop.signals or can_watch_signals())
            await request.run(items, watch_signals=watch_signals)
            result = ledger.result(request_id, watch.seconds, request.intake.skipped)
            status = result.status
            return result
        except (anyio.get_cancelled_exc_class(), KeyboardInterrupt):
            status = RequestStatus.CANCELLED
            raise
        except Exception as exc:
            error = exc
            raise
        finally:
            workspace.close()
            if cluster is not None:
                cluster.close(plan)
            skipped = request.intake.skipped if request is not None else []
            reason = f"{type(error).__name__}: {error}" if error is not None else None
            if on_finish is not None:
                final = status if status in (RequestStatus.ERROR, RequestStatus.CANCELLED) else None
                on_finish(ledger.result(request_id, watch.seconds, skipped, final, reason))
            _log_finished(ledger, skipped, status, error, watch)


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    """The exceptions of a group and of the groups inside it."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


def _log_finished(
    ledger: Ledger,
    skipped: list[SkippedFile],
    status: RequestStatus,
    error: Exception | None,
    watch: Stopwatch,
) -> None:
    """``request.finished``: the request's one summary event."""
    statuses = [r.status for r in ledger.live_reports()]
    log.info(
        "request.finished",
        status=status,
        cases=len(statuses),
        cases_done=statuses.count(CaseStatus.DONE),
        cases_failed=statuses.count(CaseStatus.FAILED),
        cases_resumed=statuses.count(CaseStatus.RESUMED),
        files_skipped=len(skipped),
        duration_s=watch.duration_s,
        peak_rss_bytes=peak_rss_bytes(),
        **({"error_type": type(error).__name__, "reason": scrub(str(error))} if error is not None else {}),
    )


def run_request_sync(entries: Iterable[Entry], settings: Settings | None = None, **kwargs: Any) -> Result:
    """:func:`run_request` for synchronous callers (the CLI, FLAME's ``analysis_method``). Called
    from the main thread it stops in two steps on SIGINT, SIGTERM and SIGHUP
    (:mod:`asyncflow.pipeline.stopping`; pass your own ``stop=`` to be told of the first), and
    raises :class:`~asyncflow.errors.Interrupted`; from another thread it installs no handler."""
    settings = settings or Settings.from_env()
    if "stop" not in kwargs and can_watch_signals():
        kwargs["stop"] = Stop(settings.grace_s)
    return anyio.run(lambda: run_request(entries, settings, **kwargs))

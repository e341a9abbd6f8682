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

This module owns all concurrency; the stage functions it calls are plain
synchronous functions from the domain modules.
"""

from __future__ import annotations

import errno
import math
import resource
import shutil
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .assemble import CaseBuilder, Scan, scan
from .backends import Backend, ModelInfo, create_backend
from .budget import MemoryBudget
from .case import (
    Case,
    CaseReport,
    CaseStatus,
    PreparedCase,
)
from .enums import InputKind, RequestStatus, Stage
from .export import export_output
from .inputs import Entry, InputItem, RequestError, UnpackedInput, request_items, restore_files, unpack
from .labels import load_label_config
from .log import get_logger, scrub
from .prepare import prepare_case
from .result import Progress, Result
from .seg import Algorithm, SegOptions
from .settings import Settings

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

log = get_logger("asyncflow.pipeline")
R = TypeVar("R")


def build_backend(settings: Settings, device: str | None = None) -> Backend:
    """The prediction backend the settings describe, on ``device`` (default: ``settings.device``), not loaded."""
    generation, folder = settings.resolve_model()
    read = ModelInfo.from_v1_folder if generation == "v1" else ModelInfo.from_folder
    info = read(folder, folds=settings.folds, checkpoint=settings.model_option("checkpoint", generation))
    return create_backend(
        info,
        tile_step_size=settings.tile_step_size,
        use_mirroring=settings.use_mirroring,
        device=device or settings.device,
        torch_threads=settings.torch_threads,
        v1_command=settings.v1_command,
        v1_batch_size=settings.v1_batch_size,
        v1_case_timeout_s=settings.v1_case_timeout_s,
        v1_preprocess_threads=settings.v1_preprocess_threads,
        v1_export_threads=settings.v1_export_threads,
    )


def build_backends(settings: Settings) -> list[Backend]:
    """One backend per prediction worker: one per device of ``settings.devices``, else one."""
    return [build_backend(settings, device) for device in settings.devices or (settings.device,)]


def _stream(size: int) -> tuple[MemoryObjectSendStream[Any], MemoryObjectReceiveStream[Any]]:
    return anyio.create_memory_object_stream[Any](size)


class _Request:
    def __init__(
        self,
        settings: Settings,
        backends: Sequence[Backend],
        workdir: Path,
        on_progress: Callable[[Progress], None] | None,
        label_config: Mapping[int, Mapping[str, Any]],
        budget: MemoryBudget,
    ) -> None:
        self.settings = settings
        self.backends = backends  # one prediction worker each
        self.needs_files = any(b.needs_files for b in backends)  # else the model input stays in memory
        self.workdir = workdir
        self.on_progress = on_progress
        self.builder = CaseBuilder(multi_modal=settings.multi_modal, opaque_names=settings.opaque_names)
        self.reports: dict[str, CaseReport] = {}
        # Cases whose series grew or lost an input after they were made: dropped when they end.
        self.withdrawn: set[str] = set()
        self.written: dict[str, list[tuple[dict[str, bytes], str]]] = {}  # case id -> its outputs
        # Unpacked files are deleted when the last case that reads them ends (bounded disk);
        # one a later case needs again (its series grew) is unpacked again from its input.
        self.items: dict[int, InputItem] = {}
        self.holds: Counter[Path] = Counter()  # unpacked file -> cases that still read it
        self.released: set[Path] = set()
        self.restores = 0
        # The first input is unpacked and scanned alone: its cases reach the GPU sooner when the
        # other unpack workers do not share the cores with it. Set once its cases are sent on.
        self.first_input_assembled = anyio.Event()
        self.unpack_leader_taken = False
        self.inputs: list[dict[str, Any]] = []
        self.dicom: dict[str, bytes] = {}
        self.nifti: dict[str, bytes] = {}
        self.label_json: dict[str, bytes] = {}
        self.limits = settings.archive_limits()
        self.label_config = label_config
        self.seg_options = SegOptions(
            settings.seg_type, settings.seg_keep_empty_frames, settings.seg_compression, settings.deidentify
        )
        self.total: int | None = None
        # The model's CPU work around the network (v2), done by the prepare and export workers;
        # a case starts it only when its memory estimate fits in the budget.
        self.steps = backends[0].steps
        self.budget = budget
        info = self.info = backends[0].info
        self.algorithm = Algorithm(f"nnU-Net {info.name}", info.framework, info.parameters)

    # -- orchestration -----------------------------------------------------------

    async def run(self, items: list[InputItem]) -> None:
        self.items = {item.index: item for item in items}
        size = self.settings.queue_size
        unpacked_send, unpacked_recv = _stream(size)
        cases_send, cases_recv = _stream(size)
        prepared_send, prepared_recv = _stream(_prepared_queue_size(self.settings, self.backends))
        predicted_send, predicted_recv = _stream(size)
        async with anyio.create_task_group() as tg:
            self._fan_out(tg, self.settings.unpack_workers, self._unpack_worker, iter(items), unpacked_send)
            tg.start_soon(self._assemble, unpacked_recv, cases_send)
            self._fan_out(tg, self.settings.prepare_workers, self._prepare_worker, cases_recv, prepared_send)
            for number, backend in enumerate(self.backends):  # each takes the next prepared case
                tg.start_soon(
                    self._predict_worker, number, backend, prepared_recv.clone(), predicted_send.clone()
                )
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
        """A stage may take several steps (prepare: read, then the model's preprocessing)."""
        stage_s = self.reports[case.case_id].stage_s
        stage_s[stage] = stage_s.get(stage, 0.0) + seconds

    def _fail(self, case: Case, stage: Stage, error: Exception, seconds: float) -> None:
        self._add_seconds(case, stage, seconds)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            error = OSError(error.errno, f"disk full while writing the case's files ({error.strerror})")
        self._end_case(case, stage=stage, error=error)

    def _end_case(self, case: Case, *, stage: Stage | None = None, error: Exception | None = None) -> None:
        """Book a case as done or failed, remove its working folder and the unpacked files no
        other case reads, report progress."""
        shutil.rmtree(self._case_dir(case), ignore_errors=True)
        self._release(case)
        self.budget.release(case.case_id)
        if case.case_id in self.withdrawn:
            self._forget(case.case_id)
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
                **_identity(case),
            )
        else:
            report.status = CaseStatus.DONE
        log.info(
            "case.finished",
            status=str(report.status),
            kind=str(report.kind),
            **_identity(case),
            **{f"{stage}_s": round(seconds, 4) for stage, seconds in report.stage_s.items()},
        )
        if self.on_progress is not None:
            statuses = [r.status for r in self.live_reports()]
            self.on_progress(
                Progress(
                    done=statuses.count(CaseStatus.DONE),
                    failed=statuses.count(CaseStatus.FAILED),
                    total=self.total,
                )
            )

    def _case_dir(self, case: Case) -> Path:
        return self.workdir / "cases" / case.case_id

    def _input_dir(self, index: int) -> Path:
        return self.workdir / "inputs" / f"{index:04d}"

    def _unpacked_sources(self, case: Case) -> list[Path]:
        """The files of ``case`` that were unpacked into this request's folder (not used in place)."""
        inputs = self.workdir / "inputs"
        sources = [*case.files, *([case.label_file] if case.label_file else [])]
        return [p for p in dict.fromkeys(sources) if p.is_relative_to(inputs)]

    async def _hold(self, case: Case) -> None:
        """Count ``case`` as a reader of its unpacked files; unpack again those already deleted."""
        sources = self._unpacked_sources(case)
        self.holds.update(sources)
        missing: dict[int, list[Path]] = defaultdict(list)
        for path in sources:
            if path in self.released:
                missing[int(path.relative_to(self.workdir / "inputs").parts[0])].append(path)
        for index, files in missing.items():
            started = time.perf_counter()
            scratch = self.workdir / "restore" / f"{index:04d}-{self.restores}"
            self.restores += 1
            await anyio.to_thread.run_sync(
                restore_files, self.items[index], self._input_dir(index), files, scratch, self.limits
            )
            self.released.difference_update(files)
            log.info(
                "input.restored",
                input_index=index,
                files=len(files),
                duration_s=round(time.perf_counter() - started, 4),
            )

    def _release(self, case: Case) -> None:
        """``case`` has ended: delete its unpacked files that no other case reads."""
        for path in self._unpacked_sources(case):
            self.holds[path] -= 1
            if self.holds[path] <= 0:
                del self.holds[path]
                path.unlink(missing_ok=True)
                self.released.add(path)

    def live_reports(self) -> list[CaseReport]:
        """Reports of the cases that count: all but the withdrawn."""
        return [r for case_id, r in self.reports.items() if case_id not in self.withdrawn]

    def _take_withdrawn(self) -> None:
        """The builder withdrew cases (their series grew or lost an input): drop what they made."""
        for case in self.builder.withdrawn:
            self.withdrawn.add(case.case_id)
            log.info("case.withdrawn", case_id=case.case_id)
            if self.reports[case.case_id].status is not CaseStatus.PENDING:  # it has ended already
                self._forget(case.case_id)
        self.builder.withdrawn.clear()

    def _forget(self, case_id: str) -> None:
        self.reports.pop(case_id, None)
        for outputs, name in self.written.pop(case_id, []):
            outputs.pop(name, None)

    # -- stages --------------------------------------------------------------------

    async def _unpack_worker(
        self, items: Iterator[InputItem], send: MemoryObjectSendStream[tuple[UnpackedInput, Scan | None]]
    ) -> None:
        """Unpack and scan inputs (scanning here, not in ``assemble``, spreads it over the workers)."""
        leader = not self.unpack_leader_taken
        self.unpack_leader_taken = True
        if not leader:
            await self.first_input_assembled.wait()
        async with send:
            for item in items:  # shared iterator: each worker takes the next item
                started = time.perf_counter()
                unpacked = await anyio.to_thread.run_sync(
                    unpack, item, self._input_dir(item.index), self.limits
                )
                duration = round(time.perf_counter() - started, 4)
                if unpacked.error:
                    log.warning("input.failed", input_index=item.index, reason=scrub(unpacked.error))
                elif unpacked.kind is InputKind.ARCHIVE:
                    log.info(
                        "archive.extracted",
                        input_index=item.index,
                        files=len(unpacked.files),
                        members_skipped=len(unpacked.skipped),
                        bytes=unpacked.bytes_written,
                        duration_s=duration,
                    )
                else:
                    log.info("file.received", input_index=item.index, bytes=item.size, duration_s=duration)
                scanned = None
                if not unpacked.error:
                    scanned = await anyio.to_thread.run_sync(scan, unpacked, self.limits.max_file_bytes)
                    if scanned.skipped:
                        log.info("files.skipped", input_index=item.index, files=len(scanned.skipped))
                await send.send((unpacked, scanned))

    async def _assemble(
        self,
        receive: MemoryObjectReceiveStream[tuple[UnpackedInput, Scan | None]],
        send: MemoryObjectSendStream[Case],
    ) -> None:
        async with receive, send:
            async for unpacked, scanned in receive:
                self.inputs.append(
                    {
                        "index": unpacked.item.index,
                        "name": unpacked.item.name,
                        "kind": unpacked.kind,
                        "files": len(unpacked.files),
                        "bytes": unpacked.item.size,
                        "error": unpacked.error,
                    }
                )
                if scanned is None:  # the input failed
                    self.builder.broken(unpacked)
                    self._take_withdrawn()
                else:
                    cases = self.builder.add(scanned)
                    self._take_withdrawn()
                    for case in cases:
                        await self._emit(case, send)
                self.first_input_assembled.set()
            for case in self.builder.finish():
                await self._emit(case, send)
            self.total = len(self.live_reports())
            log.info("request.assembled", cases=self.total, files_skipped=len(self.builder.skipped))
            if not self.total:  # end now, with the report, not once the model has loaded
                failed_inputs = sum(1 for i in self.inputs if i["error"])
                raise RequestError(
                    f"no usable case in the request: {len(self.inputs)} input(s), {failed_inputs} unreadable, "
                    f"{len(self.builder.skipped)} file(s) skipped (the report gives each file's reason)"
                )

    async def _emit(self, case: Case, send: MemoryObjectSendStream[Case]) -> None:
        self.reports[case.case_id] = CaseReport(case.case_id, case.kind, case.origin, source=case.source)
        log.info(
            "case.assembled",
            case_id=case.case_id,
            kind=str(case.kind),
            files=len(case.files),
            **_identity(case),
        )
        started = time.perf_counter()
        try:
            await self._hold(case)
        except OSError as exc:  # its input changed or vanished since it was first unpacked
            with structlog.contextvars.bound_contextvars(case_id=case.case_id):
                self._fail(case, Stage.PREPARE, exc, time.perf_counter() - started)
            return
        await send.send(case)

    async def _prepare_worker(
        self, receive: MemoryObjectReceiveStream[Case], send: MemoryObjectSendStream[PreparedCase]
    ) -> None:
        async with receive, send:
            async for case in receive:
                if case.case_id in self.withdrawn:
                    self._end_case(case)
                    continue
                with structlog.contextvars.bound_contextvars(case_id=case.case_id):
                    prepared = await self._step(
                        case, Stage.PREPARE, prepare_case, case, self._case_dir(case), self.needs_files
                    )
                    if prepared is None:
                        continue
                    channels = len(prepared.images)
                    read_s = self.reports[case.case_id].stage_s[Stage.PREPARE]
                    admitted = await self._preprocess(prepared)
                    if admitted is None:
                        continue
                    reserved, memory_wait_s = admitted
                    prepare_s = self.reports[case.case_id].stage_s[Stage.PREPARE]
                    log.info(
                        "case.prepared",
                        channels=channels,
                        duration_s=round(prepare_s, 4),
                        preprocess_s=round(prepare_s - read_s, 4),
                        model_input_bytes=_nbytes(prepared.model_input),
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

    async def _predict_worker(
        self,
        worker: int,
        backend: Backend,
        receive: MemoryObjectReceiveStream[PreparedCase],
        send: MemoryObjectSendStream[tuple[PreparedCase, Any]],
    ) -> None:
        async with receive, send:
            started = time.perf_counter()
            # Abandoned if the request ends first (no usable case): the load finishes unobserved.
            await anyio.to_thread.run_sync(backend.load, abandon_on_cancel=True)
            log.info(
                "model.loaded",
                worker=worker,
                model=backend.info.name,
                folds=len(backend.info.folds),
                duration_s=round(time.perf_counter() - started, 4),
            )
            async for first in receive:
                batch = [first]
                while len(batch) < backend.max_batch:  # every case that is ready, never waiting
                    try:
                        batch.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await self._predict(worker, backend, batch, receive, send)

    async def _predict(
        self,
        worker: int,
        backend: Backend,
        batch: list[PreparedCase],
        receive: MemoryObjectReceiveStream[PreparedCase],
        send: MemoryObjectSendStream[tuple[PreparedCase, Any]],
    ) -> None:
        """One backend call for ``batch``; when the call fails as a whole, each case alone."""
        for prepared in batch:
            if prepared.case.case_id in self.withdrawn:
                self._end_case(prepared.case)
        batch = [p for p in batch if p.case.case_id not in self.withdrawn]
        if not batch:
            return
        started = time.perf_counter()
        try:
            outcomes = await backend.predict(batch)
            if len(outcomes) != len(batch):
                raise RuntimeError(f"the backend returned {len(outcomes)} result(s) for {len(batch)} case(s)")
        except Exception as exc:  # noqa: BLE001 - isolated below: no case fails for another's error
            if len(batch) > 1:
                log.warning(
                    "predict.batch_failed",
                    cases=len(batch),
                    error_type=type(exc).__name__,
                    reason=scrub(str(exc)),
                    duration_s=round(time.perf_counter() - started, 4),
                )
                for prepared in batch:
                    await self._predict(worker, backend, [prepared], receive, send)
                return
            outcomes = [exc]
        seconds = time.perf_counter() - started  # cases predicted together share one interval
        for prepared, outcome in zip(batch, outcomes, strict=True):
            case = prepared.case
            with structlog.contextvars.bound_contextvars(case_id=case.case_id):
                if isinstance(outcome, Exception):
                    self._fail(case, Stage.PREDICT, outcome, seconds)
                    continue
                self.reports[case.case_id].stage_s[Stage.PREDICT] = seconds
                # The model's input is not needed any more: export reads the sources.
                prepared.images, prepared.model_input = [], None
                network = getattr(outcome, "network_s", None)  # known where the backend has steps
                log.info(
                    "case.predicted",
                    voxels=math.prod(prepared.geometry.size),
                    duration_s=round(seconds, 4),
                    **({"network_s": round(network, 4)} if network is not None else {}),
                    output_bytes=_nbytes(outcome),
                    batch=len(batch),
                    worker=worker,
                    predict_queue=receive.statistics().current_buffer_used,
                )
                waited = time.perf_counter()
                await send.send((prepared, outcome))
                waited = time.perf_counter() - waited
                if waited >= 0.001:  # every export worker busy and the queue full: CPU shortage
                    log.info("predict.blocked", worker=worker, duration_s=round(waited, 4))

    async def _export_worker(
        self, receive: MemoryObjectReceiveStream[tuple[PreparedCase, Any]], _: None
    ) -> None:
        async with receive:
            async for prepared, output in receive:
                case = prepared.case
                if case.case_id in self.withdrawn:
                    self._end_case(case)
                    continue
                with structlog.contextvars.bound_contextvars(case_id=case.case_id):
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
                        self.seg_options,
                    )
                    del output  # the logits: often the largest thing a case holds
                    if done is None:
                        continue
                    exported, to_labels_s = done
                    outputs = self.dicom if exported.format == "dicom_seg" else self.nifti
                    outputs[exported.name] = exported.data
                    written = self.written[case.case_id] = [(outputs, exported.name)]
                    if exported.label_json is not None:
                        self.label_json[exported.label_json[0]] = exported.label_json[1]
                        written.append((self.label_json, exported.label_json[0]))
                    report = self.reports[case.case_id]
                    report.output = exported.name
                    report.labels_present = exported.labels_present
                    report.labels_absent = exported.labels_absent
                    report.fallback = exported.fallback
                    fallback = {"fallback": scrub(exported.fallback)} if exported.fallback else {}
                    log.info(
                        "case.exported",
                        format=exported.format,
                        bytes=len(exported.data),
                        duration_s=round(report.stage_s[Stage.EXPORT], 4),
                        to_labels_s=round(to_labels_s, 4),
                        **fallback,
                    )
                    self._end_case(case)

    # -- result --------------------------------------------------------------------

    def result(
        self,
        request_id: str,
        duration_s: float,
        status: RequestStatus | None = None,
        error: str | None = None,
    ) -> Result:
        """The result so far; ``status`` overrides the one the cases and inputs give (cancelled,
        error), ``error`` says why the request ended early."""
        reports = sorted(self.live_reports(), key=lambda r: r.case_id)
        failed = sum(r.status is not CaseStatus.DONE for r in reports)
        # An input that could not be read, or whose members were refused, is lost like a failed case.
        lost_inputs = any(i["error"] for i in self.inputs) or any(s.refused for s in self.builder.skipped)
        if status is None:
            status = (
                RequestStatus.FAILED
                if failed == len(reports)
                else RequestStatus.PARTIAL
                if failed or lost_inputs
                else RequestStatus.DONE
            )
        return Result(
            request_id=request_id,
            status=status,
            dicom_seg_bytes=self.dicom,
            nifti_seg_bytes=self.nifti,
            label_json_bytes=self.label_json,
            cases=reports,
            inputs=sorted(self.inputs, key=lambda i: i["index"]),
            skipped=self.builder.skipped,
            duration_s=duration_s,
            error=error,
        )


async def run_request(
    entries: Iterable[Entry],
    settings: Settings | None = None,
    *,
    backend: Backend | Sequence[Backend] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_finish: Callable[[Result], None] | None = None,
) -> Result:
    """Segment every volume of a request.

    ``entries`` is a list of ``bytes``, ``{name: bytes}`` mappings or local paths.
    Pass a loaded ``backend`` to reuse a model across requests, or several
    (one per device): each is one prediction worker, one case at a time. ``on_finish``
    receives the result as it stands when the request ends in any way, also on
    error or cancellation (cases not reached are ``pending``). Raises
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
    _check_free_space(settings, backends, [i.size for i in items])
    request_id = uuid.uuid4().hex[:12]
    started = time.perf_counter()
    if settings.work_dir is not None:
        settings.work_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"asyncflow-{request_id}-", dir=settings.work_dir))
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        budget = MemoryBudget(settings.memory_budget_bytes())
        log.info(
            "request.started",
            inputs=len(items),
            bytes=sum(i.size for i in items),
            memory_budget_bytes=budget.limit,
        )
        request = _Request(settings, backends, workdir, on_progress, label_config, budget)
        status, error = RequestStatus.ERROR, None
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
            result = request.result(request_id, time.perf_counter() - started)
            status = result.status
            return result
        except (anyio.get_cancelled_exc_class(), KeyboardInterrupt):
            status = RequestStatus.CANCELLED
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            if on_finish is not None:
                final = status if status in (RequestStatus.ERROR, RequestStatus.CANCELLED) else None
                on_finish(request.result(request_id, time.perf_counter() - started, final, error))
            statuses = [r.status for r in request.live_reports()]
            log.info(
                "request.finished",
                status=status,
                cases=len(statuses),
                cases_done=statuses.count(CaseStatus.DONE),
                cases_failed=statuses.count(CaseStatus.FAILED),
                files_skipped=len(request.builder.skipped),
                duration_s=round(time.perf_counter() - started, 4),
                peak_rss_bytes=peak_rss_bytes(),
            )


def _identity(case: Case) -> dict[str, Any]:
    """What names a case in its events without patient data: series UID, number, modality, part."""
    return case.source.event_fields() if case.source else {}


def _nbytes(value: Any) -> int:
    """The size of a model input or backend output, for the events (0 when it has no size)."""
    return int(getattr(value, "nbytes", 0))


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, which, unlike ``ru_maxrss``, does not
    carry over a parent's peak through fork and exec; ``ru_maxrss`` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prepared_queue_size(settings: Settings, backends: Sequence[Backend]) -> int:
    """Room for a whole batch: the prediction worker takes every prepared case that waits."""
    return max(settings.queue_size, *(b.max_batch for b in backends))


def _inputs_on_disk_at_once(settings: Settings, backends: Sequence[Backend]) -> int:
    """At most how many inputs have unpacked files at once: those being unpacked, queued or
    assembled, and one per case in flight (a file is deleted when its last case ends)."""
    size = settings.queue_size
    waiting = settings.unpack_workers + size + 1
    in_flight = (
        size  # assembled cases queued for prepare
        + settings.prepare_workers
        + _prepared_queue_size(settings, backends)
        + len(backends)  # one batch per prediction worker
        + size  # predicted cases queued for export
        + settings.export_workers
    )
    return waiting + in_flight


def _check_free_space(settings: Settings, backends: Sequence[Backend], input_sizes: list[int]) -> None:
    """Fail before any work when the work folder's disk cannot hold what the request unpacks at once:
    ``disk_headroom`` x the largest inputs that can be on disk together (or all of them)."""
    if not settings.disk_headroom:
        return
    parent = settings.work_dir or Path(tempfile.gettempdir())
    at_once = sorted(input_sizes, reverse=True)[: _inputs_on_disk_at_once(settings, backends)]
    need = int(settings.disk_headroom * sum(at_once))
    existing = next(p for p in (parent, *parent.parents) if p.exists())  # work_dir may not exist yet
    free = shutil.disk_usage(existing).free
    if free < need:
        which = (
            "input"
            if len(at_once) == len(input_sizes)
            else f"the {len(at_once)} largest inputs, as many as can be unpacked at once"
        )
        raise RequestError(
            f"not enough free disk space in {parent}: about {need / 1e9:.1f} GB needed "
            f"({settings.disk_headroom:g} x the {sum(at_once) / 1e9:.1f} GB of {which}), "
            f"{free / 1e9:.1f} GB free; free some space, choose another --work-dir, or lower disk_headroom"
        )


def run_request_sync(entries: Iterable[Entry], settings: Settings | None = None, **kwargs: Any) -> Result:
    """:func:`run_request` for synchronous callers (the CLI, FLAME's ``analysis_method``)."""
    return anyio.run(lambda: run_request(entries, settings, **kwargs))

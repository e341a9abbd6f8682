"""The prediction stage: one worker per device, each making one backend call at a time.

A worker loads its backend (while the first inputs are unpacked), then takes the
next prepared case, with every other case already waiting up to the backend's
``max_batch`` (v1 batches; v2 predicts one case per call). A call that fails as
a whole is retried case by case, so no case fails for another's error. The
pipeline (:mod:`asyncflow.pipeline.run`) wires the workers between the prepare and
export stages and owns the books they write into.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from asyncflow.backends.base import Backend
from asyncflow.case import Case, PreparedCase
from asyncflow.enums import Stage
from asyncflow.log import get_logger, scrub
from asyncflow.pipeline.ledger import Fail, Ledger

__all__ = ["PredictionWorker", "nbytes"]

log = get_logger("asyncflow.pipeline.run")  # the events keep the logger name they always had


def nbytes(value: Any) -> int:
    """The size of a model input or backend output, for the events (0 when it has no size)."""
    return int(getattr(value, "nbytes", 0))


class PredictionWorker:
    """Worker ``number`` of a request: ``backend`` predicts; a case that fails goes to ``fail``,
    one withdrawn by the assembly to ``end``; the rest go on to export with their output."""

    def __init__(
        self, number: int, backend: Backend, ledger: Ledger, fail: Fail, end: Callable[[Case], None]
    ) -> None:
        self.number, self.backend, self.ledger = number, backend, ledger
        self._fail, self._end = fail, end

    async def run(
        self,
        receive: MemoryObjectReceiveStream[PreparedCase],
        send: MemoryObjectSendStream[tuple[PreparedCase, Any]],
    ) -> None:
        backend = self.backend
        async with receive, send:
            started = time.perf_counter()
            # Abandoned if the request ends first (no usable case): the load finishes unobserved.
            await anyio.to_thread.run_sync(backend.load, abandon_on_cancel=True)
            log.info(
                "model.loaded",
                worker=self.number,
                model=backend.info.name,
                folds=len(backend.info.folds),
                device=str(getattr(backend, "device", "unknown")),
                duration_s=round(time.perf_counter() - started, 4),
            )
            async for first in receive:
                batch = [first]
                while len(batch) < backend.max_batch:  # every case that is ready, never waiting
                    try:
                        batch.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await self._predict(batch, receive, send)

    async def _predict(
        self,
        batch: list[PreparedCase],
        receive: MemoryObjectReceiveStream[PreparedCase],
        send: MemoryObjectSendStream[tuple[PreparedCase, Any]],
    ) -> None:
        """One backend call for ``batch``; when the call fails as a whole, each case alone."""
        withdrawn = self.ledger.withdrawn
        for prepared in batch:
            if prepared.case.case_id in withdrawn:
                self._end(prepared.case)
        batch = [p for p in batch if p.case.case_id not in withdrawn]
        if not batch:
            return
        for prepared in batch:
            self.ledger.enter(prepared.case, Stage.PREDICT)
        started = time.perf_counter()
        try:
            outcomes = await self.backend.predict(batch)
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
                    await self._predict([prepared], receive, send)
                return
            outcomes = [exc]
        seconds = time.perf_counter() - started  # cases predicted together share one interval
        for prepared, outcome in zip(batch, outcomes, strict=True):
            case = prepared.case
            with structlog.contextvars.bound_contextvars(case_id=case.case_id):
                if isinstance(outcome, Exception):
                    self._fail(case, Stage.PREDICT, outcome, seconds)
                    continue
                self.ledger.report(case).stage_s[Stage.PREDICT] = seconds
                # The model's input is not needed any more: export reads the sources.
                prepared.images, prepared.model_input = [], None
                network = getattr(outcome, "network_s", None)  # known where the backend has steps
                log.info(
                    "case.predicted",
                    voxels=math.prod(prepared.geometry.size),
                    duration_s=round(seconds, 4),
                    **({"network_s": round(network, 4)} if network is not None else {}),
                    output_bytes=nbytes(outcome),
                    batch=len(batch),
                    worker=self.number,
                    predict_queue=receive.statistics().current_buffer_used,
                )
                waited = time.perf_counter()
                await send.send((prepared, outcome))
                waited = time.perf_counter() - waited
                if waited >= 0.001:  # every export worker busy and the queue full: CPU shortage
                    log.info("predict.blocked", worker=self.number, duration_s=round(waited, 4))

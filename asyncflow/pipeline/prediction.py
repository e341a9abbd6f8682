"""The prediction stage: one worker per device, each making one backend call at a time.

A worker loads its backend (while the first inputs are unpacked), then takes the
next prepared case, with every other case already waiting up to the backend's
``max_batch`` (v1 batches; v2 predicts one case per call). A call that fails as
a whole is retried case by case, so no case fails for another's error. The
pipeline (:mod:`asyncflow.pipeline.run`) wires the workers between the prepare and
export stages.

A model of several stages (a cascade) answers a case's first call with a
:class:`~asyncflow.backends.base.NextStage`: the worker makes the case's next input from it
in a worker thread (at most ``stage_threads`` at once; the CPU work between the stages,
which does not hold the device), then predicts the case again, taking its turn at the
device with the cases that arrive from the prepare stage; only its last output goes to
export. The cases between stages are counted in the memory budget (admitted at
preparation), which is what bounds how many wait there; the worker ends once every one of
them is predicted.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from asyncflow.backends.base import Backend, NetworkTimed, NextStage, nbytes
from asyncflow.case import PreparedCase
from asyncflow.enums import Stage
from asyncflow.log import Stopwatch, bound_case, get_logger, scrub
from asyncflow.pipeline.flow import CaseFlow

__all__ = ["SLOW_ON_CPU_S", "PredictionWorker"]

# Seconds per case on the CPU from which the worker says, once, what would be faster.
SLOW_ON_CPU_S = 60.0

log = get_logger(__name__)


class PredictionWorker:
    """Worker ``number`` of a request: ``backend`` predicts; a case that fails ends in ``flow``,
    the rest go on to export with their output (or, after a stage that is not the last, are
    predicted again; ``stage_threads`` bounds the threads making their next inputs)."""

    def __init__(
        self, number: int, backend: Backend, flow: CaseFlow, stage_threads: anyio.CapacityLimiter
    ) -> None:
        self.number, self.backend, self.flow = number, backend, flow
        self.stage_threads = stage_threads
        self.advised = False  # predict.slow said once
        self.device = anyio.Lock()  # one backend call at a time: new cases and next stages alike
        self.staged: TaskGroup | None = None  # the cases between two stages

    async def run(
        self,
        receive: MemoryObjectReceiveStream[PreparedCase],
        send: MemoryObjectSendStream[tuple[PreparedCase, Any]],
    ) -> None:
        backend = self.backend
        async with receive, send, anyio.create_task_group() as self.staged:
            watch = Stopwatch()
            # Abandoned if the request ends first (no usable case): the load finishes unobserved.
            await anyio.to_thread.run_sync(backend.load, abandon_on_cancel=True)
            log.info(
                "model.loaded",
                worker=self.number,
                model=backend.info.name,
                folds=len(backend.info.folds),
                device=str(backend.device),
                duration_s=watch.duration_s,
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
        batch = [prepared for prepared in batch if self.flow.enter(prepared.case, Stage.PREDICT)]
        if not batch:
            return
        watch = Stopwatch()
        try:
            async with self.device:
                watch = Stopwatch()  # the hold: from the device's turn (a cascade's stages take turns)
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
                    duration_s=watch.duration_s,
                )
                for prepared in batch:
                    await self._predict([prepared], receive, send)
                return
            outcomes = [exc]
        seconds = watch.seconds  # cases predicted together share one interval
        for prepared, outcome in zip(batch, outcomes, strict=True):
            with bound_case(prepared.case.case_id):
                if isinstance(outcome, Exception):
                    self.flow.fail(prepared.case, Stage.PREDICT, outcome, seconds)
                else:
                    await self._hand_on(prepared, outcome, seconds, len(batch), receive, send)

    def _advise(self, seconds: float) -> None:
        """Once: a first case slow on the CPU, and what would make the next ones faster."""
        if self.advised or str(self.backend.device) != "cpu" or seconds < SLOW_ON_CPU_S:
            return
        self.advised = True
        log.warning(
            "predict.slow",
            worker=self.number,
            device="cpu",
            duration_s=round(seconds, 1),
            advice="on the CPU: --no-mirroring predicts several times faster, --resampling torch cuts "
            "the CPU work around the network, and a GPU (--device cuda) is what nnU-Net is made for",
        )

    async def _hand_on(
        self,
        prepared: PreparedCase,
        outcome: Any,
        seconds: float,
        batch: int,
        receive: MemoryObjectReceiveStream[PreparedCase],
        send: MemoryObjectSendStream[tuple[PreparedCase, Any]],
    ) -> None:
        """A case predicted: booked, logged and sent to export (waiting for room there), or
        to its next stage."""
        self.flow.ledger.add_seconds(prepared.case, Stage.PREDICT, seconds)
        # The model's input is not needed any more (export reads the intensities, kept apart).
        stage = getattr(prepared.model_input, "stage", None)
        prepared.images, prepared.model_input = [], None
        network = {"network_s": round(outcome.network_s, 4)} if isinstance(outcome, NetworkTimed) else {}
        log.info(
            "case.predicted",
            voxels=math.prod(prepared.geometry.size),
            duration_s=round(seconds, 4),
            **network,
            output_bytes=nbytes(outcome),
            batch=batch,
            worker=self.number,
            predict_queue=receive.statistics().current_buffer_used,
            **({"stage": stage} if stage is not None else {}),
        )
        self._advise(seconds / batch)
        if isinstance(outcome, NextStage):
            assert self.staged is not None
            self.staged.start_soon(self._next_stage, prepared, outcome, receive, send)
            return
        waited = Stopwatch()
        await send.send((prepared, outcome))
        if waited.seconds >= 0.001:  # every export worker busy and the queue full: CPU shortage
            log.info("predict.blocked", worker=self.number, duration_s=waited.duration_s)

    async def _next_stage(
        self,
        prepared: PreparedCase,
        outcome: NextStage,
        receive: MemoryObjectReceiveStream[PreparedCase],
        send: MemoryObjectSendStream[tuple[PreparedCase, Any]],
    ) -> None:
        """A case between two stages: its next input made on the CPU (booked to its prepare
        stage; the device is free meanwhile), then predicted again."""
        case = prepared.case
        with bound_case(case.case_id):
            async with self.stage_threads:
                watch = Stopwatch()
                model_input = await self.flow.step(case, Stage.PREPARE, outcome.next_input, prepared)
            del outcome  # the previous stage's output: its label map is in the input now
            if model_input is None:
                return
            prepared.model_input = model_input
            log.info(
                "case.staged",
                stage=getattr(model_input, "stage", None),
                duration_s=watch.duration_s,
                model_input_bytes=nbytes(model_input),
                worker=self.number,
            )
        await self._predict([prepared], receive, send)

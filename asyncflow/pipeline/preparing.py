"""The prepare stage: N workers read each case, admit it to the memory budget, and run the model's
CPU preprocessing on it (v2: nnU-Net's crop, normalisation and resampling).

A case waits for the budget only here, once its size and spacing are known and
before its preprocessing starts; the stages after it never wait on the budget, so
a full budget cannot deadlock the queues between them.
"""

from __future__ import annotations

from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from asyncflow.backends.base import ModelSteps, nbytes
from asyncflow.case import Case, PreparedCase
from asyncflow.enums import Stage
from asyncflow.log import Stopwatch, bound_case, get_logger
from asyncflow.pipeline.flow import CaseFlow
from asyncflow.reading.prepare import prepare_case

__all__ = ["Preparation"]

log = get_logger(__name__)


class Preparation:
    """The prepare workers of a request: ``steps`` is the model's CPU work (None: the backend does
    it all); ``write_files``: the backend reads the case as files."""

    def __init__(self, flow: CaseFlow, steps: ModelSteps | None, write_files: bool) -> None:
        self.flow, self.steps, self.write_files = flow, steps, write_files

    async def worker(
        self, receive: MemoryObjectReceiveStream[Case], send: MemoryObjectSendStream[PreparedCase]
    ) -> None:
        async with receive, send:
            async for case in receive:
                if self.flow.enter(case, Stage.PREPARE):
                    with bound_case(case.case_id):
                        await self._prepare(case, send)

    async def _prepare(self, case: Case, send: MemoryObjectSendStream[PreparedCase]) -> None:
        workdir = self.flow.workspace.case_dir(case)
        prepared = await self.flow.step(case, Stage.PREPARE, prepare_case, case, workdir, self.write_files)
        if prepared is None:
            return
        channels = len(prepared.images)
        read_s = self.flow.ledger.seconds(case, Stage.PREPARE)
        admitted = await self._preprocess(prepared)
        if admitted is None:
            return
        reserved, memory_wait_s = admitted
        prepare_s = self.flow.ledger.seconds(case, Stage.PREPARE)
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
            self.flow.fail(case, Stage.PREPARE, exc, 0.0)
            return None
        waited = Stopwatch()
        reserved = await self.flow.budget.admit(case.case_id, estimate)
        memory_wait_s = waited.seconds
        model_input = await self.flow.step(case, Stage.PREPARE, self.steps.preprocess, prepared)
        if model_input is None:
            return None
        prepared.images, prepared.model_input = [], model_input  # it replaces the images
        return reserved, memory_wait_s

"""What every stage does with a case: let it in (or drop it, withdrawn), run a step off the event
loop, fail it with its reason, and end it, freeing what it held.

A case ends exactly once, done or failed: :meth:`CaseFlow.end` removes its working
folder and the unpacked files no other case reads (the workspace), gives back its
share of the memory budget, and books it (the ledger). A case the assembly
withdrew (its series grew after it was made) is dropped at the next stage it
reaches, which ends it without a trace.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import anyio

from asyncflow.case import Case
from asyncflow.enums import Stage
from asyncflow.log import Stopwatch
from asyncflow.pipeline.budget import MemoryBudget
from asyncflow.pipeline.ledger import Ledger
from asyncflow.pipeline.stopping import Stop
from asyncflow.pipeline.workspace import Workspace

__all__ = ["CaseFlow", "Offload", "Threads"]

R = TypeVar("R")


class Offload(Protocol):
    """Where a stage's CPU work runs: this process's worker threads (:class:`Threads`), or the
    tasks of a cluster (:class:`asyncflow.cluster.tasks.RayTasks`)."""

    async def run(self, fn: Callable[..., R], *args: Any) -> R: ...


class Threads:
    """A stage's CPU work in this process's worker threads (anyio's)."""

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        return await anyio.to_thread.run_sync(fn, *args)


class CaseFlow:
    """A request's cases as they move through the stages (used from its event loop). ``offload``
    runs the steps that may run elsewhere (:meth:`step`)."""

    def __init__(
        self,
        ledger: Ledger,
        workspace: Workspace,
        budget: MemoryBudget,
        stop: Stop,
        offload: Offload | None = None,
    ) -> None:
        self.ledger, self.workspace, self.budget, self.stop = ledger, workspace, budget, stop
        self.offload: Offload = offload or Threads()

    def enter(self, case: Case, stage: Stage) -> bool:
        """True: ``case`` is now in ``stage``. False: the assembly withdrew it, and it has ended;
        or the request is stopping and the case has not started (it stays ``pending``)."""
        if stage is Stage.PREPARE and self.stop.draining:
            return False
        if self.ledger.is_withdrawn(case):
            self.end(case)
            return False
        self.ledger.enter(case, stage)
        return True

    async def step(
        self, case: Case, stage: Stage, fn: Callable[..., R], *args: Any, here: bool = False
    ) -> R | None:
        """``fn(*args)`` offloaded (in a worker thread, or on a cluster's node unless ``here``),
        its seconds booked to ``stage``; None when it raised, which fails the case alone."""
        watch = Stopwatch()
        try:
            result = await (anyio.to_thread.run_sync(fn, *args) if here else self.offload.run(fn, *args))
        except Exception as exc:  # noqa: BLE001 - any error of one case fails that case alone
            self.fail(case, stage, exc, watch.seconds)
            return None
        self.ledger.add_seconds(case, stage, watch.seconds)
        return result

    def fail(self, case: Case, stage: Stage, error: Exception, seconds: float) -> None:
        """``case`` failed in ``stage`` after ``seconds`` there: it ends with the reason."""
        self.ledger.add_seconds(case, stage, seconds)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            error = OSError(error.errno, f"disk full while writing the case's files ({error.strerror})")
        self.end(case, stage=stage, error=error)

    def end(self, case: Case, *, stage: Stage | None = None, error: Exception | None = None) -> None:
        """``case`` has ended: free its files and memory, book it (failed when ``error`` is given)."""
        self.workspace.end_case(case)
        self.budget.release(case.case_id)
        self.ledger.end(case, stage=stage, error=error)

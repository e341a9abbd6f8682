"""A memory budget for the cases in flight: admission control in bytes.

nnU-Net's preprocessing and its resampling of the logits work in float64 on whole
volumes; a real CT case can need several GB at its peak (``ModelSteps.memory_bytes``
estimates it from the case's size and spacing). The pipeline admits a case to the
model's CPU steps only when its estimate fits beside those of the cases already in
flight, and gives the bytes back when the case ends. Only admission waits, at the
start of a case's preprocessing: stages further on never wait on the budget, so a
full budget cannot deadlock the queues between them. A case larger than the whole
budget is admitted alone.
"""

from __future__ import annotations

import anyio

__all__ = ["MemoryBudget"]


class MemoryBudget:
    """``limit`` bytes shared by the admitted cases, by key (a case id). Used from one event
    loop: admitting and releasing need no lock."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a memory budget must be at least 1 byte, got {limit}")
        self.limit = limit
        self.used = 0
        self._held: dict[str, int] = {}
        self._freed = anyio.Event()

    async def admit(self, key: str, nbytes: int) -> int:
        """Wait until ``nbytes`` (at most the whole budget) fit, hold them under ``key`` and
        return what is held."""
        if key in self._held:
            raise ValueError(f"{key} holds part of the budget already")
        nbytes = max(0, min(nbytes, self.limit))
        while self.used + nbytes > self.limit:
            await self._freed.wait()
        self.used += nbytes
        self._held[key] = nbytes
        return nbytes

    def release(self, key: str) -> None:
        """Give back what ``key`` holds (nothing when it holds nothing); wakes the waiting."""
        nbytes = self._held.pop(key, 0)
        if nbytes:
            self.used -= nbytes
            freed, self._freed = self._freed, anyio.Event()
            freed.set()

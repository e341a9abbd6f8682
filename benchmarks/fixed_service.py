"""A stand-in for a GPU: holds the prediction worker for S seconds without using the CPU.

Benchmarks only; not offered to users as a backend. Its label map is a fixed
"liver" block with a "tumour" inside, in the case's own grid, so export does the
work of a real segmentation (several hundred SEG frames on a CT series).
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import numpy as np

from asyncflow.backends import ModelInfo
from asyncflow.case import PreparedCase


class FixedServiceBackend:
    max_batch = 1
    needs_files = False

    def __init__(self, info: ModelInfo, service_s: float) -> None:
        self.info = info
        self.service_s = service_s

    def load(self) -> None:
        """Nothing to load."""

    async def predict(self, cases: Sequence[PreparedCase]) -> list[np.ndarray | Exception]:
        (case,) = cases
        await anyio.sleep(self.service_s)
        return [block_labels(tuple(reversed(case.geometry.size)))]


def block_labels(shape: tuple[int, ...]) -> np.ndarray:
    """Label 1 in the middle half of each axis, label 2 in the middle tenth."""
    labels = np.zeros(shape, np.uint8)
    labels[tuple(slice(n // 4, n - n // 4) for n in shape)] = 1
    labels[tuple(slice(n // 2 - n // 20, n // 2 + n // 20 + 1) for n in shape)] = 2
    return labels

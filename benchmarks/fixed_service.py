"""Stand-ins for a GPU: hold the prediction worker for S seconds without using the CPU.

Benchmarks only; not offered to users as a backend. Two kinds:

- :class:`FixedServiceBackend` replaces the whole backend and returns a label map;
- :func:`patch_nnunet_network` replaces only nnU-Net v2's network call
  (``nnUNetPredictor.predict_logits_from_preprocessed_data``), in asyncflow and in
  nnU-Net's own ``nnUNetv2_predict`` alike, so every CPU step around it is the
  real code.

Their answer is a fixed "liver" block with a "tumour" inside, so export does the
work of a real segmentation (several hundred SEG frames on a CT series).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np

from asyncflow.backends import ModelInfo
from asyncflow.case import PreparedCase


class FixedServiceBackend:
    max_batch = 1
    needs_files = False
    steps = None  # it returns label maps: no model CPU work around it
    device = "stand-in"  # for a GPU

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
    labels[_middle(shape, 4)] = 1
    labels[_middle(shape, 20)] = 2
    return labels


def block_logits(classes: int, shape: tuple[int, ...]) -> Any:
    """float16 logits (as nnU-Net accumulates them) whose argmax is :func:`block_labels`."""
    import torch

    logits = torch.full((classes, *shape), -1.0, dtype=torch.float16)
    logits[0] = 1.0
    for label, block in ((1, _middle(shape, 4)), (2, _middle(shape, 20))):
        logits[(slice(None), *block)] = -1.0
        logits[(label, *block)] = 1.0
    return logits


def _middle(shape: tuple[int, ...], part: int) -> tuple[slice, ...]:
    """The slices :func:`block_labels` gives label 1 (``part`` 4) or label 2 (``part`` 20)."""
    if part == 4:
        return tuple(slice(n // 4, n - n // 4) for n in shape)
    return tuple(slice(n // 2 - n // part, n // 2 + n // part + 1) for n in shape)


def patch_nnunet_network(service_s: float) -> None:
    """Replace nnU-Net v2's network call, in this process, by one that returns
    :func:`block_logits` of the preprocessed input's shape after ``service_s`` seconds (building
    them is part of that time, as a GPU's answer is ready when the network ends)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    def network(self: Any, data: Any) -> Any:
        started = time.perf_counter()
        logits = block_logits(self.label_manager.num_segmentation_heads, tuple(data.shape[1:]))
        time.sleep(max(0.0, service_s - (time.perf_counter() - started)))
        return logits

    nnUNetPredictor.predict_logits_from_preprocessed_data = network  # type: ignore[method-assign]

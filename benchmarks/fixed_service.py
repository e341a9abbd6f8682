"""Stand-ins for a GPU: hold the prediction worker for S seconds without using the CPU.

Benchmarks only; not offered to users as a backend. Two kinds:

- :class:`FixedServiceBackend` replaces the whole backend and returns a label map;
- :func:`patch_nnunet_network` replaces only nnU-Net v2's network call
  (``nnUNetPredictor.predict_logits_from_preprocessed_data``), in asyncflow and in
  nnU-Net's own ``nnUNetv2_predict`` alike, so every CPU step around it is the
  real code.

Their answer is a fixed "liver" block with a "tumour" inside, so export does the
work of a real segmentation (several hundred SEG frames on a CT series).
:func:`replanned_model` is the tiny model with another target spacing, so that
nnU-Net resamples as it does for real CT (the stand-in network ignores weights).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from asyncflow.backends import ModelInfo
from asyncflow.case import PreparedCase
from asyncflow.settings import packaged_demo_model


class FixedServiceBackend:
    max_batch = 1
    needs_files = False
    steps = None  # it returns label maps: no model CPU work around it

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


def block_logits(classes: int, shape: tuple[int, ...]) -> Any:
    """float16 logits (as nnU-Net accumulates them) whose argmax is :func:`block_labels`."""
    import torch

    labels = torch.from_numpy(block_labels(shape).astype(np.int64))
    logits = torch.full((classes, *shape), -1.0, dtype=torch.float16)
    logits.scatter_(0, labels[None], 1.0)
    return logits


def patch_nnunet_network(service_s: float) -> None:
    """Replace nnU-Net v2's network call, in this process, by a sleep of ``service_s`` seconds
    that returns :func:`block_logits` of the preprocessed input's shape."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    def network(self: Any, data: Any) -> Any:
        time.sleep(service_s)
        return block_logits(self.label_manager.num_segmentation_heads, tuple(data.shape[1:]))

    nnUNetPredictor.predict_logits_from_preprocessed_data = network  # type: ignore[method-assign]


def replanned_model(target: Path, spacing_zyx: Sequence[float]) -> Path:
    """A copy of the tiny model whose 3d_fullres configuration is planned at ``spacing_zyx`` mm."""
    shutil.copytree(packaged_demo_model(), target)
    plans = json.loads((target / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = list(spacing_zyx)
    plans["original_median_spacing_after_transp"] = list(spacing_zyx)
    (target / "plans.json").write_text(json.dumps(plans, indent=1))
    return target

"""Test helpers for code built on asyncflow: a backend without a model.

:class:`FakeBackend` honours the backend contract the pipeline relies on
(:class:`asyncflow.backends.Backend`) without torch or weights: ``predict``
returns a label map on each case's grid (``steps`` is None, as for nnU-Net v1),
so reading, the pipeline's queues, the export stage (SEG and NIfTI writing, the
report) and your own integration all run for real. What it predicts is yours
to choose::

    from asyncflow import Settings, run_request_sync
    from asyncflow.testing import FakeBackend, image_array

    backend = FakeBackend(labels={"liver": 1}, predict=lambda case: image_array(case) > 100)
    result = run_request_sync([archive_bytes], Settings(work_dir=tmp), backend=backend)

It can also take its time (``delay_s``; a ``predict`` may also wait on an event
of your test) and fail chosen cases (``fail``: case ids whose prediction fails,
alone, as a GPU fault would). It is never used unless a test asks for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import anyio
import numpy as np
import SimpleITK as sitk

from asyncflow.backends.base import ModelInfo
from asyncflow.case import PreparedCase
from asyncflow.labels.segment import labels_from_dataset_json

__all__ = ["FakeBackend", "image_array"]

Predict = Callable[[PreparedCase], np.ndarray]


def _fixed(value: int) -> Predict:
    def predict(case: PreparedCase) -> np.ndarray:
        return np.full(tuple(reversed(case.geometry.size)), value, dtype=np.uint8)

    return predict


class FakeBackend:
    """A backend whose predictions come from ``predict`` (a case's (z, y, x) label map, from its
    ``PreparedCase``: ``images`` hold its channels as SimpleITK images) or, by default, a map of
    the first label everywhere."""

    needs_files = False
    steps = None  # predict returns label maps on the cases' grids
    device = "cpu"  # it runs no network

    def __init__(
        self,
        labels: Mapping[str, int] | None = None,
        *,
        predict: Predict | None = None,
        delay_s: float = 0.0,
        fail: Collection[str] = (),
        channels: int = 1,
        max_batch: int = 1,
    ) -> None:
        labels = dict(labels or {"foreground": 1})
        self.info = ModelInfo(
            folder=Path("fake-model"),
            name="FakeModel",
            configuration="3d_fullres",
            trainer="FakeTrainer",
            plans="FakePlans",
            folds=(0,),
            checkpoint="none",
            num_channels=channels,
            labels=labels_from_dataset_json({"labels": {"background": 0, **labels}}),
            framework="asyncflow.testing",
        )
        self.max_batch = max_batch
        self._predict = predict or _fixed(min(labels.values()))
        self.delay_s = delay_s
        self.fail = set(fail)
        self.loaded = False
        self.predicted: list[str] = []  # case ids, in the order they were predicted

    def load(self) -> None:
        self.loaded = True

    async def predict(self, cases: Sequence[PreparedCase]) -> list[np.ndarray | Exception]:
        return [await anyio.to_thread.run_sync(self._one, case) for case in cases]

    def _one(self, prepared: PreparedCase) -> np.ndarray | Exception:
        if self.delay_s:
            time.sleep(self.delay_s)
        self.predicted.append(prepared.case.case_id)
        if prepared.case.case_id in self.fail:
            return RuntimeError(f"FakeBackend fails {prepared.case.case_id}, as asked")
        labels = np.asarray(self._predict(prepared))
        expected = tuple(reversed(prepared.geometry.size))
        if labels.shape != expected:
            raise ValueError(f"predict returned a {labels.shape} map for a {expected} case")
        return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)


def image_array(prepared: PreparedCase, channel: int = 0) -> np.ndarray:
    """A case's channel as a (z, y, x) array, for ``predict`` callables."""
    return sitk.GetArrayViewFromImage(prepared.images[channel])

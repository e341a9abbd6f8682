"""The prediction stage tells a user on a slow CPU, once, what would be faster."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import phantom_backend, phantom_nifti

import asyncflow.pipeline.prediction
from asyncflow import run_request
from asyncflow.log import configure_logging

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("threshold_s", "said"), [(0.0, 1), (3600.0, 0)])
async def test_a_slow_cpu_prediction_is_told_once_with_what_is_faster(
    tmp_path: Path,
    fake_settings,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
    threshold_s: float,
    said: int,
) -> None:
    monkeypatch.setattr(asyncflow.pipeline.prediction, "SLOW_ON_CPU_S", threshold_s)
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    inputs = [phantom_nifti(rng, (8, 16, 16)) for _ in range(3)]
    result = await run_request(inputs, fake_settings(tmp_path / "work"), backend=phantom_backend())
    assert result.status == "done"
    slow = [e for e in map(json.loads, logs.getvalue().splitlines()) if e["event"] == "predict.slow"]
    assert len(slow) == said
    if said:
        assert slow[0]["device"] == "cpu" and "--no-mirroring" in slow[0]["advice"]

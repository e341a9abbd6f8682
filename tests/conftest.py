"""Shared fixtures. One torch thread: on a busy 2-core machine two threads run up to 20x slower."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("nnUNet_def_n_proc", "1")

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from asyncflow import build_backend
from asyncflow.backends import Backend
from asyncflow.log import configure_logging
from asyncflow.settings import Settings, packaged_demo_model


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    """Each test starts with logs into a buffer of its own: a stream that an earlier test
    configured (capsys's, a closed file) is never written to. Tests that read logs
    configure their own stream."""
    configure_logging(json=True, stream=io.StringIO())


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return packaged_demo_model()


_TEST_SETTINGS: dict[str, object] = {
    "use_mirroring": False,
    "torch_threads": 1,
    "device": "cpu",
    "unpack_workers": 2,
    "prepare_workers": 2,
    "export_workers": 2,
}


@pytest.fixture(scope="session")
def settings_factory(model_dir: Path):
    """Settings for a request through the tiny real model (``model_dir``)."""

    def make(work_dir: Path, **overrides: object) -> Settings:
        values = {**_TEST_SETTINGS, "model_dir": model_dir, "work_dir": work_dir, **overrides}
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def fake_settings():
    """Settings for a request whose backend the test passes (a FakeBackend): no model is named."""

    def make(work_dir: Path, **overrides: object) -> Settings:
        return Settings(**{**_TEST_SETTINGS, "work_dir": work_dir, **overrides})  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def loaded_backend(settings_factory, tmp_path_factory) -> Iterator[Backend]:
    """The tiny real model, loaded once for the whole session."""
    backend = build_backend(settings_factory(tmp_path_factory.mktemp("unused")))
    backend.load()
    yield backend


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


_MODEL_FIXTURES = {"model_dir", "loaded_backend", "settings_factory"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that runs a real nnU-Net model (through these fixtures, or marked so by hand)
    carries the ``model`` marker: ``pytest -m "not model"`` runs the rest, in seconds."""
    for item in items:
        if _MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)

"""asyncflow: nnU-Net segmentation of DICOM and NIfTI requests through one async pipeline.

The public face::

    from asyncflow import run_request, run_request_sync, Settings, Result, Progress
    from asyncflow import RequestError, ModelError, SettingsError, LabelError

Names are imported when first used, so ``import asyncflow`` stays cheap and the
modules can import ``asyncflow.__version__`` without a cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "run_request": "pipeline",
    "run_request_sync": "pipeline",
    "build_backend": "pipeline",
    "build_backends": "pipeline",
    "Settings": "settings",
    "Result": "result",
    "Progress": "result",
    "RequestError": "errors",
    "ModelError": "errors",
    "SettingsError": "errors",
    "LabelError": "errors",
}

__all__ = [
    "LabelError",
    "ModelError",
    "Progress",
    "RequestError",
    "Result",
    "Settings",
    "SettingsError",
    "__version__",
    "build_backend",
    "build_backends",
    "run_request",
    "run_request_sync",
]

if TYPE_CHECKING:
    from .errors import LabelError, ModelError, RequestError, SettingsError
    from .pipeline import build_backend, build_backends, run_request, run_request_sync
    from .result import Progress, Result
    from .settings import Settings


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        from importlib import import_module

        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'asyncflow' has no attribute {name!r}")

"""Prediction backends: one interface (:mod:`~asyncflow.backends.base`), one implementation per
nnU-Net generation (v2 in process, v1 through ``nnUNet_predict``), and :func:`build_backend`."""

from asyncflow.backends.base import Backend, ModelInfo, ModelSteps
from asyncflow.backends.build import build_backend, build_backends, create_backend

__all__ = ["Backend", "ModelInfo", "ModelSteps", "build_backend", "build_backends", "create_backend"]

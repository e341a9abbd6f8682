"""Prediction backends: one interface, one implementation per nnU-Net generation."""

from __future__ import annotations

from .base import Backend, ModelError, ModelInfo

__all__ = ["Backend", "ModelError", "ModelInfo", "create_backend"]


def create_backend(info: ModelInfo, **options: object) -> Backend:
    """The backend for a model folder (nnU-Net v2 today)."""
    from .nnunet_v2 import NnUNetV2Backend

    return NnUNetV2Backend(info, **options)  # type: ignore[arg-type]

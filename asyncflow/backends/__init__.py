"""Prediction backends: one interface, one implementation per nnU-Net generation."""

from __future__ import annotations

from .base import Backend, ModelError, ModelInfo, ModelSteps

__all__ = ["Backend", "ModelError", "ModelInfo", "ModelSteps", "create_backend"]


def create_backend(info: ModelInfo, **options: object) -> Backend:
    """The backend for a model: v2 in process, v1 through ``nnUNet_predict`` (``v1_*`` options)."""
    if info.generation == "v1":
        from .nnunet_v1 import NnUNetV1Backend

        return NnUNetV1Backend(info, **options)  # type: ignore[arg-type]
    from .nnunet_v2 import NnUNetV2Backend

    v2_options = {k: v for k, v in options.items() if not k.startswith("v1_")}
    return NnUNetV2Backend(info, **v2_options)  # type: ignore[arg-type]

"""Which backend a model needs, and what a model folder declares (not loaded)."""

from __future__ import annotations

from asyncflow.backends.base import Backend, ModelInfo
from asyncflow.backends.locate import ModelLocation, ModelSource
from asyncflow.enums import Generation

__all__ = ["create_backend", "read_model"]


def read_model(location: ModelLocation, source: ModelSource) -> ModelInfo:
    """The facts of the model at ``location``, with the folds and checkpoint ``source`` names."""
    read = ModelInfo.from_v1_folder if location.generation is Generation.V1 else ModelInfo.from_folder
    checkpoint = source.option("checkpoint", location.generation)
    return read(location.folder, folds=source.folds, checkpoint=checkpoint)


def create_backend(info: ModelInfo, **options: object) -> Backend:
    """The backend for a model: v2 in process, v1 through ``nnUNet_predict`` (``v1_*`` options)."""
    if info.generation is Generation.V1:
        from asyncflow.backends.nnunet_v1 import NnUNetV1Backend

        return NnUNetV1Backend(info, **options)  # type: ignore[arg-type]
    from asyncflow.backends.nnunet_v2 import NnUNetV2Backend

    v2_options = {k: v for k, v in options.items() if not k.startswith("v1_")}
    return NnUNetV2Backend(info, **v2_options)  # type: ignore[arg-type]

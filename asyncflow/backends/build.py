"""Which backend a model needs, and building it from the settings (not loaded)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncflow.backends.base import Backend, ModelInfo

if TYPE_CHECKING:
    from asyncflow.settings import Settings

__all__ = ["build_backend", "build_backends", "create_backend"]


def create_backend(info: ModelInfo, **options: object) -> Backend:
    """The backend for a model: v2 in process, v1 through ``nnUNet_predict`` (``v1_*`` options)."""
    if info.generation == "v1":
        from asyncflow.backends.nnunet_v1 import NnUNetV1Backend

        return NnUNetV1Backend(info, **options)  # type: ignore[arg-type]
    from asyncflow.backends.nnunet_v2 import NnUNetV2Backend

    v2_options = {k: v for k, v in options.items() if not k.startswith("v1_")}
    return NnUNetV2Backend(info, **v2_options)  # type: ignore[arg-type]


def build_backend(settings: Settings, device: str | None = None) -> Backend:
    """The prediction backend the settings describe, on ``device`` (default: ``settings.device``), not loaded."""
    generation, folder = settings.resolve_model()
    read = ModelInfo.from_v1_folder if generation == "v1" else ModelInfo.from_folder
    info = read(folder, folds=settings.folds, checkpoint=settings.model_option("checkpoint", generation))
    return create_backend(
        info,
        tile_step_size=settings.tile_step_size,
        use_mirroring=settings.use_mirroring,
        device=device or settings.device,
        torch_threads=settings.torch_threads,
        resampling=settings.resampling,
        v1_command=settings.v1_command,
        v1_batch_size=settings.v1_batch_size,
        v1_case_timeout_s=settings.v1_case_timeout_s,
        v1_preprocess_threads=settings.v1_preprocess_threads,
        v1_export_threads=settings.v1_export_threads,
    )


def build_backends(settings: Settings) -> list[Backend]:
    """One backend per prediction worker: one per device of ``settings.devices``, else one."""
    return [build_backend(settings, device) for device in settings.devices or (settings.device,)]

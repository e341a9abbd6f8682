"""The request's model plan from its settings: where the model is, what it declares, and one
backend per device (:class:`~asyncflow.backends.plan.ModelPlan`), none loaded yet."""

from __future__ import annotations

from asyncflow.backends.base import Backend
from asyncflow.backends.build import create_backend, read_model
from asyncflow.backends.locate import ModelLocation
from asyncflow.backends.plan import ModelPlan
from asyncflow.settings import Settings

__all__ = ["build_backend", "build_backends", "build_plan", "locate_model"]


def locate_model(settings: Settings) -> ModelLocation:
    """The model folder the settings name and its generation, or a SettingsError saying how to name one."""
    return settings.model_source().locate()


def build_backend(settings: Settings, device: str | None = None) -> Backend:
    """The prediction backend the settings describe, on ``device`` (default: ``settings.device``), not loaded."""
    source = settings.model_source()
    info = read_model(source.locate(), source)
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


def build_plan(settings: Settings) -> ModelPlan:
    """The plan the settings describe: their model on each of their devices."""
    return ModelPlan.of(build_backends(settings))

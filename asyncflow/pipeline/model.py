"""The request's model plan from its settings: where the model is, what it declares, its
postprocessing, and one backend per device (:class:`~asyncflow.backends.plan.ModelPlan`), none
loaded yet. Every fault of the model (a missing fold, configurations of different label sets,
a postprocessing file that is not nnU-Net's) is found here, before any case runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from asyncflow.backends.base import Backend, ModelInfo
from asyncflow.backends.build import create_backend, read_model
from asyncflow.backends.locate import ModelSelection
from asyncflow.backends.plan import ModelPlan
from asyncflow.backends.postprocessing import Postprocessing, read_postprocessing
from asyncflow.settings import Settings

__all__ = ["build_backend", "build_backends", "build_plan", "locate_model", "read_plan"]


def locate_model(settings: Settings) -> ModelSelection:
    """Every model folder the settings name, or a SettingsError/ModelError saying how to name them."""
    return settings.model_source().select()


def read_plan(settings: Settings) -> tuple[ModelSelection, list[ModelInfo], Postprocessing | None]:
    """The selection, what each of its model folders declares, and the postprocessing to apply:
    a ModelError for a plan that cannot run, before anything loads."""
    from asyncflow.backends.ensemble import check_members

    selection = locate_model(settings)
    source = settings.model_source()
    if selection.folds is not None and source.folds is None:
        source = replace(source, folds=selection.folds)
    members = [read_model(location, source) for location in selection.members]
    if len(members) > 1:
        check_members(members)
    return selection, members, _postprocessing(settings.postprocessing, selection)


def _postprocessing(setting: str, selection: ModelSelection) -> Postprocessing | None:
    if setting == "none":
        return None
    if setting == "auto":
        return read_postprocessing(selection.postprocessing) if selection.postprocessing else None
    return read_postprocessing(Path(setting))


def build_backend(settings: Settings, device: str | None = None) -> Backend:
    """The prediction backend the settings describe, on ``device`` (default: ``settings.device``),
    not loaded: one configuration's, or an ensemble's (every configuration on that device)."""
    _, members, _ = read_plan(settings)
    return _backend(settings, members, device or settings.device)


def _backend(settings: Settings, members: list[ModelInfo], device: str) -> Backend:
    backends = [
        create_backend(
            info,
            tile_step_size=settings.tile_step_size,
            use_mirroring=settings.use_mirroring,
            device=device,
            torch_threads=settings.torch_threads,
            resampling=settings.resampling,
            v1_command=settings.v1_command,
            v1_batch_size=settings.v1_batch_size,
            v1_case_timeout_s=settings.v1_case_timeout_s,
            v1_preprocess_threads=settings.v1_preprocess_threads,
            v1_export_threads=settings.v1_export_threads,
        )
        for info in members
    ]
    if len(backends) == 1:
        return backends[0]
    from asyncflow.backends.ensemble import EnsembleBackend
    from asyncflow.backends.nnunet_v2 import NnUNetV2Backend

    return EnsembleBackend([b for b in backends if isinstance(b, NnUNetV2Backend)])


def build_backends(settings: Settings) -> list[Backend]:
    """One backend per prediction worker: one per device of ``settings.devices``, else one."""
    _, members, _ = read_plan(settings)
    return [_backend(settings, members, device) for device in settings.devices or (settings.device,)]


def build_plan(settings: Settings) -> ModelPlan:
    """The plan the settings describe: their model (or ensemble) on each of their devices, with
    its postprocessing."""
    selection, members, postprocessing = read_plan(settings)
    workers = tuple(_backend(settings, members, device) for device in settings.devices or (settings.device,))
    return ModelPlan(members[0], workers, tuple(members), postprocessing, selection.best)

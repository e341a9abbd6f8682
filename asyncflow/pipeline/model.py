"""The request's model plan from its settings: where the model is, what it declares, its
postprocessing, and one backend per device (:class:`~asyncflow.backends.plan.ModelPlan`), none
loaded yet. Every fault of the model (a missing fold, configurations of different label sets,
a postprocessing file that is not nnU-Net's, a cascade without its first stage) is found here,
before any case runs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from asyncflow.backends.base import Backend, ModelInfo
from asyncflow.backends.build import create_backend, read_model
from asyncflow.backends.locate import ModelSelection
from asyncflow.backends.plan import ModelPlan
from asyncflow.backends.postprocessing import Postprocessing, read_postprocessing
from asyncflow.enums import Generation
from asyncflow.settings import Settings

__all__ = ["PlanFacts", "build_backend", "build_backends", "build_plan", "locate_model", "read_plan"]


def locate_model(settings: Settings) -> ModelSelection:
    """Every model folder the settings name, or a SettingsError/ModelError saying how to name them."""
    return settings.model_source().select()


@dataclass(frozen=True)
class PlanFacts:
    """What the settings' model folders declare: the selection, each configuration (the
    ensemble's order), for each the first stage of its cascade or None (empty: no cascade), and
    the postprocessing to apply."""

    selection: ModelSelection
    members: list[ModelInfo]
    previous: tuple[ModelInfo | None, ...]
    postprocessing: Postprocessing | None


def read_plan(settings: Settings) -> PlanFacts:
    """What the settings' model folders declare: a ModelError for a plan that cannot run,
    before anything loads."""
    from asyncflow.backends.cascade import previous_stage
    from asyncflow.backends.ensemble import check_members

    selection = locate_model(settings)
    source = settings.model_source()
    if selection.folds is not None and source.folds is None:
        source = replace(source, folds=selection.folds)
    members = [read_model(location, source) for location in selection.members]
    if len(members) > 1:
        check_members(members)
    previous = tuple(previous_stage(m) for m in members)
    return PlanFacts(
        selection,
        members,
        previous if any(previous) else (),
        _postprocessing(settings.postprocessing, selection),
    )


def _postprocessing(setting: str, selection: ModelSelection) -> Postprocessing | None:
    if setting == "none":
        return None
    if setting == "auto":
        return read_postprocessing(selection.postprocessing) if selection.postprocessing else None
    return read_postprocessing(Path(setting))


def build_backend(settings: Settings, device: str | None = None) -> Backend:
    """The prediction backend the settings describe, on ``device`` (default: ``settings.device``),
    not loaded: one configuration's, an ensemble's, a cascade's, or several models' (every
    configuration on that device)."""
    return build_plan(replace(settings, devices=None, device=device or settings.device)).workers[0]


def _backend(settings: Settings, facts: PlanFacts, device: str) -> Backend:
    from asyncflow.backends.cascade import CascadeBackend
    from asyncflow.backends.ensemble import EnsembleBackend
    from asyncflow.backends.nnunet_v2 import NnUNetV2Backend

    def create(info: ModelInfo, v1_first_stage: ModelInfo | None = None) -> Backend:
        return create_backend(
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
            v1_first_stage=v1_first_stage,
        )

    def member(info: ModelInfo, previous: ModelInfo | None) -> Backend:
        if previous is None:
            return create(info)
        if info.generation is Generation.V1:  # nnUNet_predict runs a v1 cascade's first stage
            return create(info, previous)
        first, second = create(previous), create(info)  # a cascade's stages: v2 models
        assert isinstance(first, NnUNetV2Backend) and isinstance(second, NnUNetV2Backend)
        return CascadeBackend(first, second)

    previous = facts.previous or (None,) * len(facts.members)
    backends = [member(info, p) for info, p in zip(facts.members, previous, strict=True)]
    if len(backends) == 1:
        return backends[0]
    # check_members (read_plan) let only v2 configurations into an ensemble
    return EnsembleBackend([b for b in backends if isinstance(b, NnUNetV2Backend | CascadeBackend)])


def build_backends(settings: Settings) -> list[Backend]:
    """One backend per prediction worker: one per device of ``settings.devices``, else one."""
    return list(build_plan(settings).workers)


def build_plan(settings: Settings) -> ModelPlan:
    """The plan the settings describe: their model (an ensemble, a cascade) on each of their
    devices, with its postprocessing; with ``models``, each of those too (:meth:`ModelPlan.several`)."""
    first = _plan(settings)
    if not settings.models:
        return first
    # Each added model alone: every fold it has (or its best configuration's), its own postprocessing.
    others = [
        _plan(replace(settings, model_dir=folder, ensemble=(), folds=None, postprocessing="auto", models=()))
        for folder in settings.models
    ]
    return ModelPlan.several([first, *others], settings.merge_labels)


def _plan(settings: Settings) -> ModelPlan:
    facts = read_plan(settings)
    workers = tuple(_backend(settings, facts, device) for device in settings.devices or (settings.device,))
    members = tuple(facts.members)
    return ModelPlan(members[0], workers, members, facts.postprocessing, facts.selection.best, facts.previous)

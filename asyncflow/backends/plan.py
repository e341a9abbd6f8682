"""What a request runs: one explicit plan that every stage consults.

A :class:`ModelPlan` names the model (one configuration, or ``members``: configurations of one
dataset whose probabilities are averaged, any of them a cascade's second stage whose first is
in ``previous``; or several different ``models``, each a plan of its own), the prediction
workers (one backend per device, each loading every configuration once), the postprocessing,
the model's CPU steps around the network and the labels the outputs describe. The stages read the plan, never a backend of their own
choosing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from asyncflow.backends.base import Backend, MemoryPhases, ModelInfo, ModelSteps
from asyncflow.backends.models import MERGE_RULE, LabelMerge, ModelsBackend, ModelsSteps
from asyncflow.backends.postprocessing import Postprocessing
from asyncflow.case import PreparedCase
from asyncflow.errors import ModelError
from asyncflow.labels.segment import SegmentLabel

__all__ = ["ModelPlan", "Postprocessed", "model_tags"]


@dataclass(frozen=True)
class ModelPlan:
    """``model`` runs on ``workers``: one prediction worker per backend, each on its device.
    ``members``: every configuration the workers run, in the ensemble's order (``model`` first);
    ``postprocessing``: applied to each label map; ``best``: the ``inference_information.json``
    the plan was read from; ``previous``: for each member, the first stage of the cascade it is
    the second stage of, or None (empty: no cascade). ``models``: the plans of several
    different models that every case goes through (:meth:`several`; ``model`` is the first's),
    their label maps merged into one by ``merge``, or (None) each written as its own output."""

    model: ModelInfo
    workers: tuple[Backend, ...]
    members: tuple[ModelInfo, ...] = ()
    postprocessing: Postprocessing | None = None
    best: Path | None = None
    previous: tuple[ModelInfo | None, ...] = ()
    models: tuple[ModelPlan, ...] = ()
    merge: LabelMerge | None = None
    _steps: ModelSteps | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.members:
            object.__setattr__(self, "members", (self.model,))
        steps = self.workers[0].steps if self.workers else None
        if self.postprocessing is not None and self.postprocessing.steps:
            if steps is None:
                raise ModelError(
                    "postprocessing is applied by nnU-Net v1's nnUNet_predict itself (the model's "
                    "postprocessing.json): --postprocessing applies to nnU-Net v2 models"
                )
            steps = Postprocessed(steps, self.postprocessing)
        object.__setattr__(self, "_steps", steps)

    @classmethod
    def several(cls, plans: Sequence[ModelPlan], merge: bool) -> ModelPlan:
        """Every case through each of ``plans`` (each loaded once per device), their label maps
        merged into one (``merge``) or each written as its own output."""
        each = [p.steps for p in plans]
        if any(s is None for s in each):
            raise ModelError(
                "several models in one request run nnU-Net v2 models only: "
                "run a v1 model in a request of its own"
            )
        merging = LabelMerge.of(model_tags(plans), [p.labels for p in plans]) if merge else None
        steps = ModelsSteps([s for s in each if s is not None], merging)
        devices = len(plans[0].workers)
        workers = tuple(ModelsBackend([p.workers[d] for p in plans], steps, plans) for d in range(devices))
        return cls(plans[0].model, workers, models=tuple(plans), merge=merging)

    @classmethod
    def of(cls, backends: ModelPlan | Backend | Sequence[Backend]) -> ModelPlan:
        """The plan of backends built (or loaded) already: one model, one backend per device."""
        if isinstance(backends, ModelPlan):
            return backends
        workers = tuple(backends) if isinstance(backends, Sequence) else (backends,)
        if not workers:
            raise ModelError("a model plan needs at least one backend")
        if isinstance(workers[0], ModelsBackend):  # several models: each one's plan, as built
            plans = tuple(workers[0].plans)
            return cls(plans[0].model, workers, models=plans, merge=workers[0].steps.merge)
        model = workers[0].info
        others = {str(b.info.folder) for b in workers} - {str(model.folder)}
        if others:
            raise ModelError(
                f"every prediction worker runs the same model: {model.folder} and {', '.join(sorted(others))}"
            )
        # An ensemble's backend names its configurations (asyncflow.backends.ensemble), a
        # cascade's its stages (asyncflow.backends.cascade).
        backends = getattr(workers[0], "members", None) or [workers[0]]
        previous = tuple(b.stages[0].info if hasattr(b, "stages") else None for b in backends)
        members = tuple(b.info for b in backends)
        return cls(model, workers, members, previous=previous if any(previous) else ())

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(str(worker.device) for worker in self.workers)

    @property
    def steps(self) -> ModelSteps | None:
        """The model's CPU work around the network (v2), postprocessing included, done by the
        prepare and export workers; None when each backend call does it all (v1)."""
        return self._steps

    @property
    def labels(self) -> dict[int, SegmentLabel]:
        """The labels the model declares: what its outputs' segments are named and coded from
        (several models merged: the merged labels)."""
        return self.merge.labels if self.merge is not None else self.model.labels

    @property
    def name(self) -> str:
        """The model's dataset; several models' joined with `` + ``."""
        return " + ".join(self.tags) if self.models else self.model.name

    @property
    def tags(self) -> list[str]:
        """What names each of several models (its dataset, numbered where two share one)."""
        return model_tags(self.models)

    @property
    def needs_files(self) -> bool:
        """A worker reads the case's channel files (else the model input stays in memory)."""
        return any(worker.needs_files for worker in self.workers)

    @property
    def max_batch(self) -> int:
        return max(worker.max_batch for worker in self.workers)

    @property
    def parameters(self) -> dict[str, str]:
        """How the plan's model was trained and is run (the SEG's AlgorithmParameters): one
        configuration's facts as they were; an ensemble's configurations joined with ``+`` in
        its order (each other fact once where every configuration shares it); a cascade's stages,
        the postprocessing, and what chose the plan, when there are. Several models: each
        one's, prefixed with its tag, and how their labels were merged."""
        if self.models:
            parameters = {"models": ", ".join(self.tags)}
            for tag, plan in zip(self.tags, self.models, strict=True):
                parameters |= {f"{tag} {name}": value for name, value in plan.parameters.items()}
            if self.merge is not None:
                parameters["merge"] = f"labels renumbered in the models' order; {MERGE_RULE}"
            return parameters
        each = [m.parameters for m in self.members]
        parameters = {
            name: value
            if name != "configuration" and all(p[name] == value for p in each)
            else "+".join(p[name] for p in each)
            for name, value in each[0].items()
        }
        if len(self.members) > 1:
            parameters["ensemble"] = f"{len(self.members)} configurations, probabilities averaged"
        cascades = [
            f"{first.configuration} (folds {first.parameters['folds']}) first, "
            f"its segmentation read by {second.configuration}"
            for first, second in zip(self.previous, self.members, strict=False)
            if first is not None
        ]
        if cascades:
            parameters["cascade"] = "; ".join(cascades)
        if self.postprocessing is not None:
            parameters["postprocessing"] = self.postprocessing.description
        if self.best is not None:
            parameters["chosen_by"] = f"nnUNetv2_find_best_configuration ({self.best.name})"
        return parameters


class Postprocessed:
    """A model's steps with postprocessing after its label map (the export stage's work)."""

    def __init__(self, steps: ModelSteps, postprocessing: Postprocessing) -> None:
        self.steps, self.postprocessing = steps, postprocessing

    def memory_bytes(self, prepared: PreparedCase) -> int:
        return self.steps.memory_bytes(prepared) + self._postprocessing_bytes(prepared)

    def memory_phases(self, prepared: PreparedCase) -> MemoryPhases | None:
        """The steps' phases (None where they give none), the postprocessing in the way back."""
        phases = getattr(self.steps, "memory_phases", None)
        if phases is None:
            return None
        each: MemoryPhases = phases(prepared)
        return replace(each, to_labels=each.to_labels + self._postprocessing_bytes(prepared))

    def _postprocessing_bytes(self, prepared: PreparedCase) -> int:
        voxels = int(np.prod(prepared.images[0].GetSize())) if prepared.images else 0
        return self.postprocessing.memory_bytes(voxels)

    def preprocess(self, prepared: PreparedCase) -> Any:
        return self.steps.preprocess(prepared)

    def to_labels(self, prepared: PreparedCase, output: Any) -> np.ndarray:
        return self.postprocessing.apply(self.steps.to_labels(prepared, output))


def model_tags(plans: Sequence[ModelPlan]) -> list[str]:
    """Each plan's dataset name, ``-2``, ``-3`` ... after it where plans share one."""
    names = [plan.model.name for plan in plans]
    return [
        name if names.count(name) == 1 else f"{name}-{names[:number].count(name) + 1}"
        for number, name in enumerate(names)
    ]

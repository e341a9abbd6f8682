"""What a request runs: one explicit plan that every stage consults.

A :class:`ModelPlan` names the model, the prediction workers (one backend per
device, each loading the model once), the model's CPU steps around the network
and the labels the outputs describe. The stages read the plan, never a backend
of their own choosing; ensembles, cascades and several models per request grow
from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from asyncflow.backends.base import Backend, ModelInfo, ModelSteps
from asyncflow.errors import ModelError
from asyncflow.labels.segment import SegmentLabel

__all__ = ["ModelPlan"]


@dataclass(frozen=True)
class ModelPlan:
    """``model`` runs on ``workers``: one prediction worker per backend, each on its device."""

    model: ModelInfo
    workers: tuple[Backend, ...]

    @classmethod
    def of(cls, backends: ModelPlan | Backend | Sequence[Backend]) -> ModelPlan:
        """The plan of backends built (or loaded) already: one model, one backend per device."""
        if isinstance(backends, ModelPlan):
            return backends
        workers = tuple(backends) if isinstance(backends, Sequence) else (backends,)
        if not workers:
            raise ModelError("a model plan needs at least one backend")
        model = workers[0].info
        others = {str(b.info.folder) for b in workers} - {str(model.folder)}
        if others:
            raise ModelError(
                f"every prediction worker runs the same model: {model.folder} and {', '.join(sorted(others))}"
            )
        return cls(model, workers)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(str(worker.device) for worker in self.workers)

    @property
    def steps(self) -> ModelSteps | None:
        """The model's CPU work around the network (v2), done by the prepare and export workers;
        None when each backend call does it all (v1)."""
        return self.workers[0].steps

    @property
    def labels(self) -> dict[int, SegmentLabel]:
        """The labels the model declares: what its outputs' segments are named and coded from."""
        return self.model.labels

    @property
    def needs_files(self) -> bool:
        """A worker reads the case's channel files (else the model input stays in memory)."""
        return any(worker.needs_files for worker in self.workers)

    @property
    def max_batch(self) -> int:
        return max(worker.max_batch for worker in self.workers)

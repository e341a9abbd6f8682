"""Prediction on a cluster: one Ray actor per GPU, each loading the model plan once.

:class:`ClusterPredictor` is a :class:`~asyncflow.backends.base.Backend` to the driver's
prediction worker, which feeds it as it feeds a local backend (one call at a time, the cases
that wait, up to ``max_batch``). Its actor (:class:`Predictor`) builds the plan's backend on its
node from the request's settings, loads it once, and predicts each call's cases there; the
driver keeps the plan's CPU steps (``steps``), which run as tasks. Each case's output array is a
return of its own: it stays in the object store, and the driver passes its reference on.

An actor lost with its node is restarted by Ray (``max_restarts``) where its resources are free
(a GPU, or a CPU when the cluster declares none); the call in flight is made again, up to
``tries`` times, logged as ``cluster.retried``, and the new actor loads the model again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from asyncflow.backends.base import Backend, ModelInfo, ModelSteps, NextStage, nbytes
from asyncflow.case import PreparedCase
from asyncflow.cluster.tasks import Remote, Stored, StoredTimed, captured, replay, tried
from asyncflow.log import get_logger
from asyncflow.settings import Settings

__all__ = ["ClusterPredictor", "Predictor"]

log = get_logger(__name__)


class Predictor:
    """The actor: the plan's backend, built and loaded on its node once in the actor's life (a
    restart by Ray is a new life)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend: Backend | None = None

    def load(self) -> Remote:
        """The backend loaded, if it was not; the device it runs on."""
        remote = Remote()
        with captured(remote):
            if self.backend is None:
                from asyncflow.pipeline.model import build_backend

                backend = build_backend(self.settings)
                backend.load()
                self.backend = backend
        remote.value = str(self.backend.device)
        return remote

    def predict(self, cases: list[PreparedCase]) -> tuple[Any, ...]:
        """One call of the backend, as the driver's worker would make it: what it says of each
        case's outcome (``remote.value``), then each case's output array, a return of its own
        (None where the outcome went in ``remote.value``: an error, a cascade's next stage)."""
        import anyio

        fresh = self.backend is None  # a restarted actor loads the model again
        self.load()
        assert self.backend is not None
        remote = Remote(value=(fresh, None))
        arrays: list[Any] = [None] * len(cases)
        with captured(remote):
            try:
                outcomes = anyio.run(self.backend.predict, cases)
            except Exception as exc:  # noqa: BLE001 - the whole call failed: the driver retries case by case
                remote.error = exc
                return (remote, *arrays)
        said: list[Any] = []
        for number, outcome in enumerate(outcomes):
            if isinstance(outcome, Exception | NextStage):
                said.append(("value", outcome))
            else:
                arrays[number] = outcome
                said.append(("stored", nbytes(outcome), getattr(outcome, "network_s", None)))
        remote.value = (fresh, said)
        return (remote, *arrays)


def _outcome(said: tuple[Any, ...], ref: Any) -> Any:
    """A case's outcome as the driver's worker takes it: an error or a next stage as they are,
    an output array as its reference (it stays on the cluster until the export step takes it)."""
    if said[0] == "value":
        return said[1]
    _, size, network_s = said
    return Stored(ref, size) if network_s is None else StoredTimed(ref, size, network_s)


class ClusterPredictor:
    """The driver's side of one prediction actor (number ``number``), shaped like ``template``
    (the plan's backend, built on the driver, never loaded there). ``gpus``: what the actor
    holds (1, or 0 on a cluster without GPUs: then it holds one CPU)."""

    def __init__(self, number: int, template: Backend, settings: Settings, gpus: int, tries: int = 3) -> None:
        self.number, self.template, self.settings = number, template, settings
        self.gpus, self.tries = gpus, tries
        self.info: ModelInfo = template.info
        self.max_batch: int = template.max_batch
        self.needs_files: bool = template.needs_files
        self.device: str = template.device
        self.loads = 0  # times its actor loaded the model (more than once: Ray restarted it)
        self.node = ""  # where it last ran
        self._actor: Any = None

    @property
    def steps(self) -> ModelSteps | None:
        return self.template.steps

    def load(self) -> None:
        """Start the actor and load the model in it (blocking: the worker calls it in a thread)."""
        import ray

        if self._actor is None:
            actor = ray.remote(Predictor).options(
                num_gpus=1 if self.gpus else 0,
                num_cpus=0 if self.gpus else 1,
                max_restarts=-1,
                max_task_retries=0,
            )
            self._actor = actor.remote(self.settings)
        remote: Remote = ray.get(self._actor.load.remote())
        replay(remote)
        self.device = remote.value
        self._loaded(remote.node)

    def _loaded(self, node: str) -> None:
        self.node, self.loads = node, self.loads + 1
        log.info("cluster.actor_loaded", worker=self.number, node=node, device=self.device, loads=self.loads)

    async def predict(self, cases: Sequence[PreparedCase]) -> list[Any | Exception]:
        arrays: list[Any] = []

        def submit() -> Any:
            call = self._actor.predict.options(num_returns=len(cases) + 1)
            remote_ref, *arrays[:] = call.remote(list(cases))
            return remote_ref

        remote = await tried(submit, "predict", self.tries, worker=self.number)
        fresh, outcomes = remote.value
        if fresh:
            self._loaded(remote.node)
        self.node = remote.node
        if remote.error is not None:
            raise remote.error
        return [_outcome(said, ref) for said, ref in zip(outcomes, arrays, strict=True)]

    def close(self) -> None:
        """The actor ended: its model and memory freed on its node."""
        import ray

        if self._actor is not None:
            ray.kill(self._actor)
            self._actor = None

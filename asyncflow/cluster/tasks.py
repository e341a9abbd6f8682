"""A request's CPU steps as Ray tasks: each step of a case runs on any node with a free CPU.

The driver's stages stay as they are (:mod:`asyncflow.pipeline.run`); where a stage would run a
step in a worker thread, :class:`RayTasks` submits it as a task and awaits it, so the driver's
bounded streams bound what is in flight on the cluster too. On the node the step runs as it does
in a thread, and the events it logs are captured and handed back with its result: the driver
logs them in its one event log, each with the ``node`` it ran on.

What a step returns comes back to the driver, but for a prediction's output (the largest array a
case has): that stays in the object store, the driver holding its reference (:class:`Stored`),
and goes from the prediction's node to the export step's.

A step that raised fails its case with its own error, as on one machine. A step lost with its
node (the node died, its worker crashed, the object it returned was lost) is submitted again, up
to ``tries`` times in all, each time logged as ``cluster.retried``; only the driver books and
writes, so a step run twice writes nothing twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from asyncflow.errors import ClusterError
from asyncflow.log import bind_node, get_logger, scrub

__all__ = ["RayTasks", "Remote", "Stored", "StoredTimed", "node_name", "replay", "run_step", "tried"]

R = TypeVar("R")

log = get_logger(__name__)


def node_name(node_id: str) -> str:
    """A node as events name it: the first 8 hex digits of Ray's node id."""
    return node_id[:8]


class Stored:
    """An array left in the cluster's object store (a prediction's output): the driver holds the
    reference (``nbytes`` for its events), the node of the step that takes it fetches it."""

    def __init__(self, ref: Any, nbytes: int) -> None:
        self.ref, self.nbytes = ref, nbytes


class StoredTimed(Stored):
    """A stored output that knows its network seconds (:class:`~asyncflow.backends.base.NetworkTimed`)."""

    def __init__(self, ref: Any, nbytes: int, network_s: float) -> None:
        super().__init__(ref, nbytes)
        self.network_s = network_s


@dataclass
class Remote:
    """What a step on a node hands back: its result, or the exception it raised; the events it
    logged; the node it ran on."""

    value: Any = None
    error: BaseException | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    node: str = ""


@contextlib.contextmanager
def captured(remote: Remote) -> Iterator[None]:
    """Inside: the events logged are kept in ``remote`` (a Ray worker runs one task at a time)."""
    import ray

    remote.node = node_name(ray.get_runtime_context().get_node_id())
    with structlog.testing.capture_logs() as events:
        yield
    remote.events = [
        {k: v for k, v in e.items() if k != "log_level"} | {"level": e["log_level"]} for e in events
    ]


def run_step(fn: Callable[..., Any], *args: Any) -> Remote:
    """On a node: ``fn(*args)``, with what it logged."""
    remote = Remote()
    with captured(remote):
        try:
            remote.value = fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the driver, which fails the case
            remote.error = _portable(exc)
    return remote


def _portable(exc: Exception) -> Exception:
    """``exc``, or, when it cannot travel back to the driver, a RuntimeError that says the same
    (an exception whose class needs arguments its ``args`` do not hold does not unpickle)."""
    import pickle

    try:  # this process's own object, pickled and read back here: no outside data is unpickled
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any exception that does not round-trip
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def replay(remote: Remote) -> None:
    """The events a node logged, in the driver's log (its bound case and request), with the node."""
    for event in remote.events:
        event = dict(event)
        level, name = event.pop("level", "info"), event.pop("event")
        emit = getattr(log, level if level in {"debug", "info", "warning", "error"} else "info")
        emit(name, **event, node=remote.node)


def lost_reason(exc: BaseException) -> str | None:
    """Why Ray lost a step that did not fail on its own (the node, its worker or its result gone);
    None for an error of the step itself."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError | rex.TaskCancelledError):
        return None
    if isinstance(exc, rex.RayError):  # its first sentence: the rest is advice about Ray's logs
        said = str(exc).split(". ")[0].strip().splitlines()
        return scrub(f"{type(exc).__name__}: {said[0] if said else ''}")
    return None


async def wait(ref: Any) -> Any:
    """An object reference's value; cancelling the caller cancels the task on the cluster."""
    import ray

    try:
        return await ref
    except BaseException:
        with contextlib.suppress(Exception):  # already finished, or its node is gone
            ray.cancel(ref)
        raise


class RayTasks:
    """Steps as Ray tasks of one CPU each, every step tried up to ``tries`` times when its node
    is lost (:class:`~asyncflow.pipeline.flow.Offload`)."""

    def __init__(self, tries: int = 3) -> None:
        import ray

        self.tries = tries
        # Ray's own retries are off: the driver tries again itself, and says so.
        self._task = ray.remote(num_cpus=1, max_retries=0)(run_step)

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        name = getattr(fn, "__name__", type(fn).__name__)
        # A stored array as a task's own argument: Ray fetches it to the task's node, not here.
        args = tuple(a.ref if isinstance(a, Stored) else a for a in args)
        remote = await tried(lambda: self._task.remote(fn, *args), name, self.tries)
        if remote.error is not None:
            raise remote.error
        return remote.value


async def tried(submit: Callable[[], Any], step: str, tries: int, **fields: Any) -> Remote:
    """What ``submit()``'s call handed back, the call made again while Ray loses it (up to
    ``tries`` in all, each loss logged as ``cluster.retried`` with ``fields``); its events
    logged here, its node bound to what this task logs next."""
    for attempt in range(1, tries + 1):
        try:
            remote: Remote = await wait(submit())
        except Exception as exc:
            reason = lost_reason(exc)
            if reason is None:
                raise
            if attempt == tries:
                raise ClusterError(f"{step} was lost {tries} times on the cluster: {reason}") from exc
            bind_node(None)  # where it was lost is not known
            log.warning("cluster.retried", step=step, attempt=attempt, reason=reason, **fields)
            continue
        replay(remote)
        bind_node(remote.node)
        return remote
    raise AssertionError("unreachable")

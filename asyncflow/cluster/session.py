"""A request's Ray cluster: connected, checked, watched, and what runs on it.

``Settings.cluster`` names it: ``auto`` (the cluster this machine is part of, as ``ray start``
made it, or ``RAY_ADDRESS``), ``local`` (a Ray instance started on this machine for the
request), ``HOST:PORT`` (a head node's GCS address) or ``ray://HOST:PORT`` (Ray Client).

Before the first input is read, one task on every node that has CPUs checks that it reaches the
request's work folder and the model folder at the driver's paths (a shared volume, or an image
that holds the model): the driver unpacks into the work folder, the nodes read from it. A node
that does not is a :class:`~asyncflow.errors.ClusterError` that names it, not a request whose
every case fails. While the request runs, nodes lost and joined are logged (``cluster.node_lost``,
``cluster.node_joined``).

What is "per machine" on one machine is per node here: the prepare and export workers are
``prepare_workers`` and ``export_workers`` times the nodes with CPUs, and one prediction actor
runs per GPU (one on a CPU when the cluster has no GPU).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from asyncflow.backends.plan import ModelPlan
from asyncflow.cluster.predictor import ClusterPredictor
from asyncflow.cluster.tasks import RayTasks, node_name
from asyncflow.errors import ClusterError
from asyncflow.log import get_logger, scrub
from asyncflow.settings import Settings

__all__ = ["Cluster", "connect"]

log = get_logger(__name__)

# Seconds between two looks at the cluster's nodes while a request runs.
WATCH_S = 1.0


def _alive() -> dict[str, dict[str, Any]]:
    import ray

    return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}


def _reaches(folders: list[str], marker: str) -> str | None:
    """On a node: None when it reads ``marker`` and sees every folder, else what it misses."""
    if not Path(marker).is_file():
        return f"the work folder ({Path(marker).parent})"
    missing = [f for f in folders if not Path(f).is_dir()]
    return f"the model folder(s) {', '.join(missing)}" if missing else None


@dataclass
class Cluster:
    """The cluster a request runs on: its nodes when it started, its GPUs."""

    address: str
    nodes: dict[str, dict[str, Any]]
    gpus: int

    @property
    def cpu_nodes(self) -> list[str]:
        return [i for i, n in self.nodes.items() if n.get("Resources", {}).get("CPU", 0) > 0]

    def per_node(self, settings: Settings) -> Settings:
        """``settings`` with each stage's workers for every node (the driver's coroutines, each
        awaiting one task)."""
        nodes = max(1, len(self.cpu_nodes))
        return replace(
            settings,
            prepare_workers=settings.prepare_workers * nodes,
            export_workers=settings.export_workers * nodes,
        )

    def plan(self, plan: ModelPlan, settings: Settings) -> ModelPlan:
        """``plan`` predicting in one actor per GPU (one on a CPU without GPUs)."""
        actors = max(1, self.gpus)
        template = plan.workers[0]
        workers = tuple(
            ClusterPredictor(n, template, settings, gpus=min(1, self.gpus)) for n in range(actors)
        )
        return replace(plan, workers=workers)

    def offload(self) -> RayTasks:
        return RayTasks()

    def close(self, plan: ModelPlan) -> None:
        """The request's prediction actors ended (their models freed)."""
        for worker in plan.workers:
            if isinstance(worker, ClusterPredictor):
                worker.close()

    def check(self, work_dir: Path, plan: ModelPlan) -> None:
        """Every node with CPUs reaches the work folder and the model folders (see the module)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        work_dir.mkdir(parents=True, exist_ok=True)
        marker = work_dir / f"asyncflow-cluster-{uuid.uuid4().hex[:12]}"
        marker.write_text("asyncflow checks that every node reaches this folder\n")
        folders = sorted({str(m.folder) for m in plan.members} | {str(p.model.folder) for p in plan.models})
        probe = ray.remote(num_cpus=0, max_retries=0)(_reaches)
        try:
            refs = {
                i: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(i, soft=False)).remote(
                    folders, str(marker)
                )
                for i in self.cpu_nodes
            }
            for node, ref in refs.items():
                missing = ray.get(ref, timeout=120)
                if missing is not None:
                    address = self.nodes[node].get("NodeManagerAddress", "?")
                    raise ClusterError(
                        f"node {node_name(node)} ({address}) does not reach {missing} at the driver's path: "
                        "every node must see the work folder (a shared volume) and the model at the same paths"
                    )
        finally:
            marker.unlink(missing_ok=True)

    async def watch(self) -> None:
        """Log each node lost and each node joined, until cancelled."""
        known = dict(self.nodes)
        while True:
            await anyio.sleep(WATCH_S)
            now = await anyio.to_thread.run_sync(_alive)
            for node in known.keys() - now.keys():
                log.warning(
                    "cluster.node_lost", node=node_name(node), address=known[node].get("NodeManagerAddress")
                )
            for node in now.keys() - known.keys():
                log.info(
                    "cluster.node_joined", node=node_name(node), address=now[node].get("NodeManagerAddress")
                )
            known = now


def connect(address: str) -> Cluster:
    """Join the cluster ``address`` names (see the module); a :class:`ClusterError` that says why
    when it cannot."""
    try:
        import ray
    except ImportError:
        raise ClusterError(
            "--cluster runs on Ray, which is not installed: pip install 'asyncflow[cluster]'"
        ) from None
    if not ray.is_initialized():
        try:
            # Nodes' events come back with each step's result, not through Ray's log forwarding.
            local = {"include_dashboard": False} if address == "local" else {"address": address}
            ray.init(logging_level=logging.WARNING, log_to_driver=False, **local)
        except Exception as exc:
            raise ClusterError(f"cannot join the Ray cluster {address!r}: {scrub(str(exc))}") from exc
    nodes = _alive()
    gpus = int(sum(n.get("Resources", {}).get("GPU", 0) for n in nodes.values()))
    cluster = Cluster(address, nodes, gpus)
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes.values())
    log.info("cluster.connected", address=address, nodes=len(nodes), cpus=int(cpus), gpus=gpus)
    return cluster

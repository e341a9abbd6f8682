"""What ``--cluster`` costs on one machine: the same request run plainly (threads) and on a local
Ray cluster of three nodes (``ray.cluster_utils.Cluster``; one declares a GPU, where the model runs
on its CPU), wall seconds and CPU seconds per case.

    python benchmarks/cluster.py [--cases 12] [--shape 64 160 160] [--repeat 2] [--out benchmarks/results-cluster]

CPU seconds are the whole machine's (``/proc/stat``: user, nice, system, irq, softirq), so Ray's
own processes (GCS, raylets, workers) count; the machine's idle background is measured for as
long before the runs and taken off. Each mode runs ``--repeat`` times in this order: plain,
cluster (the first on a fresh cluster pays the start of its worker processes, which import torch
and nnU-Net: ``cold``), cluster again (``warm``), plain again. The cluster's start (nodes up) is
not counted in a request.

Writes ``results.json`` and ``RESULTS.md`` into ``--out``. Not a test: it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only (tests/cluster/test_cluster.py)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from asyncflow import Settings, run_request_sync
from asyncflow.cli.synthetic import make_phantom, nifti_bytes
from asyncflow.log import configure_logging
from asyncflow.settings import packaged_demo_model

TICK = os.sysconf("SC_CLK_TCK")
LOOPBACK = {"node_ip_address": "127.0.0.1"}


def _busy_s() -> float:
    """CPU seconds the machine has spent busy since boot."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / TICK


def _inputs(cases: int, shape: tuple[int, int, int]) -> list[dict[str, bytes]]:
    rng = np.random.default_rng(7)
    out = []
    for n in range(cases):
        phantom = make_phantom(rng, shape, spacing=(0.8, 0.8, 1.5))
        out.append({f"case{n:03d}.nii.gz": nifti_bytes(phantom.image, phantom.spacing, phantom.origin)})
    return out


def _run(inputs: list[Any], settings: Settings, idle_rate: float) -> dict[str, Any]:
    busy, start = _busy_s(), time.perf_counter()
    result = run_request_sync(inputs, settings)
    wall, cpu = time.perf_counter() - start, _busy_s() - busy
    assert result.status == "done", result.status
    cpu_net = cpu - idle_rate * wall
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "cpu_s_net": round(cpu_net, 2),
            "cpu_s_per_case": round(cpu_net / len(inputs), 3), "wall_s_per_case": round(wall / len(inputs), 3)}  # fmt: skip


def _idle_rate(seconds: float) -> float:
    busy = _busy_s()
    time.sleep(seconds)
    return (_busy_s() - busy) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 160, 160], metavar=("Z", "Y", "X"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results-cluster")
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    configure_logging(json=True, stream=open(os.devnull, "w"))  # noqa: SIM115 - for the whole run
    inputs = _inputs(args.cases, tuple(args.shape))
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    common = {"model_dir": packaged_demo_model(), "device": "cpu", "use_mirroring": False, "torch_threads": 1,
              "prepare_workers": 2, "export_workers": 2, "unpack_workers": 2}  # fmt: skip
    plain = Settings(**common, work_dir=work / "plain")  # type: ignore[arg-type]
    idle_plain = _idle_rate(10)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "cold": [], "warm": []}
    for _ in range(args.repeat):
        runs["plain"].append(_run(inputs, plain, idle_plain))
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **LOOPBACK})
        nodes.add_node(num_cpus=1, **LOOPBACK)
        nodes.add_node(num_cpus=1, num_gpus=1, **LOOPBACK)
        nodes.wait_for_nodes()
        idle_cluster = _idle_rate(10)  # Ray's processes at rest count as background here
        on = Settings(**common, work_dir=work / "cluster", cluster=nodes.address)  # type: ignore[arg-type]
        runs["cold"].append({**_run(inputs, on, idle_cluster), "idle_cpu_per_s": round(idle_cluster, 3)})
        runs["warm"].append({**_run(inputs, on, idle_cluster), "idle_cpu_per_s": round(idle_cluster, 3)})
        import ray

        ray.shutdown()
        nodes.shutdown()
        runs["plain"].append(_run(inputs, plain, idle_plain))
    shutil.rmtree(work, ignore_errors=True)

    def median(mode: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[mode]), 3)

    summary = {
        mode: {key: median(mode, key) for key in ("wall_s", "cpu_s_net", "cpu_s_per_case", "wall_s_per_case")}
        for mode in runs
    }
    for mode in ("cold", "warm"):
        summary[mode]["cpu_overhead"] = round(
            summary[mode]["cpu_s_per_case"] / summary["plain"]["cpu_s_per_case"] - 1, 3
        )
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "cases": args.cases, "shape_zyx": args.shape, "idle_cpu_per_s_plain": round(idle_plain, 3),
        "runs": runs, "median": summary,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# --cluster on one machine ({os.cpu_count()} CPUs): {args.cases} cases of {args.shape}, "
        f"{args.repeat} repeats, medians",
        "",
        "| mode | wall s | CPU s (net) | CPU s per case | CPU overhead per case |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode, row in summary.items():
        overhead = f"{row['cpu_overhead']:+.1%}" if "cpu_overhead" in row else ""
        lines.append(
            f"| {mode} | {row['wall_s']} | {row['cpu_s_net']} | {row['cpu_s_per_case']} | {overhead} |"
        )
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    main()

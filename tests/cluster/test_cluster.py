"""A request on a real Ray cluster of three local nodes (``ray.cluster_utils.Cluster``), one of
them declaring a GPU: the model runs on its CPU, but only there, in the prediction actor.

Ray binds to the machine's own network address unless told otherwise; these clusters use
loopback only: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray from rewriting 127.0.0.1 to
that address (``ray._private.services.resolve_ip_for_localhost``), and every node is started
with ``node_ip_address=127.0.0.1``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from asyncflow import run_request, run_request_sync
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom, nifti_bytes
from asyncflow.log import configure_logging
from asyncflow.result import Result
from asyncflow.settings import packaged_demo_model
from tests.helpers import make_tar

# Read by Ray as it is imported: set before.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.model  # every test runs the packaged tiny model, on the cluster and alone

LOOPBACK = {"node_ip_address": "127.0.0.1"}
SCHEMA = jsonschema.Draft202012Validator(
    json.loads((Path(__file__).resolve().parents[2] / "ops" / "events.schema.json").read_text())
)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A head node and two workers, one of them with a GPU; the driver (this process) joins it
    when a request names its address."""
    # A node killed is known dead after 2 missed health checks of 0.5 s (Ray's default: 5 of 3 s).
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}
    nodes = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": health, **LOOPBACK}
    )
    nodes.add_node(num_cpus=1, **LOOPBACK)
    nodes.add_node(num_cpus=1, num_gpus=1, **LOOPBACK)
    nodes.wait_for_nodes()
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def _inputs(rng: np.random.Generator) -> list[Any]:
    """A DICOM series spread over two TARs (one slice in both) with a second series beside it,
    a NIfTI, and a hostile archive (paths out of the folder, a link to /etc/passwd)."""
    one = dicom_series_datasets(make_phantom(rng, (12, 24, 24)), series_number=1)
    two = dicom_series_datasets(make_phantom(rng, (10, 24, 24)), series_number=2)
    first = dicom_series_tar([one[:7]])
    second = dicom_series_tar([one[6:], two])
    phantom = make_phantom(rng, (16, 24, 24))
    hostile = make_tar({"../../outside.txt": b"x", "/abs.txt": b"y"}, mode="w")
    return [
        {"part1.tar": first},
        {"part2.tar": second},
        {"volume.nii.gz": nifti_bytes(phantom.image, phantom.spacing, phantom.origin)},
        {"hostile.tar": hostile},
    ]


def _outputs(result: Result) -> dict[str, Any]:
    """Each output by name: a SEG's SOP Instance UID and pixel data, a NIfTI's voxels."""
    seen: dict[str, Any] = {}
    for name, data in result.dicom_seg_bytes.items():
        ds = pydicom.dcmread(io.BytesIO(data))
        seen[name] = (ds.SOPInstanceUID, ds.PixelData)
    for name, data in result.nifti_seg_bytes.items():
        path = Path(f"/dev/shm/asyncflow-test-{os.getpid()}-{name}")
        path.write_bytes(data)
        seen[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).tobytes()
        path.unlink()
    return seen


def _statuses(result: Result) -> list[tuple[str, str, str | None]]:
    return sorted((c.output, c.status, c.error) for c in result.cases)


class _Background:
    """A request running in a thread of its own, while this one watches its events."""

    def __init__(self, inputs: list[Any], settings: Any) -> None:
        self.results: list[Result] = []
        self.thread = threading.Thread(target=lambda: self.results.append(run_request_sync(inputs, settings)))
        self.thread.start()

    def result(self) -> Result:
        self.thread.join(300)
        assert not self.thread.is_alive() and self.results
        return self.results[0]


def _soon(check: Any, seconds: float = 20.0) -> bool:
    """``check()`` became true within ``seconds`` (Ray frees resources asynchronously)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _events(logs: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in logs.getvalue().splitlines() if line.startswith("{")]


def test_a_request_on_three_nodes_gives_the_outputs_of_one_machine(
    cluster: Cluster, settings_factory, rng: np.random.Generator, tmp_path: Path
) -> None:
    inputs = _inputs(rng)
    alone = run_request_sync(inputs, settings_factory(tmp_path / "alone"))
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    spread = run_request_sync(inputs, settings_factory(tmp_path / "cluster", cluster=cluster.address))

    assert _statuses(spread) == _statuses(alone)
    assert [s for s in _statuses(alone) if s[1] == "done"], "the request has done cases to compare"
    assert _outputs(spread) == _outputs(alone)
    assert sorted(spread.inputs, key=lambda i: i["index"]) == sorted(alone.inputs, key=lambda i: i["index"])
    refused = sorted((f.path, f.reason.split(" would ")[0]) for f in spread.skipped if f.refused)
    assert refused == sorted((f.path, f.reason.split(" would ")[0]) for f in alone.skipped if f.refused)
    assert [path for path, _ in refused] == ["../../outside.txt"]  # the hostile member, refused alike
    events = _events(logs)
    assert [e for e in events if not SCHEMA.is_valid(e)] == []
    gpu_node = next(n for n in ray.nodes() if n["Resources"].get("GPU"))["NodeID"][:8]
    predicted = [e for e in events if e["event"] == "case.predicted"]
    assert predicted and {e["node"] for e in predicted} == {gpu_node}  # the model ran only there
    stepped = {e["node"] for e in events if e["event"] in ("case.prepared", "case.exported")}
    assert stepped <= {n["NodeID"][:8] for n in ray.nodes()} and stepped
    (loaded,) = [e for e in events if e["event"] == "cluster.actor_loaded"]  # one actor, one load
    assert loaded["loads"] == 1 and loaded["node"] == gpu_node
    assert _soon(lambda: ray.available_resources().get("GPU") == 1)  # the actor ended with the request
    assert list((tmp_path / "cluster").iterdir()) == []  # no temporary file left


def _nifti_inputs(rng: np.random.Generator, count: int) -> list[Any]:
    inputs: list[Any] = []
    for n in range(count):
        phantom = make_phantom(rng, (16, 24, 24))
        inputs.append({f"volume{n}.nii.gz": nifti_bytes(phantom.image, phantom.spacing, phantom.origin)})
    return inputs


def test_a_node_lost_mid_request_costs_only_its_steps_in_flight(
    cluster: Cluster, settings_factory, rng: np.random.Generator, tmp_path: Path
) -> None:
    inputs = _inputs(rng)[:3] + _nifti_inputs(rng, 5)
    alone = run_request_sync(inputs, settings_factory(tmp_path / "alone"))
    doomed = cluster.add_node(num_cpus=2, **LOOPBACK)
    cluster.wait_for_nodes()
    name = doomed.node_id[:8]
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    request = _Background(inputs, settings_factory(tmp_path / "cluster", cluster=cluster.address))
    # The node goes as soon as it has done a case's step: it is then running others.
    assert _soon(lambda: any(e.get("node") == name for e in _events(logs)), 120)
    cluster.remove_node(doomed, allow_graceful=False)  # its raylet and workers killed
    spread = request.result()

    assert _statuses(spread) == _statuses(alone)  # no case lost, none failed for the node
    assert all(status == "done" for _, status, _ in _statuses(spread))
    assert _outputs(spread) == _outputs(alone)  # each written once, the same as on one machine
    events = _events(logs)
    assert [e for e in events if not SCHEMA.is_valid(e)] == []
    assert [e["node"] for e in events if e["event"] == "cluster.node_lost"] == [name]
    finished = [e["case_id"] for e in events if e["event"] == "case.finished"]
    assert len(finished) == len(set(finished)) == len(spread.cases)
    # The node had steps in flight (it had 2 CPUs and 8 cases waiting for them): each ran again.
    retried = [e for e in events if e["event"] == "cluster.retried"]
    assert retried and all(e["reason"].startswith("NodeDiedError") for e in retried)
    withdrawn = {e["case_id"] for e in events if e["event"] == "case.withdrawn"}  # its series grew
    assert {e["case_id"] for e in retried} <= set(finished) | withdrawn
    assert list((tmp_path / "cluster").iterdir()) == []


def test_a_request_cancelled_mid_way_ends_its_steps_and_actor_and_leaves_no_file(
    cluster: Cluster, settings_factory, rng: np.random.Generator, tmp_path: Path
) -> None:
    """What a second Ctrl-C does (the request's stages cancelled now), on a cluster."""
    inputs = _nifti_inputs(rng, 8)
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    settings = settings_factory(tmp_path / "work", cluster=cluster.address)
    cancelled = []

    async def request() -> None:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_request, inputs, settings)
                while not any(e["event"] == "case.predicted" for e in _events(logs)):
                    await anyio.sleep(0.05)
                scope.cancel()
        cancelled.append(scope.cancelled_caught)

    anyio.run(request)
    assert cancelled == [True]
    events = _events(logs)
    assert [e["status"] for e in events if e["event"] == "request.finished"] == ["cancelled"]
    assert len([e for e in events if e["event"] == "case.finished"]) < len(inputs)  # it did stop
    total = ray.cluster_resources()
    assert _soon(lambda: ray.available_resources().get("GPU") == total["GPU"])  # the actor ended
    assert _soon(lambda: ray.available_resources().get("CPU") == total["CPU"])  # no step still runs
    assert list((tmp_path / "work").iterdir()) == []


def test_a_prediction_actor_that_dies_is_restarted_and_its_case_predicted_again(
    cluster: Cluster, settings_factory, rng: np.random.Generator, tmp_path: Path
) -> None:
    inputs = _nifti_inputs(rng, 6)
    alone = run_request_sync(inputs, settings_factory(tmp_path / "alone"))
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    request = _Background(inputs, settings_factory(tmp_path / "cluster", cluster=cluster.address))
    assert _soon(lambda: any(e["event"] == "case.predicted" for e in _events(logs)), 120)
    # The actor's process killed, as the kernel's OOM killer would: Ray starts it again.
    subprocess.run(["pkill", "-9", "-f", "ray::Predictor"], check=True)
    spread = request.result()

    assert _statuses(spread) == _statuses(alone)
    assert all(status == "done" for _, status, _ in _statuses(spread))
    assert _outputs(spread) == _outputs(alone)
    events = _events(logs)
    assert [e for e in events if not SCHEMA.is_valid(e)] == []
    retried = [e for e in events if e["event"] == "cluster.retried"]
    assert retried and {e["step"] for e in retried} == {"predict"}
    predicted = [e["case_id"] for e in events if e["event"] == "case.predicted"]
    assert sorted(predicted) == sorted(c.case_id for c in spread.cases)  # each once, in the end
    loaded = [e["loads"] for e in events if e["event"] == "cluster.actor_loaded"]
    assert loaded == [1, 2]  # at the start, and once more in the restarted actor


def test_the_command_line_runs_on_the_cluster_and_one_machine_resumes_its_output(
    cluster: Cluster, rng: np.random.Generator, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for entry in _nifti_inputs(rng, 3):
        for name, data in entry.items():
            (inputs / name).write_bytes(data)
    out, log = tmp_path / "out", tmp_path / "events.jsonl"
    command = [sys.executable, "-m", "asyncflow", "run", str(inputs), "-o", str(out), "--model",
               str(packaged_demo_model()), "--device", "cpu", "--no-mirroring", "--threads", "1",
               "--cluster", cluster.address, "--work-dir", str(tmp_path / "work"), "--log-file", str(log)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 3/3 cases" in done.stdout + done.stderr
    assert sorted(p.name for p in (out / "nifti_seg").iterdir()) == [f"volume{n}.nii.gz" for n in range(3)]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["nodes"] for e in events if e["event"] == "cluster.connected"] == [3]
    assert all("node" in e for e in events if e["event"] == "case.exported")
    assert list((tmp_path / "work").iterdir()) == []
    # The journal is the driver's: the same request on one machine finds every case finished.
    alone = [c for c in command if c not in ("--cluster", cluster.address)] + ["--resume"]
    again = subprocess.run(alone, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((out / "report.json").read_text())["cases"]
    assert [c["status"] for c in resumed] == ["resumed"] * 3

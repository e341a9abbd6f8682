"""A restarted FLAME analysis loses nothing: a node killed mid-request (its process gone, as when
FLAME's orchestrator replaces the deployment) is started again and segments only the cases it
had not finished; the analyst's ZIP equals an uninterrupted run's (names, SOP UIDs, voxels)."""

from __future__ import annotations

import io
import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flame_harness import MockFlameCore, analyzer_kwargs, bundle_outputs, star_bundle, stored
from helpers import phantom_nifti

from asyncflow.artifact import Artifact
from asyncflow.case import CaseReport, Origin
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom
from asyncflow.enums import CaseStatus, RequestStatus, SourceKind
from asyncflow.flame.hub import HubReporter
from asyncflow.flame.storage import TAG_PREFIX, NodeStorage
from asyncflow.log import configure_logging
from asyncflow.result import Result

TESTS = Path(__file__).resolve().parents[1]

# One node's analysis in a child process: argv = the node's objects (pickled), work folder,
# model, storage folder, the tests' folder, "sdk" or "harness".
_NODE = r"""
import pickle, sys
from pathlib import Path
sys.path.insert(0, sys.argv[5])
from flame_harness import analyzer_kwargs, star_bundle
objects, work, model, storage = sys.argv[1:5]
data = pickle.loads(Path(objects).read_bytes())
star_bundle([data], analyzer_kwargs(Path(model), Path(work)), storage=Path(storage), sdk=sys.argv[6] == "sdk")
"""


def _objects(rng: np.random.Generator) -> list[dict[str, bytes]]:
    """Two DICOM series in TARs and four NIfTI volumes: six cases."""
    tars = [
        dicom_series_tar([dicom_series_datasets(make_phantom(rng, (24, 40, 40)), series_number=n)])
        for n in (1, 2)
    ]
    return [
        *({f"study{n}.tar": tar} for n, tar in enumerate(tars)),
        *({f"volume{n}.nii.gz": phantom_nifti(rng, (24, 40, 40))} for n in range(4)),
    ]


def _stored(storage: Path) -> list[Path]:
    """The tags of cases stored whole (a kill may leave a tag's folder with half an object)."""
    node = storage / "node_0"
    return [p for p in node.iterdir() if p.name.startswith(TAG_PREFIX) and stored(p)] if node.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("harness", ["harness", "sdk"])
def test_a_node_killed_mid_request_redoes_only_its_unfinished_cases(
    tmp_path: Path, model_dir: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, harness: str
) -> None:
    """``harness``: asyncflow's mirror of FLAME's test mode, or the SDK's own StarModelTester (where
    the SDK is installed; its mock core's storage calls do nothing, so they get the same folder)."""
    if harness == "sdk":
        pytest.importorskip("flame.star.star_model_tester")
    objects, storage = _objects(rng), tmp_path / "storage"
    (tmp_path / "objects.pkl").write_bytes(pickle.dumps(objects))
    command = [sys.executable, "-c", _NODE, str(tmp_path / "objects.pkl"), str(tmp_path / "w1")]
    command += [str(model_dir), str(storage), str(TESTS), harness]
    node = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while len(_stored(storage)) < 2 and node.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        node.send_signal(signal.SIGKILL)  # no finally of its own runs: as a pod replaced
    finally:
        node.kill()
        _, errors = node.communicate(timeout=60)
    finished_before = len(_stored(storage))
    assert 2 <= finished_before < 6, errors.decode()[-2000:]

    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    kwargs = analyzer_kwargs(model_dir, tmp_path / "w2")
    restarted = star_bundle(
        [objects], kwargs, storage=storage, sdk=harness == "sdk", setter=monkeypatch.setattr
    )
    restart_log = logs.getvalue()
    kwargs = analyzer_kwargs(model_dir, tmp_path / "w3")
    uninterrupted = star_bundle([objects], kwargs, sdk=harness == "sdk", setter=monkeypatch.setattr)

    manifest, outputs = bundle_outputs(restarted)
    reference_manifest, reference = bundle_outputs(uninterrupted)

    def unnamed(found: dict[str, Any]) -> dict[str, Any]:  # the SDK's tester names nodes at random
        return {name.split("/", 1)[1]: value for name, value in found.items()}

    assert len(outputs) == 6 and unnamed(outputs) == unnamed(reference)  # names, SOP UIDs, voxels
    statuses = sorted(case["status"] for case in manifest["cases"])
    assert statuses == sorted(["resumed"] * finished_before + ["done"] * (6 - finished_before))
    assert manifest["nodes"][0]["status"] == reference_manifest["nodes"][0]["status"] == "done"
    events = [json.loads(line) for line in restart_log.splitlines() if line.startswith("{")]
    predicted = [e for e in events if e.get("event") == "case.predicted"]
    assert len(predicted) == 6 - finished_before  # the network ran only for the unfinished cases
    (listed,) = [e for e in events if e.get("event") == "flame.storage_listed"]
    assert listed["cases"] == finished_before
    # Each of the six cases stored once: the restart stored only those it segmented.
    assert len(_stored(storage)) == 6
    assert all(len(stored(tag)) == 1 for tag in _stored(storage))


def test_a_stored_case_is_found_with_its_model_only_and_not_once_withdrawn(tmp_path: Path) -> None:
    core = MockFlameCore("node_0", "default", ["node_0", "node_1"], "node_1", {}, storage=tmp_path)
    seg = Artifact("dicom_seg", "dicom_seg", "ct.dcm", b"SEG", "dicom_seg_bytes", primary=True)
    NodeStorage(core).finish_case("case-key", "model-key", [seg], {"labels_present": [1]})
    (tag,) = core.get_local_tags() or []
    assert tag.startswith(TAG_PREFIX) and len(tag) == 32  # the node's result service's longest
    again = NodeStorage(core)  # a restart: a new analyzer, the same storage
    assert again.finished("case-key", "another model") is None
    entry = again.finished("case-key", "model-key")
    assert entry is not None and entry["data"] == [b"SEG"] and entry["report"] == {"labels_present": [1]}
    again.withdraw("case-key", [("dicom_seg", "ct.dcm")])  # its series grew: its outputs are void
    assert NodeStorage(core).finished("case-key", "model-key") is None


def test_a_storage_that_fails_costs_a_restart_its_shortcut_never_the_request() -> None:
    class Unreachable:  # the node's result service down: every call raises
        def get_local_tags(self, *_: Any, **__: Any) -> list[str]:
            raise ConnectionError("storage")

        save_intermediate_data = get_intermediate_data = get_local_tags

    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    storage = NodeStorage.of(Unreachable())
    assert storage is not None
    storage.finish_case("case-key", "model-key", [], {})
    assert storage.finished("case-key", "model-key") is None
    failed = [json.loads(line) for line in logs.getvalue().splitlines() if "flame.storage_failed" in line]
    assert [(e["step"], e["error_type"]) for e in failed] == [
        ("list", "ConnectionError"),
        ("save", "ConnectionError"),
    ]
    assert NodeStorage.of(object()) is None  # a core without the SDK's storage calls: no storage


def test_the_hub_counts_the_cases_kept_from_before_the_restart_as_segmented() -> None:
    core = MockFlameCore("node_0", "default", ["node_0", "node_1"], "node_1", {})
    cases = [
        CaseReport(f"case-000{n}", SourceKind.NIFTI, Origin(n, f"v{n}.nii.gz"), status=status)
        for n, status in enumerate([CaseStatus.RESUMED, CaseStatus.RESUMED, CaseStatus.DONE])
    ]
    HubReporter(core).finished(Result("r", RequestStatus.DONE, {}, cases, [], [], 12.0))
    ((log_type, line),) = core.hub.logs
    assert log_type == "info" and line.startswith(
        "done: 3/3 cases segmented, 2 of them before a restart in 12 s"
    )

"""The FLAME analyzer over a node's S3 data (tests/s3_node.py: moto's S3 server behind the node's
gateway routes): StarModel fetches nothing, the analyzer lists the node's objects and streams
each to disk as the pipeline needs it. Same result as the SDK's in-memory way; a lost object
costs that object alone; no key or byte of the data reaches the Hub or the logs."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from flame_harness import analyzer_kwargs, bundle_outputs, run_star, star_bundle
from helpers import make_tar, phantom_nifti
from s3_node import APIKEY, s3_node

from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom
from asyncflow.flame.analysis import ZipAggregator, nnUNetAnalyzer
from asyncflow.log import configure_logging

PATIENT = "Mustermann^Erika"
# node 0 holds one source, node 1 two, which both hold an object of the same key; the last key
# of node 1 is never served.
OBJECTS: dict[str, list[str]] = {
    "site-a": ["Mustermann Erika/CT 2019-01-01.tar.gz", "Müller Jörg/scan ü.nii.gz"],
    "site-b": ["ct/Erika & Co <1>.tar"],
    "site-c": ["ct/Erika & Co <1>.tar", "zz never served.tar.gz"],
}
SECRETS = ("Mustermann", "Erika", "Müller", "Jörg", "never served", "2019-01-01", "site-")


def _in_memory(bodies: dict[str, dict[str, bytes]]) -> list[list[dict[str, bytes]]]:
    """The SDK's way: each node's objects in memory, in listing order (S3 lists keys in byte
    order), without the one never served: the other inputs keep their indexes."""
    site_a = bodies["site-a"]
    return [
        [{k: site_a[k] for k in sorted(site_a, key=str.encode)}],
        [bodies["site-b"], {OBJECTS["site-c"][0]: bodies["site-c"][OBJECTS["site-c"][0]]}],
    ]


def _bodies(rng: np.random.Generator) -> dict[str, dict[str, bytes]]:
    def series(number: int) -> list[pydicom.Dataset]:
        volume = make_phantom(rng, (24, 40, 40))
        return dicom_series_datasets(volume, patient_name=PATIENT, series_number=number)

    return {
        "site-a": {
            OBJECTS["site-a"][0]: dicom_series_tar([series(1)]),
            OBJECTS["site-a"][1]: phantom_nifti(rng, (24, 40, 40)),
        },
        "site-b": {OBJECTS["site-b"][0]: dicom_series_tar([series(2)], compression="")},
        "site-c": {
            OBJECTS["site-c"][0]: dicom_series_tar([series(3)], compression=""),
            OBJECTS["site-c"][1]: make_tar({"v.nii.gz": phantom_nifti(rng, (24, 40, 40))}),
        },
    }


@pytest.mark.slow
def test_two_nodes_over_s3_give_the_in_memory_result_and_lose_only_the_object_never_served(
    tmp_path: Path, model_dir: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    bodies = _bodies(rng)
    monkeypatch.setenv("DATA_SOURCE_TOKEN", APIKEY)  # as the node's environment gives it
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    with s3_node(list(OBJECTS)) as node:
        for source, objects in bodies.items():
            for key, body in objects.items():
                node.put(source, key, body)
        first, lost = OBJECTS["site-a"][0], OBJECTS["site-c"][1]
        node.gateway.faults.transient = {first: 2}
        node.gateway.faults.cut_short = {first}  # its first two tries end halfway through
        node.gateway.faults.permanent = {lost}
        sources = {s["name"]: s for s in node.gateway.sources()}
        streamed = run_star(
            nnUNetAnalyzer,
            ZipAggregator,
            [None, None],
            query=None,  # as run_star_model starts StarModel: the SDK fetches nothing
            data_sources=[[sources["site-a"]], [sources["site-b"], sources["site-c"]]],
            output_type="bytes",
            analyzer_kwargs=analyzer_kwargs(
                model_dir, tmp_path / "w1", data_gateway=node.gateway.url, fetch_backoff_s=0.01
            ),
        )
        assert node.gateway.tries[first] == 3 and node.gateway.tries[lost] == 4  # fetch_tries
    in_memory = run_star(
        nnUNetAnalyzer,
        ZipAggregator,
        _in_memory(bodies),
        output_type="bytes",
        analyzer_kwargs=analyzer_kwargs(model_dir, tmp_path / "w2"),
    )

    streamed_manifest, streamed_outputs = bundle_outputs(streamed.final_result)
    memory_manifest, memory_outputs = bundle_outputs(in_memory.final_result)
    assert len(streamed_outputs) == 4 and streamed_outputs == memory_outputs  # names, UIDs, voxels
    statuses = {n["node"]: n["status"] for n in streamed_manifest["nodes"]}
    assert statuses == {"node_0": "done", "node_1": "partial"}
    assert {n["node"]: n["status"] for n in memory_manifest["nodes"]} == {"node_0": "done", "node_1": "done"}
    node_1 = next(n for n in streamed_manifest["nodes"] if n["node"] == "node_1")["report"]
    lost_inputs = [(i["index"], i["name"], i["failure"]) for i in node_1["inputs"] if i["failure"]]
    assert lost_inputs == [(2, "input-2", "object not fetched")]  # named by index and reason class
    node_1_cases = [c for c in streamed_manifest["cases"] if c["node"] == "node_1"]
    assert [c["status"] for c in node_1_cases] == ["done", "done"]
    # The same key in two sources: each case keeps its own input.
    assert sorted(c["origin"] for c in node_1_cases) == ["input-0", "input-1"]

    # The Hub: progress rises through the fetching to 100; counts and classes, no names.
    for hub in streamed.hubs.values():
        assert hub.warnings == [] and hub.progress == sorted(set(hub.progress))
    assert streamed.hubs["node_1"].progress[0] < 20 <= streamed.hubs["node_1"].progress[-2]
    assert streamed.hubs["node_1"].progress[-1] == 100
    assert any("inputs lost: object not fetched x1" in m for _, m in streamed.hubs["node_1"].logs)
    assert any("segmenting 3 input object(s)" in m for _, m in streamed.hubs["node_1"].logs)
    sent = "\n".join(m for h in streamed.hubs.values() for _, m in h.logs) + logs.getvalue()
    assert not [s for s in SECRETS if s in sent]
    fetched = [json.loads(line) for line in logs.getvalue().splitlines() if '"input.fetched"' in line]
    assert sorted((e["input_index"], e["tries"]) for e in fetched) == [(0, 1), (0, 3), (1, 1), (1, 1)]


def test_a_node_whose_gateway_cannot_list_ends_with_a_clear_error_and_the_others_go_on(
    tmp_path: Path, model_dir: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATA_SOURCE_TOKEN", APIKEY)
    with s3_node(["only"]) as node:
        node.put("only", "a.nii.gz", phantom_nifti(rng))
        node.gateway.faults.listing_down = True
        run = run_star(
            nnUNetAnalyzer,
            ZipAggregator,
            [None],
            query=None,
            data_sources=[node.gateway.sources()],
            output_type="bytes",
            analyzer_kwargs=analyzer_kwargs(
                model_dir, tmp_path / "w", data_gateway=node.gateway.url, fetch_backoff_s=0.01
            ),
        )
    (result,) = run.sent["node_0"]
    assert result["status"] == "failed"
    assert result["error"] == (
        "data source 1 of 1 could not be listed: the data gateway answered HTTP 502, on each of 4 tries"
    )
    assert ("warn", f"no case segmented: {result['error']}") in run.hubs["node_0"].logs


# With the FLAME SDK installed (not on PyPI: CONTRIBUTING.md says how), the same against its own code.


def test_the_sdks_own_data_client_reads_the_same_objects_through_the_same_routes(tmp_path: Path) -> None:
    """flamesdk's ``DataApiClient`` (the SDK's in-memory way) pointed at the gateway: it finds the
    node's sources through the hub adapter and reads the very objects asyncflow streams."""
    data_api = pytest.importorskip("flamesdk.resources.client_apis.clients.data_api_client")
    import anyio
    from flamesdk.resources.utils.logging import FlameLogger

    from asyncflow.flame.gateway import GatewayStore

    # Keys the SDK can fetch: it takes keys from the listing's XML without unescaping, so a key
    # with & < > (which asyncflow fetches: test_fetch.py) is beyond it.
    keys = ["Müller Jörg/scan ü 1.nii.gz", "a/b c/d.tar", "plain.tar.gz"]
    with s3_node(["s1", "s2"]) as node:
        for number, key in enumerate(keys):
            node.put("s1" if number % 2 else "s2", key, key.encode() * 1000)
        client = data_api.DataApiClient(
            project_id="project-1",
            nginx_name=node.gateway.nginx_name,
            data_source_token=APIKEY,
            keycloak_token="unused",
            flame_logger=FlameLogger(silent=True),
        )
        names = [s["name"] for s in client.get_available_sources()]
        by_sdk = client.get_data(s3_keys=[])

        async def streamed() -> list[dict[str, bytes]]:
            async with GatewayStore(node.gateway.url, APIKEY) as store:
                per_source: list[dict[str, bytes]] = [{} for _ in names]
                for number, obj in enumerate(await store.list_objects(names)):
                    await store.fetch(obj, tmp_path / str(number))
                    per_source[names.index(obj.source)][obj.key] = (tmp_path / str(number)).read_bytes()
                return per_source

        assert names == ["s1", "s2"]
        assert anyio.run(streamed) == by_sdk


@pytest.mark.slow
def test_under_the_sdk_two_nodes_stream_from_s3_and_its_logs_hold_no_key_or_byte(
    tmp_path: Path,
    model_dir: Path,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """StarModelTester, two nodes, StarModel started with ``query=None`` as run_star_model does.
    The SDK's mock core hands test data out whatever the query; here it answers as the real core
    does (``get_s3_data(None)`` is None; ``get_data_sources()`` the node's sources)."""
    tester = pytest.importorskip("flame.star.star_model_tester")
    from flame.utils.mock_flame_core import MockFlameCoreSDK

    monkeypatch.setattr(
        MockFlameCoreSDK, "get_s3_data", lambda self, s3_keys=None: None if s3_keys is None else self.data
    )
    monkeypatch.setattr(MockFlameCoreSDK, "get_data_sources", lambda self: self._test_kwargs["s3_data"])
    # The tester writes out the result of whichever node thread ends first (an analyzer's: None).
    submitted: list[bytes] = []
    submit = MockFlameCoreSDK.submit_final_result

    def record(self: Any, result: bytes, *args: Any, **kwargs: Any) -> Any:
        submitted.append(result)
        return submit(self, result, *args, **kwargs)

    monkeypatch.setattr(MockFlameCoreSDK, "submit_final_result", record)
    monkeypatch.setenv("DATA_SOURCE_TOKEN", APIKEY)
    bodies = _bodies(rng)
    with s3_node(list(OBJECTS)) as node:
        for source, objects in bodies.items():
            for key, body in objects.items():
                node.put(source, key, body)
        node.gateway.faults.permanent = {OBJECTS["site-c"][1]}
        sources = {s["name"]: s for s in node.gateway.sources()}
        tester.StarModelTester(
            data_splits=[[sources["site-a"]], [sources["site-b"], sources["site-c"]]],
            analyzer=nnUNetAnalyzer,
            aggregator=ZipAggregator,
            data_type="s3",
            query=None,
            output_type="bytes",
            analyzer_kwargs=analyzer_kwargs(
                model_dir, tmp_path / "w", data_gateway=node.gateway.url, fetch_backoff_s=0.01
            ),
        )
    printed = capsys.readouterr()
    # The SDK's way, as a reference (its submission reaches ``record`` too).
    star_bundle(
        _in_memory(bodies), analyzer_kwargs(model_dir, tmp_path / "w2"), sdk=True, setter=monkeypatch.setattr
    )
    streamed, in_memory = (bundle_outputs(bundle) for bundle in submitted)
    assert sorted(n["status"] for n in streamed[0]["nodes"]) == ["done", "partial"]
    assert sorted(n["status"] for n in in_memory[0]["nodes"]) == ["done", "done"]

    # The tester names nodes by random ids: outputs compared without their node folder.
    def unnamed(outputs: dict[str, Any]) -> list[Any]:
        return sorted((name.split("/", 1)[1], *value) for name, value in outputs.items())

    assert len(streamed[1]) == 4 and unnamed(streamed[1]) == unnamed(in_memory[1])
    sdk_logs = printed.out + printed.err  # the mock core prints every node's log lines
    assert "Data extracted: None" in sdk_logs  # StarModel's line about the data it fetched
    assert not [s for s in SECRETS if s in sdk_logs]

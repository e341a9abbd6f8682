"""A node's S3 objects fetched through its gateway (tests/s3_node.py: moto's real S3 server behind
the gateway's routes): listed page by page, streamed to disk within a window, retried when the
failure is transient, lost alone when it is not, and never the whole request in memory."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import numpy as np
import pytest
from helpers import dice, make_tar, phantom_backend, phantom_nifti
from s3_node import APIKEY, S3Node, s3_node

from asyncflow import RequestError, Result, Settings, run_request
from asyncflow.backends import Backend
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom, nifti_bytes
from asyncflow.enums import InputFailure
from asyncflow.flame.gateway import GatewayStore
from asyncflow.log import configure_logging
from asyncflow.reading.request import FetchFailed
from asyncflow.testing import FakeBackend
from asyncflow.writing.seg import read_dicom_seg

# Keys as hospital exports name them: spaces, umlauts, characters XML and URLs escape.
ODD_KEYS = [
    "ct/Müller Jörg/study 1.tar.gz",
    "mr/série & co/+plus%20.nii.gz",
    "x/<angle> 'quote'.tar",
    "日本/画像.nii.gz",
]


def _from_store(node: S3Node, settings: Settings, backend: Backend, tries: int = 4) -> Result:
    """``run_request`` over every object of the node's source ``s``, listed through its gateway."""

    async def main() -> Result:
        async with GatewayStore(node.gateway.url, APIKEY, tries=tries, backoff_s=0.01) as store:
            return await run_request(await store.list_objects(["s"]), settings, backend=backend)

    return anyio.run(main)


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(work_dir=tmp_path / "work", fetch_backoff_s=0.01, unpack_workers=1, **overrides)  # type: ignore[arg-type]


def test_listing_follows_pages_and_fetches_every_key_byte_for_byte(tmp_path: Path) -> None:
    bodies = {f"plain/{n:02d}.bin": bytes([n]) * (1000 + n) for n in range(7)}
    bodies.update({key: key.encode() * 300 for key in ODD_KEYS})
    with s3_node(["first", "second source"]) as node:
        for number, (key, body) in enumerate(bodies.items()):
            node.put("first" if number % 2 else "second source", key, body)

        async def main() -> dict[str, bytes]:
            async with GatewayStore(node.gateway.url, APIKEY, page_size=3) as store:
                objects = await store.list_objects(["first", "second source"])
                fetched = {}
                for number, obj in enumerate(objects):
                    target = tmp_path / f"{number}.object"
                    assert await store.fetch(obj, target) == 1
                    assert obj.size == target.stat().st_size
                    fetched[obj.key] = target.read_bytes()
                return fetched

        fetched = anyio.run(main)
    assert fetched == bodies  # every key, once, with its own bytes (pages of 3: 6 listing pages)


def test_a_gateway_that_refuses_the_listing_says_which_source_and_why() -> None:
    with s3_node(["only"]) as node:

        async def listing(apikey: str) -> None:
            async with GatewayStore(node.gateway.url, apikey, tries=2, backoff_s=0.01) as store:
                await store.list_objects(["only"])

        with pytest.raises(RequestError, match=r"data source 1 of 1 could not be listed: .*HTTP 401"):
            anyio.run(listing, "wrong-token")
        node.gateway.faults.listing_down = True
        with pytest.raises(RequestError, match=r"HTTP 502, on each of 2 tries"):
            anyio.run(listing, APIKEY)


def test_transient_failures_are_retried_and_final_ones_are_not(tmp_path: Path) -> None:
    with s3_node(["s"]) as node:
        for key in ("flaky", "cut", "down", "gone"):
            node.put("s", key, key.encode() * 100_000)
        node.gateway.faults.transient = {"flaky": 2, "cut": 2, "down": 99}
        node.gateway.faults.cut_short = {"cut"}  # those tries send half the body, then hang up

        async def main() -> dict[str, object]:
            outcome: dict[str, object] = {}
            async with GatewayStore(node.gateway.url, APIKEY, tries=3, backoff_s=0.01) as store:
                objects = {o.key: o for o in await store.list_objects(["s"])}
                node.client.delete_object(
                    Bucket=node.gateway.buckets["s"], Key="gone"
                )  # listed, then deleted
                for key, obj in objects.items():
                    target = tmp_path / key
                    try:
                        tries = await store.fetch(obj, target)
                        outcome[key] = (tries, target.read_bytes() == key.encode() * 100_000)
                    except FetchFailed as exc:
                        outcome[key] = (exc.tries, exc.failure, target.exists())
            return outcome

        outcome = anyio.run(main)
        assert outcome == {
            "flaky": (3, True),
            "cut": (3, True),  # a body cut short is never taken for the object
            "down": (3, InputFailure.FETCH_FAILED, False),
            "gone": (1, InputFailure.NOT_FOUND, False),  # a 404 is final: one try
        }
        assert node.gateway.tries["down"] == 3 and node.gateway.tries["gone"] == 1


def test_a_flaky_store_loses_only_the_object_it_never_serves(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    with s3_node(["s"]) as node:
        volumes = {f"{n:02d} {key}": phantom_nifti(rng, (8, 12, 12)) for n, key in enumerate(ODD_KEYS * 2)}
        for key, volume in volumes.items():
            node.put("s", key, make_tar({"v.nii.gz": volume}) if ".tar" in key else volume)
        keys = list(volumes)
        node.gateway.faults.transient = {keys[0]: 1, keys[3]: 2, keys[5]: 3}
        node.gateway.faults.cut_short = {keys[3]}
        node.gateway.faults.permanent = {keys[6]}

        result = _from_store(node, _settings(tmp_path, fetch_window=2), FakeBackend())
    assert result.status == "partial"
    lost = [(i["index"], i["failure"]) for i in result.inputs if i["failure"]]
    assert lost == [(6, InputFailure.FETCH_FAILED)]
    assert sorted(c.origin.name for c in result.cases) == sorted(k for k in keys if k != keys[6])
    assert all(c.status == "done" for c in result.cases) and len(result.nifti_seg_bytes) == 7
    assert node.gateway.most_in_flight <= 2  # the window
    assert not list((tmp_path / "work").iterdir())  # the request's folder is gone


def test_the_same_request_gives_the_same_result_streamed_or_in_memory(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    objects = {
        f"k{n} {ODD_KEYS[n % 4]}": make_tar({f"{n}.nii.gz": phantom_nifti(rng, (8, 12, 12))})
        for n in range(5)
    }
    with s3_node(["s"]) as node:
        for key, body in objects.items():
            node.put("s", key, body)

        from_store = _from_store(node, _settings(tmp_path, opaque_names=True), FakeBackend())
    listed_order = dict(sorted(objects.items()))  # S3 lists keys in byte order
    in_memory = anyio.run(
        lambda: run_request([listed_order], _settings(tmp_path, opaque_names=True), backend=FakeBackend())
    )
    assert from_store.status == in_memory.status == "done"
    digest = {name: hashlib.sha256(body).hexdigest() for name, body in from_store.nifti_seg_bytes.items()}
    assert digest == {name: hashlib.sha256(b).hexdigest() for name, b in in_memory.nifti_seg_bytes.items()}
    assert [(i["index"], i["name"], i["bytes"]) for i in from_store.inputs] == [
        (i["index"], i["name"], i["bytes"]) for i in in_memory.inputs
    ]


def test_a_series_that_grows_after_its_first_case_ended_is_fetched_again(
    tmp_path: Path, fake_settings, rng: np.random.Generator
) -> None:
    """As tests/test_pipeline.py's test of the same name, with each entry an object of a store:
    the first half's files are gone when the second half arrives, so its object is fetched again."""
    split = make_phantom(rng, (24, 32, 32))
    series = dicom_series_datasets(split, series_number=1)
    objects = {"00 part1.tar": dicom_series_tar([series[:12]])}
    for n in range(12):
        volume = make_phantom(rng, (32, 32, 32))
        objects[f"{n + 1:02d} volume.nii.gz"] = nifti_bytes(volume.image, volume.spacing, volume.origin)
    objects["13 part2.tar"] = dicom_series_tar([series[12:]])
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    with s3_node(["s"]) as node:
        for key, body in objects.items():
            node.put("s", key, body)

        one = {"unpack_workers": 1, "prepare_workers": 1, "export_workers": 1, "queue_size": 1}
        settings = fake_settings(tmp_path / "work", fetch_window=1, **one)
        result = _from_store(node, settings, phantom_backend())
        assert node.gateway.tries["00 part1.tar"] == 2 and node.gateway.tries["13 part2.tar"] == 1
    assert result.status == "done" and len(result.cases) == 13
    events = [json.loads(line) for line in logs.getvalue().splitlines()]
    (restored,) = [e for e in events if e["event"] == "input.restored"]
    assert (restored["input_index"], restored["files"]) == (0, 12)
    (seg,) = result.dicom_seg_bytes.values()  # one series, whole
    numbers, names = read_dicom_seg(seg, [str(d.SOPInstanceUID) for d in series])
    liver = {v: k for k, v in names.items()}["liver"]
    assert numbers.shape[0] == 24 and dice(numbers == liver, split.labels == 1) > 0.9
    assert not list((tmp_path / "work").iterdir())


# What the request's own process does: list, then run the pipeline over the objects (the FLAME
# analyzer's path without the model, whose own memory is measured in benchmarks/fetch_memory.py).
_RUN = textwrap.dedent(
    """
    import json, sys, anyio
    from pathlib import Path
    from asyncflow import Settings, run_request
    from asyncflow.flame.gateway import GatewayStore
    from asyncflow.machine import peak_rss_bytes
    from asyncflow.testing import FakeBackend

    url, apikey, work = sys.argv[1:4]

    async def main():
        async with GatewayStore(url, apikey) as store:
            objects = await store.list_objects(["s"])
            settings = Settings(work_dir=Path(work), unpack_workers=2, fetch_window=4, queue_size=2)
            result = await run_request(objects, settings, backend=FakeBackend())
        done = sum(c.status == "done" for c in result.cases)
        print(json.dumps({"status": str(result.status), "done": done, "peak_rss_bytes": peak_rss_bytes(),
                          "bytes": sum(o.size for o in objects), "objects": len(objects)}))

    anyio.run(main)
    """
)


@pytest.mark.slow
def test_peak_memory_stays_below_a_quarter_of_the_request(tmp_path: Path, rng: np.random.Generator) -> None:
    """40 objects of 32 MiB each (a small volume and a filler member the scan skips) through a
    process allowed 320 MiB at peak: the request is four times what it may hold."""
    allowed = 320 << 20
    filler = rng.bytes(32 << 20)
    with s3_node(["s"]) as node:
        for n in range(40):
            members = {"case/v.nii.gz": phantom_nifti(rng, (8, 12, 12)), "case/filler.bin": filler}
            node.put("s", f"study {n:02d}/export ü.tar", make_tar(members, "w"))
        run = subprocess.run(
            [sys.executable, "-c", _RUN, node.gateway.url, APIKEY, str(tmp_path / "work")],
            env={**os.environ, "MALLOC_ARENA_MAX": "2"},  # as the image runs (benchmarks/RESULTS-fetch.md)
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["status"] == "done" and measured["done"] == measured["objects"] == 40
    assert measured["bytes"] >= 4 * allowed
    assert measured["peak_rss_bytes"] <= allowed, measured

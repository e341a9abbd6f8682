"""A FLAME node's S3 data: does the analyzer's peak memory grow with the request?

    python benchmarks/fetch_memory.py [--objects 10,40] [--object-mb 10,40] [--out benchmarks/results-fetch]
    python benchmarks/fetch_memory.py --smoke --out /tmp/fetch     # under a minute; CI runs this

The node: moto's S3 server (a real S3 implementation) behind the stand-in of the
node's gateway routes in ``tests/s3_node.py``, on localhost. Each object is an
uncompressed TAR of one DICOM series (a 24 x 40 x 40 phantom) and a filler member
of ``--object-mb`` MiB of random bytes that the scan skips (neither DICOM nor
NIfTI): at one count of objects the request grows with ``--object-mb`` while
every case stays the same, so what grows with it is the fetching alone; across
counts, the cases grow too.

For each count of ``--objects`` and size of ``--object-mb``, a run per mode, each a child
process: the FLAME analyzer as one node of ``tests/flame_harness.py`` (``nnUNetAnalyzer``, the
packaged tiny model on the CPU, one worker per stage), first streaming its
objects (``stream``, ``query=None``: asyncflow's way), then with every object read whole
into memory before the analyzer runs, as flamesdk's data client does
(``sdk``, ``inputs="sdk"``: the SDK's way; here read with httpx through the same
gateway). ``starmodel`` hands the same objects to the SDK's own ``StarModelTester``, so that
what StarModel itself does with them counts too (it renders the whole data as text for its
``Data extracted`` line); it needs the FLAME SDK in the Python that runs the benchmark. Reported per run: the child's peak RSS (VmHWM; ``ru_maxrss`` would carry
over the parent's peak, and the parent holds the S3 server's objects), wall
seconds, cases done, the request's bytes. Writes ``results.json`` and
``RESULTS.md`` into ``--out``. Not a test: it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from s3_node import APIKEY, s3_node  # noqa: E402

from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom  # noqa: E402
from asyncflow.settings import packaged_demo_model  # noqa: E402

# One node's analysis, in a child process: argv = mode, gateway URL, source, work folder, model.
_NODE = r"""
import io, json, os, sys, time, zipfile
from pathlib import Path
sys.path.insert(0, sys.argv[6])
import anyio, httpx
from flame_harness import analyzer_kwargs, run_star
from asyncflow.flame.analysis import ZipAggregator, nnUNetAnalyzer
from asyncflow.flame.gateway import GatewayStore
from asyncflow.machine import peak_rss_bytes

mode, url, source, work, model = sys.argv[1:6]
apikey = os.environ["DATA_SOURCE_TOKEN"]
kwargs = analyzer_kwargs(Path(model), Path(work), data_gateway=url)
start = time.perf_counter()
if mode == "stream":
    sources = [[{"id": "s", "name": source, "paths": []}]]
    run = run_star(nnUNetAnalyzer, ZipAggregator, [None], query=None, data_sources=sources,
                   output_type="bytes", analyzer_kwargs=kwargs)
else:  # the SDK's way: every object whole in memory, kept for the analysis (sdk, starmodel)
    async def read_all():
        async with GatewayStore(url, apikey) as store:
            keys = [o.key for o in await store.list_objects([source])]
        async with httpx.AsyncClient(base_url=url, headers={"apikey": apikey}, timeout=None) as client:
            return {key: (await client.get(f"/{source}/s3/{key}")).content for key in keys}
    data = anyio.run(read_all)
    if mode == "sdk":
        final = run_star(nnUNetAnalyzer, ZipAggregator, [[data]], output_type="bytes",
                         analyzer_kwargs=kwargs).final_result
    else:  # starmodel: the SDK's own StarModel, in its test mode, as a node runs it
        from flame.star.star_model_tester import StarModelTester
        from flame.utils.mock_flame_core import MockFlameCoreSDK
        submitted, submit = [], MockFlameCoreSDK.submit_final_result
        def record(self, result, *args, **more):
            submitted.append(result)
            return submit(self, result, *args, **more)
        MockFlameCoreSDK.submit_final_result = record
        StarModelTester(data_splits=[[data]], analyzer=nnUNetAnalyzer, aggregator=ZipAggregator,
                        data_type="s3", query=[], output_type="bytes", analyzer_kwargs=kwargs)
        final = submitted[0]
if mode == "stream":
    final = run.final_result
manifest = json.loads(zipfile.ZipFile(io.BytesIO(final)).read("manifest.json"))
print(json.dumps({"wall_s": round(time.perf_counter() - start, 2), "peak_rss_bytes": peak_rss_bytes(),
                  "cases_done": manifest["totals"]["cases_done"]}))
"""


def _objects(count: int, filler_mb: int, rng: np.random.Generator) -> dict[str, bytes]:
    filler = rng.bytes(filler_mb << 20)
    objects = {}
    for n in range(count):
        series = dicom_series_datasets(make_phantom(rng, (24, 40, 40)), series_number=n + 1)
        tar = dicom_series_tar([series], compression="")
        objects[f"study {n:03d}/CT export.tar"] = _with_member(tar, "filler.bin", filler)
    return objects


def _with_member(tar: bytes, name: str, data: bytes) -> bytes:
    """``tar`` (uncompressed) with one more member."""
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar)) as source, tarfile.open(fileobj=out, mode="w") as target:
        for member in source:
            target.addfile(member, source.extractfile(member))
        info = tarfile.TarInfo(name)
        info.size = len(data)
        target.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _run(mode: str, url: str, model: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fetch-bench-") as work:
        command = [sys.executable, "-c", _NODE, mode, url, "s", work, str(model), str(ROOT / "tests")]
        env = {**os.environ, "DATA_SOURCE_TOKEN": APIKEY}  # as the node's environment gives it
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
        if done.returncode:
            raise RuntimeError(f"{mode} run failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", default="10,40", help="object counts, comma-separated")
    parser.add_argument("--object-mb", default="10,40", help="MiB of filler per object, comma-separated")
    parser.add_argument("--smoke", action="store_true", help="1 and 2 objects of 1 MiB")
    parser.add_argument(
        "--modes",
        default="stream,sdk",
        help="stream, sdk, starmodel (the SDK's own StarModel: needs the FLAME SDK installed)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-fetch")
    args = parser.parse_args()
    counts = [1, 2] if args.smoke else [int(n) for n in args.objects.split(",")]
    fillers = [1] if args.smoke else [int(n) for n in args.object_mb.split(",")]
    model = packaged_demo_model()
    rng = np.random.default_rng(0)
    runs = []
    for count in counts:
        for filler_mb in fillers:
            objects = _objects(count, filler_mb, rng)
            size = sum(len(b) for b in objects.values())
            with s3_node(["s"]) as node:
                for key, body in objects.items():
                    node.put("s", key, body)
                del objects
                for mode in args.modes.split(","):
                    measured = _run(mode, node.gateway.url, model)
                    runs.append({"mode": mode, "objects": count, "request_bytes": size, **measured})
                    print(json.dumps(runs[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d"),
    }
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "runs": runs}, indent=2) + "\n")
    lines = [
        "| inputs | objects | request | peak RSS | wall | cases done |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        lines.append(
            f"| {run['mode']} | {run['objects']} | {run['request_bytes'] / 1e9:.2f} GB "
            f"| {run['peak_rss_bytes'] / 2**20:.0f} MiB | {run['wall_s']:.1f} s | {run['cases_done']} |"
        )
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

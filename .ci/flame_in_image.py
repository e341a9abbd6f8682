"""Inside the image (.ci/image mounts this file and tests/flame_harness.py read-only): one FLAME
analysis, two analyzer nodes and the ZIP aggregator, over the demo's archives handed out in memory
as the SDK's test mode does, on the image's packaged tiny model and its Python.

With the FLAME SDK in the image: the SDK's own ``StarModelTester``. Without it (CI builds the image
without the SDK: GitHub is out of its reach): asyncflow's mirror of that harness. Prints the
bundle's totals; exits 0 when every case of every node is done.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from asyncflow.cli.demo import write_demo_inputs
from asyncflow.flame import FLAME_SDK
from asyncflow.flame.analysis import ZipAggregator, nnUNetAnalyzer
from asyncflow.flame.bundle import MANIFEST
from asyncflow.settings import packaged_demo_model


def _with_the_sdk(splits: list[list[dict[str, bytes]]], kwargs: dict[str, Any]) -> bytes:
    from flame.star.star_model_tester import StarModelTester
    from flame.utils.mock_flame_core import MockFlameCoreSDK

    submitted: list[bytes] = []  # the tester keeps whichever node's result ends first
    submit = MockFlameCoreSDK.submit_final_result

    def record(self: Any, result: Any, *args: Any, **more: Any) -> Any:
        submitted.append(result)
        return submit(self, result, *args, **more)

    MockFlameCoreSDK.submit_final_result = record  # type: ignore[method-assign]
    StarModelTester(
        data_splits=splits,
        analyzer=nnUNetAnalyzer,
        aggregator=ZipAggregator,
        data_type="s3",
        query=[],
        output_type="bytes",
        analyzer_kwargs=kwargs,
    )
    return submitted[0]


def _with_the_mirror(splits: list[list[dict[str, bytes]]], kwargs: dict[str, Any]) -> bytes:
    sys.path.insert(0, str(Path(__file__).parent))
    from flame_harness import run_star

    return run_star(
        nnUNetAnalyzer, ZipAggregator, splits, output_type="bytes", analyzer_kwargs=kwargs
    ).final_result


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="flame-check-"))
    demo = write_demo_inputs(work / "inputs")
    objects = [{path.name: path.read_bytes()} for path in demo.paths]
    splits = [objects[:2], objects[2:]]  # two nodes: the two CT archives, the NIfTI
    kwargs = {"model_dir": str(packaged_demo_model()), "work_dir": str(work), "device": "cpu"}
    harness = "the FLAME SDK's StarModelTester" if FLAME_SDK else "asyncflow's mirror of the SDK's harness"
    bundle = (_with_the_sdk if FLAME_SDK else _with_the_mirror)(splits, kwargs)
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(bundle)).read(MANIFEST))
    totals = manifest["totals"]
    print(f"FLAME analysis with {harness}: {json.dumps(totals)}")
    return 0 if totals["nodes"] == 2 and totals["cases"] == totals["cases_done"] == 4 else 1


if __name__ == "__main__":
    sys.exit(main())

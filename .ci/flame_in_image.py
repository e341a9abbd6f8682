"""Inside the image (.ci/image mounts this file and tests/flame_harness.py read-only): one FLAME
analysis, two analyzer nodes and the ZIP aggregator, over the demo's archives handed out in memory
as the SDK's test mode does, on the image's packaged tiny model and its Python.

With the FLAME SDK in the image: the SDK's own ``StarModelTester``. Without it (CI builds the image
without the SDK: GitHub is out of its reach): asyncflow's mirror of that harness. Prints the
bundle's totals; exits 0 when every case of every node is done.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from asyncflow.cli.demo import write_demo_inputs
from asyncflow.flame import FLAME_SDK
from asyncflow.settings import packaged_demo_model

sys.path.insert(0, str(Path(__file__).parent))  # flame_harness.py, mounted beside this file
from flame_harness import bundle_outputs, star_bundle


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="flame-check-"))
    demo = write_demo_inputs(work / "inputs")
    objects = [{path.name: path.read_bytes()} for path in demo.paths]
    splits = [objects[:2], objects[2:]]  # two nodes: the two CT archives, the NIfTI
    kwargs = {"model_dir": str(packaged_demo_model()), "work_dir": str(work), "device": "cpu"}
    harness = "the FLAME SDK's StarModelTester" if FLAME_SDK else "asyncflow's mirror of the SDK's harness"
    manifest, _ = bundle_outputs(star_bundle(splits, kwargs, sdk=FLAME_SDK))
    totals = manifest["totals"]
    print(f"FLAME analysis with {harness}: {json.dumps(totals)}")
    return 0 if totals["nodes"] == 2 and totals["cases"] == totals["cases_done"] == 4 else 1


if __name__ == "__main__":
    sys.exit(main())

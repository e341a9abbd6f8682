"""nnU-Net's modules are imported whole, by one thread, before the stages' threads use them.

Threads that import overlapping parts of torch and nnunetv2 at once can be handed each other's
partly initialised modules. CI saw it with two FLAME nodes in one process: one failed with
"No module named 'sympy'" (torch._dynamo, imported by the predictor), the other with "cannot
import name 'nnUNetPredictor'". The steps, which every prepare and export thread uses, are built
before those threads start; building them imports all of it.
"""

from __future__ import annotations

import subprocess
import sys

from asyncflow.settings import packaged_demo_model


def test_building_the_steps_imports_the_predictor_and_its_dependencies_in_a_fresh_process() -> None:
    script = f"""
import sys
from pathlib import Path
from asyncflow.backends.base import ModelInfo
from asyncflow.backends.nnunet_v2 import NnUNetV2Steps
NnUNetV2Steps(ModelInfo.from_folder(Path({str(packaged_demo_model())!r})))
wanted = ["torch._dynamo", "sympy", "nnunetv2.inference.predict_from_raw_data", "cycler",
          "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
          "nnunetv2.preprocessing.normalization.map_channel_name_to_normalization",
          "nnunetv2.postprocessing.remove_connected_components"]
print([name for name in wanted if name not in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr

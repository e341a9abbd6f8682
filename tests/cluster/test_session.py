"""What a request on a cluster needs, refused early with the reason (no cluster started here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from asyncflow.cluster.session import _reaches, connect
from asyncflow.errors import ClusterError, SettingsError


def test_without_ray_installed_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ClusterError, match=r"pip install 'asyncflow\[cluster\]'"):
        connect("auto")


def test_a_node_check_names_the_folder_it_does_not_reach(tmp_path: Path) -> None:
    marker = tmp_path / "work" / "asyncflow-cluster-x"
    model = tmp_path / "model"
    assert _reaches([str(model)], str(marker)) == f"the work folder ({tmp_path / 'work'})"
    marker.parent.mkdir()
    marker.write_text("x")
    assert _reaches([str(model)], str(marker)) == f"the model folder(s) {model}"
    model.mkdir()
    assert _reaches([str(model)], str(marker)) is None


def test_flame_refuses_a_cluster() -> None:
    from asyncflow.flame.analysis import _input_options

    with pytest.raises(SettingsError, match="cluster is not available in FLAME: a node is one container"):
        _input_options({"cluster": "auto"})

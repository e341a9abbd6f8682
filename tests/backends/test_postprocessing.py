"""nnU-Net's postprocessing files are read safely and applied as nnU-Net applies them."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import save_pickle
from nnunetv2.postprocessing.remove_connected_components import (
    apply_postprocessing,
    remove_all_but_largest_component_from_segmentation,
)

from asyncflow.backends.postprocessing import read_postprocessing
from asyncflow.errors import ModelError

KWARGS = [{"labels_or_regions": [1, 2]}, {"labels_or_regions": np.int64(2)}]


def _labels() -> np.ndarray:
    labels = np.zeros((12, 16, 16), dtype=np.uint8)
    labels[1:6, 2:10, 2:10] = 1  # the liver
    labels[3:5, 4:7, 4:7] = 2  # a tumour inside it
    labels[9:11, 12:14, 12:14] = 1  # a stray island of liver
    labels[8, 1, 14] = 2  # and of tumour
    return labels


def _pickle(folder: Path) -> Path:
    """A postprocessing.pkl as nnU-Net's determine_postprocessing saves it (no JSON beside it)."""
    path = folder / "postprocessing.pkl"
    functions = [remove_all_but_largest_component_from_segmentation] * 2
    save_pickle((functions, KWARGS), str(path))
    return path


def test_the_pickle_and_the_json_give_nnunets_own_result(tmp_path: Path) -> None:
    from_pickle = read_postprocessing(_pickle(tmp_path))
    labels = _labels()
    expected = apply_postprocessing(labels, [remove_all_but_largest_component_from_segmentation] * 2, KWARGS)
    assert (expected != labels).sum() == 9  # both islands go
    np.testing.assert_array_equal(from_pickle.apply(labels), expected)
    np.testing.assert_array_equal(labels, _labels())  # the input is left as it was

    names = ["remove_all_but_largest_component_from_segmentation"] * 2
    (tmp_path / "postprocessing.json").write_text(
        json.dumps(
            {
                "postprocessing_fns": names,
                "postprocessing_kwargs": [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 2}],
            }
        )
    )
    from_json = read_postprocessing(tmp_path / "postprocessing.pkl")  # the JSON beside it is read
    assert from_json.source.name == "postprocessing.json"
    assert from_json.steps == from_pickle.steps
    assert "labels_or_regions=[1,2]" in from_json.description


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (pickle.dumps(([print], [{}])), "neither plain data nor nnU-Net's postprocessing"),
        (
            pickle.dumps(([remove_all_but_largest_component_from_segmentation], [{"open": 1}])),
            "arguments it does not take",
        ),
        (b"not a pickle", "is not nnU-Net v2's postprocessing"),
    ],
)
def test_a_file_that_is_not_nnunets_postprocessing_is_refused(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "postprocessing.pkl"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=reason):
        read_postprocessing(path)


def test_a_json_naming_another_function_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "postprocessing.json"
    path.write_text(json.dumps({"postprocessing_fns": ["fill_holes"], "postprocessing_kwargs": [{}]}))
    with pytest.raises(ModelError, match="names postprocessing 'fill_holes'"):
        read_postprocessing(path)
    with pytest.raises(ModelError, match="no postprocessing file"):
        read_postprocessing(tmp_path / "missing.json")

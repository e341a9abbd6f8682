"""nnU-Net v2's postprocessing, read safely and applied as ``nnUNetv2_apply_postprocessing`` does.

``nnUNetv2_find_best_configuration`` chooses, by cross-validation, which steps improve the
Dice (keep only the largest connected component, of all foreground and/or of single
labels) and writes them twice beside the chosen model's cross-validation results:
``postprocessing.json`` (the functions' names and their arguments) and ``postprocessing.pkl``
(a pickle of the functions and arguments). The JSON is read where it exists. The pickle is
read by an unpickler that builds plain data and nnU-Net's own postprocessing function by name,
and nothing else: a pickle naming any other function is refused (unpickling it unrestricted
could run any code). The steps run on the label map in the source grid, as
``nnUNetv2_apply_postprocessing`` runs them on the segmentation file.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asyncflow.errors import ModelError

__all__ = ["Postprocessing", "read_postprocessing"]

# nnU-Net v2's postprocessing functions by module and name (it has one).
_MODULE = "nnunetv2.postprocessing.remove_connected_components"
_FUNCTIONS = frozenset({"remove_all_but_largest_component_from_segmentation"})
_ARGUMENTS = frozenset({"labels_or_regions", "background_label"})


@dataclass(frozen=True)
class Postprocessing:
    """Steps ``(function name, keyword arguments)`` applied in order; ``source``: the file read."""

    steps: tuple[tuple[str, dict[str, Any]], ...]
    source: Path

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """The label map after every step (a new array; ``labels`` is left as it is)."""
        from nnunetv2.postprocessing import remove_connected_components

        for name, kwargs in self.steps:
            function: Callable[..., np.ndarray] = getattr(remove_connected_components, name)
            labels = function(labels, **kwargs)
        return labels

    @property
    def description(self) -> str:
        """The steps in words, for the report and the SEG's AlgorithmParameters."""
        if not self.steps:
            return "none"
        return "; ".join(f"{name}({_arguments(kwargs)})" for name, kwargs in self.steps)

    def memory_bytes(self, voxels: int) -> int:
        """At most what the steps hold beside the label map: a copy of it, two masks and the
        connected components' labels (int32), per voxel."""
        return 0 if not self.steps else 15 * voxels


def read_postprocessing(path: Path) -> Postprocessing:
    """The steps in ``postprocessing.json`` or ``postprocessing.pkl`` (a ``.pkl`` whose ``.json``
    lies beside it is read from the JSON), or a ModelError saying why they cannot be used."""
    json_file = path if path.suffix == ".json" else path.with_suffix(".json")
    try:
        if json_file.is_file():
            raw = json.loads(json_file.read_text())
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            names, kwargs = raw["postprocessing_fns"], raw["postprocessing_kwargs"]
            source = json_file
        else:
            with path.open("rb") as f:
                loaded = _PostprocessingUnpickler(f).load()
            functions, kwargs = loaded
            names = [getattr(fn, "__name__", str(fn)) for fn in functions]
            source = path
    except FileNotFoundError:
        raise ModelError(f"no postprocessing file at {path}") from None
    except (OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError, EOFError) as exc:
        raise ModelError(
            f"{path} is not nnU-Net v2's postprocessing (postprocessing.json or .pkl as "
            f"nnUNetv2_find_best_configuration writes it): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(names, list) or not isinstance(kwargs, list) or len(names) != len(kwargs):
        raise ModelError(f"{source}: the postprocessing functions and their arguments do not pair up")
    steps = []
    for name, arguments in zip(names, kwargs, strict=True):
        if name not in _FUNCTIONS:
            raise ModelError(
                f"{source} names postprocessing {name!r}; asyncflow runs only nnU-Net's own "
                f"({', '.join(sorted(_FUNCTIONS))})"
            )
        if not isinstance(arguments, dict) or not set(arguments) <= _ARGUMENTS:
            raise ModelError(f"{source}: {name} is given arguments it does not take: {arguments!r}")
        steps.append((str(name), {k: _plain(v) for k, v in arguments.items()}))
    return Postprocessing(tuple(steps), source)


class _PostprocessingUnpickler(pickle.Unpickler):
    """What ``postprocessing.pkl`` holds: nnU-Net's own postprocessing function (by name: the
    module is imported, nothing in the file runs) and plain data; any other global is refused."""

    _PLAIN = frozenset(
        {
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if module == _MODULE and name in _FUNCTIONS:
            return super().find_class(module, name)
        if (module, name) in self._PLAIN:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}, which is neither plain data nor nnU-Net's postprocessing"
        )


def _plain(value: Any) -> Any:
    """Arguments as nnU-Net passes them: labels as ints, a region (a list in JSON) as a tuple."""
    if isinstance(value, list | tuple):
        return [_region(v) for v in value] if isinstance(value, list) else _region(value)
    return int(value) if isinstance(value, np.integer | int) else value


def _region(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return int(value)


def _arguments(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}".replace(" ", "") for k, v in sorted(kwargs.items()))

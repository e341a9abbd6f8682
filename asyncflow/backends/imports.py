"""nnU-Net's modules imported before the threads that use them start, by one thread at a time."""

from __future__ import annotations

import importlib
import threading

__all__ = ["import_nnunet"]

_IMPORT_LOCK = threading.Lock()
_IMPORTED_AS_IT_RUNS = (
    "nnunetv2.inference.predict_from_raw_data",
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    "dynamic_network_architectures.architectures.unet",
    "nnunetv2.preprocessing.normalization.map_channel_name_to_normalization",
    "nnunetv2.postprocessing.remove_connected_components",
)


def import_nnunet() -> None:
    """Import what nnU-Net's inference imports as it runs, one thread at a time, before any thread
    uses a part of it: the predictor (torch, torch._dynamo, sympy), the trainer class a model
    loads (matplotlib, scipy, scikit-learn, scikit-image), the networks its plans name, the
    normalisation schemes its preprocessing finds by name, its postprocessing.

    Threads that import overlapping parts of these packages at once (one loading the model,
    another preprocessing a case) can be handed each other's partly initialised modules: CPython
    breaks an import cycle between threads that way. CI saw it with two FLAME nodes in one
    process ("No module named 'sympy'" in one, "cannot import name 'nnUNetPredictor'" in the
    other), and a plain request did ("No module named 'cycler'", as its model loaded while its
    first cases were preprocessed).
    """
    with _IMPORT_LOCK:
        for module in _IMPORTED_AS_IT_RUNS:
            importlib.import_module(module)

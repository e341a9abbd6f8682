"""What names a case and a model, so that a finished case is known again.

A case is named by its *key* (:func:`case_key`): its kind, its place (series UID
and part, or its input and path), the sha256 of every source file (taken as the
bytes were unpacked) and of a label file supplied with it. A model and everything
that changes a result is named by the *model key* (:func:`model_key`): the model
folder, configuration, trainer, plans, folds, the sha256 of the checkpoints and of
the folder's plans and dataset files (of every configuration of an ensemble, of both
stages of a cascade), the postprocessing, and the settings that change what a case's outputs hold. The journal (:mod:`asyncflow.pipeline.journal`) resumes a case whose
two keys match; the SEG's UIDs derive from them (:attr:`asyncflow.writing.base.OutputOptions.uid_seed`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asyncflow.backends.base import ModelInfo
from asyncflow.backends.plan import ModelPlan
from asyncflow.case import Case
from asyncflow.digests import sha256_file
from asyncflow.enums import Resampling
from asyncflow.settings import Settings

__all__ = ["RESULT_SETTINGS", "case_key", "model_key", "model_parameters", "model_provenance"]

# Settings that change what a case's outputs hold (the model's identity covers the rest).
RESULT_SETTINGS = (
    "use_mirroring",
    "tile_step_size",
    "multi_modal",
    "seg_type",
    "seg_keep_empty_frames",
    "seg_compression",
    "deidentify",
    "opaque_names",
)


def case_key(case: Case, hashes: Mapping[Path, str]) -> str | None:
    """The case's key, or None when a source file's content hash is unknown."""
    try:
        contents = sorted(hashes[path] for path in case.files)
        # From the hashes, not the file: a label file shared by an input's cases may be gone by
        # now (deleted when another of them was found finished).
        label_file = hashes[case.label_file] if case.label_file is not None else None
    except KeyError:
        return None
    source = case.source
    place = (
        [source.series_instance_uid, source.part]
        if source and source.series_instance_uid
        else [case.origin.name, source.location if source else case.output_name]
    )
    text = json.dumps([str(case.kind), place, contents, label_file, case.output_name])
    return hashlib.sha256(text.encode()).hexdigest()


_checkpoint_hashes: dict[tuple[str, int, int], str] = {}
_checkpoint_lock = threading.Lock()


def _checkpoint_sha256(path: Path) -> str:
    """A checkpoint's sha256, read once per process while its size and mtime stay the same."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _checkpoint_lock:
        if key not in _checkpoint_hashes:
            _checkpoint_hashes[key] = sha256_file(path)
        return _checkpoint_hashes[key]


def _model_identity(info: ModelInfo) -> dict[str, Any]:
    """One model folder's identity: where it is, its plans and dataset files, its folds'
    checkpoints by sha256."""
    checkpoints = {}
    for fold in info.folds:
        folder = info.folder / f"fold_{fold}"
        for path in sorted(folder.glob(f"{info.checkpoint}*")) if folder.is_dir() else []:
            checkpoints[f"fold_{fold}/{path.name}"] = _checkpoint_sha256(path)
    # plans.json and dataset.json (v2), plans.pkl (v1): spacing, normalisation, labels
    plans = {path.name: sha256_file(path) for path in sorted(info.folder.glob("*.json"))}
    plans |= {path.name: sha256_file(path) for path in sorted(info.folder.glob("*.pkl"))}
    return {
        "folder": str(info.folder.resolve()) if info.folder.exists() else str(info.folder),
        "plans": plans,
        "model": [info.name, info.configuration, info.trainer, info.plans, info.generation],
        "folds": [str(f) for f in info.folds],
        "checkpoints": checkpoints,
    }


def _plan_identity(plan: ModelPlan) -> dict[str, Any]:
    """A plan's model: its folder's identity, and (only when there are, so that the keys of one
    configuration stay) the ensemble's other configurations, the cascades' first stages, the
    postprocessing, and several models' plans and how they are merged."""
    identity = _model_identity(plan.model)
    if len(plan.members) > 1:
        identity["ensemble"] = [_model_identity(m) for m in plan.members[1:]]
    if plan.previous:  # each cascade's first stage, by configuration
        identity["previous_stage"] = [_model_identity(p) if p else None for p in plan.previous]
    if plan.postprocessing is not None:
        identity["postprocessing"] = plan.postprocessing.description
    if plan.models:
        identity["models"] = [_plan_identity(p) for p in plan.models]
        identity["merge"] = plan.merge is not None
    return identity


def model_key(plan: ModelPlan | ModelInfo, settings: Settings) -> str:
    """The model's identity (every configuration of an ensemble, in order, a cascade's first
    stage, the postprocessing, several models) and every setting that changes a result, as one
    hex digest."""
    plan = plan if isinstance(plan, ModelPlan) else ModelPlan(plan, ())
    label_config = sha256_file(settings.label_config) if settings.label_config else None
    identity = {
        **_plan_identity(plan),
        "settings": {name: _plain(getattr(settings, name)) for name in RESULT_SETTINGS},
        "label_config": label_config,
    }
    if settings.resampling is not Resampling.MODEL:  # absent for the default: keys made before stay
        identity["resampling"] = str(settings.resampling)
    if settings.outputs:  # optional outputs beside each SEG: absent when none is asked for
        identity["outputs"] = list(settings.outputs)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def model_parameters(plan: ModelPlan, settings: Settings) -> dict[str, str]:
    """How the model was trained and is run: the SEG's AlgorithmParameters."""
    return {**plan.parameters, "resampling": str(settings.resampling)}


def model_provenance(plan: ModelPlan, settings: Settings, key: str) -> dict[str, Any]:
    """The report's ``model``: what produced the request's outputs, and its model ``key``."""
    info = plan.model
    return {
        "name": plan.name,
        "framework": info.framework,
        "parameters": model_parameters(plan, settings),
        "key": key,
    }


def _plain(value: Any) -> Any:
    return value if isinstance(value, bool | int | float | str | type(None)) else str(value)

"""The backend interface and the model facts every stage can read without torch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..labels import SegmentLabel, labels_from_dataset_json

__all__ = ["Backend", "ModelError", "ModelInfo"]


class ModelError(RuntimeError):
    """The model folder is unusable: missing files, no folds, or it failed to load."""


@dataclass(frozen=True)
class ModelInfo:
    """What a trained model folder declares, read from its JSON files alone."""

    folder: Path
    name: str  # the dataset name the model was trained on
    configuration: str
    trainer: str
    plans: str
    folds: tuple[int | str, ...]
    checkpoint: str
    num_channels: int
    labels: dict[int, SegmentLabel]
    framework: str  # e.g. "nnunetv2 2.8.1"

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        *,
        folds: Sequence[int | str] | None = None,
        checkpoint: str = "checkpoint_final.pth",
    ) -> ModelInfo:
        try:
            dataset = json.loads((folder / "dataset.json").read_text())
            plans = json.loads((folder / "plans.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"model folder {folder} has no readable dataset.json/plans.json: {exc}") from exc
        if folds is None:
            found = sorted(
                p.name.removeprefix("fold_") for p in folder.glob("fold_*") if (p / checkpoint).is_file()
            )
            folds = [int(f) if f.isdigit() else f for f in found]
        missing = [f for f in folds if not (folder / f"fold_{f}" / checkpoint).is_file()]
        if not folds or missing:
            raise ModelError(f"model folder {folder} has no {checkpoint} for fold(s) {missing or 'any'}")
        channels = dataset.get("channel_names") or dataset.get("modality") or {}
        # <trainer>__<plans>__<configuration> is nnU-Net's folder naming; fall back to the plans.
        parts = folder.name.split("__")
        if len(parts) == 3:
            trainer, plans_name, configuration = parts
        else:
            configs = list(plans.get("configurations", {}))
            trainer = "nnUNetTrainer"
            plans_name = str(plans.get("plans_name", "nnUNetPlans"))
            configuration = configs[0] if len(configs) == 1 else "unknown"
        try:
            version = metadata.version("nnunetv2")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return cls(
            folder=folder,
            name=str(plans.get("dataset_name") or dataset.get("name") or folder.name),
            configuration=configuration,
            trainer=trainer,
            plans=plans_name,
            folds=tuple(folds),
            checkpoint=checkpoint,
            num_channels=len(channels),
            labels=labels_from_dataset_json(dataset),
            framework=f"nnunetv2 {version}",
        )

    @property
    def parameters(self) -> dict[str, str]:
        """How the model was trained and is run, for provenance (SEG AlgorithmParameters)."""
        return {
            "trainer": self.trainer,
            "plans": self.plans,
            "configuration": self.configuration,
            "folds": ",".join(str(f) for f in self.folds),
            "checkpoint": self.checkpoint,
        }


@runtime_checkable
class Backend(Protocol):
    """Predicts label maps, one case at a time, from nnU-Net input files.

    ``load`` is idempotent and may take long (it runs off the event loop once per
    process). ``predict`` returns a (z, y, x) integer label map in the geometry of
    ``channel_files[0]`` as SimpleITK reads it. Both are called from one worker
    thread at a time.
    """

    info: ModelInfo

    def load(self) -> None: ...

    def predict(self, channel_files: Sequence[Path]) -> np.ndarray: ...

"""A cascade of nnU-Net v2 configurations (``3d_lowres``, then ``3d_cascade_fullres`` reading its
segmentation), in one request, as ``nnUNetv2_predict -c 3d_lowres`` followed by
``nnUNetv2_predict -c 3d_cascade_fullres -prev_stage_predictions`` makes it:

- :class:`CascadeSteps` ``.preprocess`` (prepare stage): the first stage's preprocessing; the
  case's channels are kept for the second;
- :class:`CascadeBackend` ``.predict`` (the prediction worker): the first stage's network, whose
  output is a :class:`~asyncflow.backends.base.NextStage`;
- :meth:`PreviousStage.next_input` (CPU, in a worker thread, the device not held): the first
  stage's label map on the source grid as nnU-Net writes it (its resampling and argmax, on the
  reader's axes), then the second stage's preprocessing of the channels with that map beside
  them (cropped and resampled with them as the plans say, one-hot);
- :class:`CascadeBackend` ``.predict`` again: the second stage's network;
- :class:`CascadeSteps` ``.to_labels`` (export stage): its logits to the label map.

The label map between the stages is never written: ``-prev_stage_predictions`` writes it
(as the reader's integers) and reads it back as float32, which is what the second stage's
preprocessing is given here. Both stages run with the same folds (as the commands
``nnUNetv2_find_best_configuration`` prints do); the first stage is not postprocessed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

from asyncflow.backends.base import Composite, MemoryPhases, ModelInfo, abandonable
from asyncflow.backends.locate import MODEL_DEFAULTS
from asyncflow.backends.nnunet_v2 import CroppedLabels, Logits, ModelInput, NnUNetV2Backend, NnUNetV2Steps
from asyncflow.case import PreparedCase
from asyncflow.enums import Generation
from asyncflow.errors import ModelError

__all__ = ["CascadeBackend", "CascadeInput", "CascadeSteps", "PreviousStage", "previous_stage"]


def _previous_stage_name(info: ModelInfo) -> str | None:
    if info.generation is not Generation.V2:
        return "3d_lowres" if info.configuration == "3d_cascade_fullres" else None  # v1's names
    try:
        plans = json.loads((info.folder / "plans.json").read_text())
        name = plans["configurations"][info.configuration].get("previous_stage")
    except (OSError, ValueError, KeyError, AttributeError):
        return None  # the model's own reading says what is wrong with its plans
    return str(name) if name else None


def previous_stage(info: ModelInfo) -> ModelInfo | None:
    """The first stage of the cascade whose second stage ``info`` is (None for any other model):
    ``<trainer>__<plans>__<previous_stage>`` beside it in the dataset's results folder, with the
    same folds and checkpoint (v1: :func:`_v1_previous_stage`). A ModelError when it is not
    there or cannot run with it."""
    name = _previous_stage_name(info)
    if name is None:
        return None
    if info.generation is Generation.V1:
        return _checked(info, _v1_previous_stage(info))
    folder = info.folder.parent / f"{info.trainer}__{info.plans}__{name}"
    if not folder.is_dir():
        raise ModelError(
            f"{info.folder.name} is the second stage of a cascade: it reads the segmentation of "
            f"{name}, which asyncflow runs first from {folder.name} beside it, but that folder is not "
            f"in {info.folder.parent} (nnUNetv2_predict -c {name} makes it; copy that model there)"
        )
    return _checked(info, ModelInfo.from_folder(folder, folds=info.folds, checkpoint=info.checkpoint))


def _v1_previous_stage(info: ModelInfo) -> ModelInfo:
    """A v1 cascade's first stage, where ``nnUNet_predict -m 3d_cascade_fullres`` runs it from:
    ``RESULTS_FOLDER/nnUNet/3d_lowres/<task>/<trainer>__<plans>`` (the trainer it is given with
    ``-tr``: the one folder of these plans there, or v1's stock ``nnUNetTrainerV2`` among
    several), with the cascade's folds and v1's stock checkpoint, whatever ``-chk`` says."""
    defaults = MODEL_DEFAULTS[Generation.V1]
    task = info.folder.parents[2] / "3d_lowres" / info.folder.parent.name
    found = sorted(task.glob(f"*__{info.plans}")) if task.is_dir() else []
    stock = task / f"{defaults['trainer']}__{info.plans}"
    if len(found) > 1 and stock not in found:
        raise ModelError(
            f"{info.folder.name} is the second stage of a v1 cascade and {task} holds several "
            f"first stages ({', '.join(f.name for f in found)}): keep the one it was trained after"
        )
    if not found:
        raise ModelError(
            f"{info.folder.name} is the second stage of a v1 cascade: nnUNet_predict runs 3d_lowres "
            f"first from {task}/<trainer>__{info.plans}, which is not there (copy that model there)"
        )
    folder = found[0] if len(found) == 1 else stock
    return ModelInfo.from_v1_folder(folder, folds=info.folds, checkpoint=defaults["checkpoint"])


def _checked(info: ModelInfo, previous: ModelInfo) -> ModelInfo:
    folder = previous.folder
    if _previous_stage_name(previous):
        raise ModelError(
            f"{folder.name} is itself a cascade's second stage: nnU-Net cascades have two stages"
        )
    # by value: a v1 stage without a dataset.json of its own names its labels by value
    if set(previous.labels) != set(info.labels) or previous.num_channels != info.num_channels:
        raise ModelError(
            f"the cascade's stages differ in their labels or input channels: {folder.name} and {info.folder.name}"
        )
    return previous


@dataclass
class CascadeInput:
    """A case preprocessed for one stage: ``stage`` 1 (its channels kept for stage 2) or 2."""

    model_input: ModelInput
    images: list[sitk.Image]
    stage: int

    @property
    def nbytes(self) -> int:
        return self.model_input.nbytes


@dataclass
class PreviousStage:
    """The first stage's output for a case; ``next_input`` makes the second stage's input (and
    lets the output go once its label map is made)."""

    output: Logits | CroppedLabels | None
    images: list[sitk.Image]
    steps: CascadeSteps
    network_s: float

    @property
    def nbytes(self) -> int:
        return self.output.nbytes if self.output is not None else 0

    def next_input(self, prepared: PreparedCase) -> CascadeInput:
        return self.steps.second_input(prepared, self)


class CascadeSteps:
    """The cascade's CPU work: each stage's :class:`NnUNetV2Steps`, and the map between them."""

    def __init__(self, first: NnUNetV2Steps, second: NnUNetV2Steps) -> None:
        self.first, self.second = first, second

    def memory_bytes(self, prepared: PreparedCase) -> int:
        return self.memory_phases(prepared).peak

    def memory_phases(self, prepared: PreparedCase) -> MemoryPhases:
        """The second stage's phases, its preprocessing phase also covering the whole first stage
        (whose arrays are let go once its label map is made, which the second's preprocessing
        counts), and the channels kept between the stages."""
        first, second = self.first.memory_phases(prepared), self.second.memory_phases(prepared)
        kept = sum(i.GetNumberOfPixels() * i.GetSizeOfPixelComponent() for i in prepared.images)
        before = max(first.peak - first.base, second.preprocess)
        return replace(second, base=second.base + kept, preprocess=before)

    def preprocess(self, prepared: PreparedCase) -> CascadeInput:
        return CascadeInput(self.first.preprocess(prepared), list(prepared.images), 1)

    def second_input(self, prepared: PreparedCase, previous: PreviousStage) -> CascadeInput:
        """The first stage's label map on the source grid, on the reader's axes (what nnU-Net
        writes and reads back, as float32), preprocessed with the channels for the second stage."""
        from asyncflow.backends.resampling import uncropped

        first, output = self.first, previous.output
        assert output is not None, "the first stage's output was used already"
        previous.output = None  # its logits go with this step's reference
        cropped = (
            output.array
            if isinstance(output, CroppedLabels)
            else first.cropped_labels(output.array, output.properties)
        )
        labels = uncropped(cropped, first.plans_manager, first.label_manager, output.properties)
        del cropped, output
        segmentation = labels[None].astype(np.float32)
        del labels
        model_input = self.second.preprocess(replace(prepared, images=previous.images), segmentation)
        return CascadeInput(model_input, [], 2)

    def to_labels(self, prepared: PreparedCase, output: Logits | CroppedLabels) -> np.ndarray:
        return self.second.to_labels(prepared, output)


class CascadeBackend(Composite):
    """Both stages' :class:`NnUNetV2Backend` on one device, each loaded once; ``predict`` runs the
    network of the stage a case is at."""

    max_batch = 1
    needs_files = False

    def __init__(self, first: NnUNetV2Backend, second: NnUNetV2Backend) -> None:
        self.stages = (first, second)
        self.info = second.info
        self.steps = CascadeSteps(first.steps, second.steps)
        self.device = second.device

    @property
    def parts(self) -> Sequence[NnUNetV2Backend]:
        return self.stages

    async def predict(self, cases: Sequence[PreparedCase]) -> list[Any]:
        return [await abandonable(self.logits, case) for case in cases]

    def logits(self, prepared: PreparedCase) -> PreviousStage | Logits | CroppedLabels:
        """The network of the case's stage (blocking: call it from a worker thread)."""
        return self.stage(prepared.model_input)

    def stage(self, staged: Any) -> PreviousStage | Logits | CroppedLabels:
        """The network of the stage ``staged`` is at (see :meth:`logits`)."""
        if not isinstance(staged, CascadeInput):
            raise TypeError("predict() needs the case as CascadeSteps.preprocess() left it")
        output = self.stages[staged.stage - 1].network(staged.model_input)
        if staged.stage == 1:
            return PreviousStage(output, staged.images, self.steps, output.network_s)
        return output

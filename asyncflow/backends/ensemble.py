"""An ensemble of nnU-Net v2 configurations (e.g. ``2d`` + ``3d_fullres``), as ``nnUNetv2_ensemble``
averages them, split where the hardware changes like one configuration is:

- :class:`EnsembleSteps` ``.preprocess`` (prepare stage): each configuration's own preprocessing
  (each its own spacing and normalisation), in the order the ensemble names them;
- :class:`EnsembleBackend` ``.predict`` (the prediction worker): each configuration's network
  (each loaded once per worker), one after another in one hold;
- :class:`EnsembleSteps` ``.to_labels`` (export stage): each configuration's logits to
  probabilities on the source grid (:func:`~asyncflow.backends.resampling.cropped_probabilities`,
  one class at a time, then the softmax), summed in float32 in the ensemble's order, divided by
  their number, and their argmax; each configuration's logits are let go once summed.

A configuration may be a cascade (:mod:`asyncflow.backends.cascade`): the first hold runs the
other configurations' networks and the cascade's first stage, and answers with a
:class:`EnsembleNextStage` (its next input: the cascade's second-stage input, the other
configurations' logits kept as they are); the second hold runs the cascade's second network.

This is ``nnUNetv2_predict --save_probabilities`` per configuration (with
``-prev_stage_predictions`` for a cascade) then ``nnUNetv2_ensemble``, voxel for voxel,
without the probabilities written to disk and read back. The probabilities
are averaged on the region cropped to the image's non-zero box (every configuration crops the
same box): outside it every configuration says background with probability 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncflow.backends.base import Composite, ModelInfo, abandonable
from asyncflow.backends.cascade import CascadeBackend, CascadeInput, CascadeSteps, PreviousStage
from asyncflow.backends.nnunet_v2 import Logits, ModelInput, NnUNetV2Backend, NnUNetV2Steps
from asyncflow.case import PreparedCase
from asyncflow.enums import Generation, Resampling
from asyncflow.errors import ModelError

__all__ = [
    "EnsembleBackend",
    "EnsembleInput",
    "EnsembleLogits",
    "EnsembleNextStage",
    "EnsembleSteps",
    "check_members",
]

Member = NnUNetV2Backend | CascadeBackend
MemberSteps = NnUNetV2Steps | CascadeSteps


@dataclass
class EnsembleInput:
    """A case preprocessed for each configuration, in the ensemble's order; between a cascade's
    stages, the other configurations' logits already made."""

    inputs: list[ModelInput | CascadeInput | Logits]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.inputs)

    @property
    def stage(self) -> int | None:
        """The stage of a cascade among the configurations (None without one)."""
        return next((i.stage for i in self.inputs if isinstance(i, CascadeInput)), None)


@dataclass
class EnsembleNextStage:
    """The first hold's outputs when a configuration is a cascade: its first stage's output, and
    the other configurations' logits. ``next_input``: the cascades' second-stage inputs beside
    those logits."""

    outputs: list[Logits | PreviousStage]
    network_s: float

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    def next_input(self, prepared: PreparedCase) -> EnsembleInput:
        return EnsembleInput(
            [o.next_input(prepared) if isinstance(o, PreviousStage) else o for o in self.outputs]
        )


@dataclass
class EnsembleLogits:
    """Each configuration's logits for one case, in the ensemble's order."""

    outputs: list[Logits]
    network_s: float  # all configurations' network calls

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


def check_members(members: Sequence[ModelInfo]) -> None:
    """An ensemble's configurations must be v2 models of one label set, channels and axis order:
    a ModelError naming what differs otherwise."""
    first = members[0]
    if any(m.generation is not Generation.V2 for m in members):
        raise ModelError(
            "an ensemble of configurations runs nnU-Net v2 models only; nnU-Net v1's nnUNet_ensemble "
            "is not supported: name one v1 model (nnUNet_predict applies its postprocessing.json itself)"
        )
    for member in members[1:]:
        what = (
            "labels"
            if member.labels != first.labels
            else "input channels"
            if member.num_channels != first.num_channels
            else None
        )
        if what:
            raise ModelError(
                f"the ensemble's configurations differ in their {what}: {first.folder} and {member.folder} "
                "(nnUNetv2_ensemble averages the probabilities of one label set)"
            )


def _last(steps: MemberSteps) -> NnUNetV2Steps:
    """The steps whose logits a configuration contributes (a cascade's second stage)."""
    return steps.second if isinstance(steps, CascadeSteps) else steps


class EnsembleSteps:
    """The ensemble's CPU work: every configuration's :class:`NnUNetV2Steps` (or a cascade's
    :class:`CascadeSteps`), in order."""

    def __init__(self, members: Sequence[MemberSteps]) -> None:
        self.members = list(members)
        self.last = [_last(m) for m in self.members]
        first = self.last[0]
        for steps in self.last[1:]:
            if list(steps.plans_manager.transpose_forward) != list(first.plans_manager.transpose_forward):
                raise ModelError(
                    "the ensemble's configurations have different axis orders (transpose_forward)"
                )
        if first.resampling is Resampling.TORCH_DEVICE:
            raise ModelError(
                "resampling torch-device turns one configuration's logits into labels on the device; "
                "an ensemble averages probabilities in the export workers: use --resampling torch"
            )

    def memory_bytes(self, prepared: PreparedCase) -> int:
        """The larger of two phases, over the channels: one configuration's preprocessing (or a
        cascade's step between its stages) while every configuration's model input and logits
        may be held; and the average's way back, every configuration's logits held until summed,
        one configuration's resampling at a time and, per source voxel and class, its resampled
        logits (float16), their float32 copy and softmax, and the sum."""
        phases = [m.memory_phases(prepared) for m in self.members]
        held = sum(p.model_input + p.logits for p in phases)
        logits = sum(p.logits for p in phases)
        resampling = max(p.to_labels - p.logits for p in phases)
        back = logits + resampling + 14 * phases[0].classes * phases[0].voxels
        return max(p.base for p in phases) + max(max(p.preprocess for p in phases) + held, back)

    def preprocess(self, prepared: PreparedCase) -> EnsembleInput:
        return EnsembleInput([m.preprocess(prepared) for m in self.members])

    def to_labels(self, prepared: PreparedCase, output: EnsembleLogits) -> np.ndarray:
        """The average of the configurations' probabilities, its argmax, on ``prepared.geometry``."""
        first = self.last[0]
        properties = output.outputs[0].properties
        total: np.ndarray | None = None
        for number, steps in enumerate(self.last):
            logits = output.outputs[number]
            box = logits.properties["bbox_used_for_cropping"]
            if [list(b) for b in box] != [list(b) for b in properties["bbox_used_for_cropping"]]:
                raise ValueError("the ensemble's configurations cropped the case differently")
            probabilities = steps.cropped_probabilities(logits.array, logits.properties)
            output.outputs[number] = Logits(None, logits.properties, logits.network_s)  # let go
            del logits
            if total is None:
                total = (
                    probabilities if probabilities.dtype == np.float32 else probabilities.astype(np.float32)
                )
            else:
                total += probabilities
            del probabilities
        assert total is not None
        total /= len(self.members)
        labels = np.asarray(first.label_manager.convert_probabilities_to_segmentation(total))
        del total
        return first.finish_labels(prepared, labels, properties)


class EnsembleBackend(Composite):
    """Each configuration's :class:`NnUNetV2Backend` (or :class:`CascadeBackend`) on one device,
    each loaded once; ``predict`` runs their networks one after another for each case."""

    max_batch = 1
    needs_files = False

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = list(members)
        self.info = self.members[0].info
        self.steps = EnsembleSteps([m.steps for m in self.members])
        self.device = self.members[0].device

    @property
    def parts(self) -> Sequence[Member]:
        return self.members

    async def predict(self, cases: Sequence[PreparedCase]) -> list[Any]:
        return [await abandonable(self.logits, case) for case in cases]

    def logits(self, prepared: PreparedCase) -> EnsembleLogits | EnsembleNextStage:
        """Every configuration's logits for a case, or with a cascade first its first stage's
        output beside the others' logits (blocking: call it from a worker thread)."""
        ensemble_input = prepared.model_input
        if not isinstance(ensemble_input, EnsembleInput):
            raise TypeError("predict() needs the case as EnsembleSteps.preprocess() left it")
        outputs: list[Logits | PreviousStage] = []
        network_s = 0.0
        for member, model_input in zip(self.members, ensemble_input.inputs, strict=True):
            if isinstance(model_input, Logits):  # made in the hold before the cascade's second stage
                outputs.append(model_input)
                continue
            if isinstance(member, CascadeBackend):
                output = member.stage(model_input)
            else:
                assert isinstance(model_input, ModelInput)
                output = member.network(model_input)
            assert isinstance(output, Logits | PreviousStage)
            network_s += output.network_s
            outputs.append(output)
        logits = [o for o in outputs if isinstance(o, Logits)]
        if len(logits) < len(outputs):
            return EnsembleNextStage(outputs, network_s)
        return EnsembleLogits(logits, network_s)

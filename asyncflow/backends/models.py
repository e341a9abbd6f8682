"""Several different models in one request (TotalSegmentator-style: a liver model and a kidney
model, any datasets): every case goes through every model, each model loaded once per worker.

- :class:`ModelsSteps` ``.preprocess`` (prepare stage): each model's own CPU preprocessing;
- :class:`ModelsBackend` ``.predict`` (the prediction worker): each model's backend, one after
  another in one hold; a model that runs again (a cascade) makes the whole answer a
  :class:`ModelsNextStage`, and the next hold runs only the models not done;
- :class:`ModelsSteps` ``.each_labels`` (export stage): each model's label map, in order, its
  postprocessing applied; ``.to_labels``: those merged by :class:`LabelMerge` into one.

Each model's answer is its own, as if it ran alone: the models share nothing but the case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from asyncflow.backends.base import Backend, Composite, ModelSteps, NetworkTimed, NextStage, nbytes
from asyncflow.case import PreparedCase
from asyncflow.labels.segment import SegmentLabel

__all__ = ["LabelMerge", "ModelsBackend", "ModelsInput", "ModelsNextStage", "ModelsOutput", "ModelsSteps"]

MERGE_RULE = "where models overlap, the later model's label wins"


@dataclass
class ModelsInput:
    """A case for each model, in order: its model input (``inputs``), or, between a cascade's
    stages, the model's output already made (``outputs``)."""

    inputs: list[Any]
    outputs: list[Any]

    @property
    def nbytes(self) -> int:
        return sum(nbytes(i) for i in self.inputs) + sum(nbytes(o) for o in self.outputs)

    @property
    def stage(self) -> int | None:
        """The stage of a cascade among the models (None without one)."""
        return next((i.stage for i in self.inputs if getattr(i, "stage", None) is not None), None)


@dataclass
class ModelsOutput:
    """Every model's output for one case, in order."""

    outputs: list[Any]
    network_s: float

    @property
    def nbytes(self) -> int:
        return sum(nbytes(o) for o in self.outputs)


@dataclass
class ModelsNextStage:
    """The models' outputs when one of them runs again: ``next_input`` holds those made and
    the next inputs of the others."""

    outputs: list[Any]
    network_s: float

    @property
    def nbytes(self) -> int:
        return sum(nbytes(o) for o in self.outputs)

    def next_input(self, prepared: PreparedCase) -> ModelsInput:
        again = [isinstance(o, NextStage) for o in self.outputs]
        return ModelsInput(
            [o.next_input(prepared) if a else None for o, a in zip(self.outputs, again, strict=True)],
            [None if a else o for o, a in zip(self.outputs, again, strict=True)],
        )


@dataclass(frozen=True)
class LabelMerge:
    """The models' label maps as one: each model's values after the previous models' (model k's
    value v becomes v + ``offsets[k]``), where models overlap the later model's label wins.
    ``labels``: the merged label definitions, each described with its model and that rule."""

    offsets: tuple[int, ...]
    labels: dict[int, SegmentLabel]

    @classmethod
    def of(cls, tags: Sequence[str], declared: Sequence[dict[int, SegmentLabel]]) -> LabelMerge:
        offsets, labels, offset = [], {}, 0
        names = [label.name for labels_k in declared for label in labels_k.values()]
        for tag, labels_k in zip(tags, declared, strict=True):
            offsets.append(offset)
            for value, label in sorted(labels_k.items()):
                name = label.name if names.count(label.name) == 1 else f"{label.name} ({tag})"
                description = f"{label.name} by {tag}; {MERGE_RULE}"
                labels[value + offset] = replace(
                    label, value=value + offset, name=name, description=description
                )
            offset += max(labels_k, default=0)
        return cls(tuple(offsets), labels)

    def apply(self, each: Sequence[np.ndarray]) -> np.ndarray:
        top = max(self.labels, default=0)
        merged = np.zeros(each[0].shape, dtype=np.uint8 if top < 256 else np.uint16)
        for offset, labels in zip(self.offsets, each, strict=True):
            found = labels > 0
            merged[found] = labels[found].astype(merged.dtype) + offset
        return merged


class ModelsSteps:
    """The models' CPU work, each model's steps in order."""

    def __init__(self, steps: Sequence[ModelSteps], merge: LabelMerge | None) -> None:
        self.steps, self.merge = list(steps), merge

    def memory_bytes(self, prepared: PreparedCase) -> int:
        """The label maps made one after another, kept until written, beside the largest of:
        each model's preprocessing (or a cascade's step between its stages) while every other
        model's input and logits may be held; every model's input and logits while predicted;
        each model's way back beside the logits of the models after it. Where a model's steps
        give no phases (an ensemble of configurations), every model's estimate added."""
        voxels = int(np.prod(prepared.images[0].GetSize()))
        labels = 2 * voxels * (len(self.steps) + 1)
        given = [getattr(s, "memory_phases", None) for s in self.steps]
        each = [phases(prepared) if phases else None for phases in given]
        if any(p is None for p in each):
            return sum(s.memory_bytes(prepared) for s in self.steps) + labels
        phases = [p for p in each if p is not None]
        held = [p.model_input + p.logits for p in phases]
        preprocess = max(p.preprocess + sum(held) - h for p, h in zip(phases, held, strict=True))
        back = max(p.to_labels + sum(q.logits for q in phases[i + 1 :]) for i, p in enumerate(phases))
        return max(p.base for p in phases) + max(preprocess, sum(held), back) + labels

    def preprocess(self, prepared: PreparedCase) -> ModelsInput:
        inputs = [s.preprocess(prepared) for s in self.steps]
        return ModelsInput(inputs, [None] * len(inputs))

    def each_labels(self, prepared: PreparedCase, output: ModelsOutput) -> list[np.ndarray]:
        """Each model's label map on ``prepared.geometry``; each output let go once mapped."""
        each = []
        for number, steps in enumerate(self.steps):
            answer, output.outputs[number] = output.outputs[number], None
            each.append(np.asarray(steps.to_labels(prepared, answer)))
            del answer
        return each

    def to_labels(self, prepared: PreparedCase, output: ModelsOutput) -> np.ndarray:
        """The models' label maps merged (:class:`LabelMerge`)."""
        if self.merge is None:
            raise ValueError("the models' outputs are written one by one: each_labels(), not to_labels()")
        return self.merge.apply(self.each_labels(prepared, output))


class ModelsBackend(Composite):
    """Each model's backend on one device, each loaded once; ``predict`` runs each model's for
    each case, one after another. ``plans``: the models' plans it was built from."""

    max_batch = 1

    def __init__(self, members: Sequence[Backend], steps: ModelsSteps, plans: Sequence[Any]) -> None:
        self.members = list(members)
        self.plans = list(plans)  # each model's ModelPlan (asyncflow.backends.plan)
        self.info = self.members[0].info
        self.steps = steps
        self.needs_files = any(m.needs_files for m in self.members)
        self.device = self.members[0].device

    @property
    def parts(self) -> Sequence[Backend]:
        return self.members

    async def predict(self, cases: Sequence[PreparedCase]) -> list[Any]:
        return [await self._case(case) for case in cases]

    async def _case(self, prepared: PreparedCase) -> ModelsOutput | ModelsNextStage:
        staged = prepared.model_input
        if not isinstance(staged, ModelsInput):
            raise TypeError("predict() needs the case as ModelsSteps.preprocess() left it")
        outputs, network_s = list(staged.outputs), 0.0
        for number, member in enumerate(self.members):
            if outputs[number] is not None:  # made in the hold before a cascade's second stage
                continue
            (answer,) = await member.predict([replace(prepared, model_input=staged.inputs[number])])
            if isinstance(answer, Exception):
                raise answer
            outputs[number] = answer
            network_s += answer.network_s if isinstance(answer, NetworkTimed) else 0.0
        if any(isinstance(o, NextStage) for o in outputs):
            return ModelsNextStage(outputs, network_s)
        return ModelsOutput(outputs, network_s)

"""Where a request's model is: a trained nnU-Net model folder, named directly or found under a
results folder by task, trainer, plans and configuration, and which nnU-Net generation it is.

:class:`ModelSource` is what the settings say about it (:meth:`asyncflow.settings.Settings.model_source`);
:meth:`ModelSource.locate` finds the folder, or says clearly how to name one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from asyncflow.enums import Generation, ModelGeneration
from asyncflow.errors import SettingsError

__all__ = ["MODEL_DEFAULTS", "ModelLocation", "ModelSource"]

# Stock names per nnU-Net generation, used where a setting is left unset.
MODEL_DEFAULTS: dict[Generation, dict[str, str]] = {
    Generation.V2: {"trainer": "nnUNetTrainer", "plans": "nnUNetPlans", "checkpoint": "checkpoint_final.pth"},
    Generation.V1: {
        "trainer": "nnUNetTrainerV2",
        "plans": "nnUNetPlansv2.1",
        "checkpoint": "model_final_checkpoint",
    },
}


class ModelLocation(NamedTuple):
    generation: Generation
    folder: Path  # v2: <task>/<trainer>__<plans>__<config>; v1: nnUNet/<config>/<task>/<trainer>__<plans>


@dataclass(frozen=True)
class ModelSource:
    """A model as the settings name it: ``folder`` itself, or ``task`` under ``results``
    (nnUNet_results, RESULTS_FOLDER) with ``trainer``, ``plans`` and ``configuration``;
    ``generation`` auto tells v2 and v1 apart by their files. ``folds`` None: every fold found;
    ``trainer``, ``plans``, ``checkpoint`` None: the generation's stock names."""

    generation: ModelGeneration = ModelGeneration.AUTO
    folder: Path | None = None
    results: Path | None = None
    task: str | None = None
    configuration: str = "3d_fullres"
    trainer: str | None = None
    plans: str | None = None
    checkpoint: str | None = None
    folds: tuple[int | str, ...] | None = None

    def option(self, name: str, generation: Generation) -> str:
        """``trainer``, ``plans`` or ``checkpoint``: as given, or the generation's stock name."""
        value = getattr(self, name)
        return str(value) if value is not None else MODEL_DEFAULTS[generation][name]

    def locate(self) -> ModelLocation:
        """The trained model folder and its nnU-Net generation, or a clear error saying how to name one."""
        wanted = (
            (Generation.V2, Generation.V1)
            if self.generation is ModelGeneration.AUTO
            else (Generation(self.generation),)
        )
        if self.folder is not None:
            candidates = [ModelLocation(g, self.folder) for g in wanted]
        elif self.results is not None and self.task:
            candidates = [ModelLocation(g, self._under_results(g)) for g in wanted]
        else:
            raise SettingsError(
                "no model given: name a trained nnU-Net model folder (command line: --model DIR; "
                "FLAME: analyzer_kwargs={'model_dir': DIR}) or set nnUNet_results (v2) or "
                "RESULTS_FOLDER (v1) and TASK_NAME"
            )
        for location in candidates:
            if all((location.folder / name).is_file() for name in _MODEL_FILES[location.generation]):
                return location
        expected = "; or ".join(
            f"{c.folder} as an nnU-Net {c.generation} model folder ({_MODEL_HINTS[c.generation]})"
            for c in candidates
        )
        raise SettingsError(f"no trained model found: looked for {expected}")

    def _under_results(self, generation: Generation) -> Path:
        assert self.results is not None and self.task
        trainer, plans = self.option("trainer", generation), self.option("plans", generation)
        if generation is Generation.V2:
            task = _find_case_insensitive(self.results, self.task)
            return task / f"{trainer}__{plans}__{self.configuration}"
        configuration = self.results / "nnUNet" / self.configuration
        return _find_v1_task(configuration, self.task) / f"{trainer}__{plans}"


_MODEL_FILES: dict[Generation, tuple[str, ...]] = {
    Generation.V2: ("dataset.json", "plans.json"),
    Generation.V1: ("plans.pkl",),
}
_MODEL_HINTS: dict[Generation, str] = {
    Generation.V2: "dataset.json, plans.json and fold_N/ inside",
    Generation.V1: "plans.pkl and fold_N/ inside, at RESULTS_FOLDER/nnUNet/<configuration>/<task>/<trainer>__<plans>",
}


def _find_v1_task(parent: Path, name: str) -> Path:
    """A v1 task folder by name in any letter case (``Task029_LITS`` for ``Task029_LiTS``) or by id.

    The reference image renamed the folder at run time; here nothing is moved."""
    found = _find_case_insensitive(parent, name)
    if found.exists() or not parent.is_dir():
        return found
    digits = name.lower().removeprefix("task").split("_")[0]
    if digits.isdigit():
        prefix = f"task{int(digits):03d}_"
        matches = [p for p in parent.iterdir() if p.name.lower().startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
    return found


def _find_case_insensitive(parent: Path, name: str) -> Path:
    exact = parent / name
    if exact.exists() or not parent.is_dir():
        return exact
    matches = [p for p in parent.iterdir() if p.name.lower() == name.lower()]
    return matches[0] if len(matches) == 1 else exact

"""Where a request's model is: a trained nnU-Net model folder, named directly or found under a
results folder by task, trainer, plans and configuration, and which nnU-Net generation it is;
or several configurations of one dataset, as an ensemble or as ``nnUNetv2_find_best_configuration``
chose them (its ``inference_information.json``).

:class:`ModelSource` is what the settings say about it (:meth:`asyncflow.settings.Settings.model_source`);
:meth:`ModelSource.locate` finds the folder, or says clearly how to name one;
:meth:`ModelSource.select` finds every folder of the request's plan (:class:`ModelSelection`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from asyncflow.enums import Generation, ModelGeneration
from asyncflow.errors import ModelError, SettingsError

__all__ = ["BEST_CONFIGURATION", "MODEL_DEFAULTS", "ModelLocation", "ModelSelection", "ModelSource"]

# What nnUNetv2_find_best_configuration writes into the dataset's results folder.
BEST_CONFIGURATION = "inference_information.json"

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
class ModelSelection:
    """The model folders a request runs, their probabilities averaged when there are several
    (``members``, in the ensemble's order); the folds the selection names (None: the settings');
    the postprocessing file it chose (None: none chose one); ``best``: the
    ``inference_information.json`` it came from."""

    members: tuple[ModelLocation, ...]
    folds: tuple[int | str, ...] | None = None
    postprocessing: Path | None = None
    best: Path | None = None


@dataclass(frozen=True)
class ModelSource:
    """A model as the settings name it: ``folder`` itself, or ``task`` under ``results``
    (nnUNet_results, RESULTS_FOLDER) with ``trainer``, ``plans`` and ``configuration``;
    ``generation`` auto tells v2 and v1 apart by their files. ``folds`` None: every fold found;
    ``trainer``, ``plans``, ``checkpoint`` None: the generation's stock names."""

    generation: ModelGeneration = ModelGeneration.AUTO
    folder: Path | None = None
    ensemble: tuple[Path, ...] = ()  # more model folders, ensembled with ``folder``'s
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

    def select(self) -> ModelSelection:
        """Every model folder of the request: a best configuration's, the ensemble named, or the
        one model; a SettingsError (nothing named, found) or ModelError (a best configuration
        that cannot be run) saying why not."""
        if self.folder is not None and (self.folder / BEST_CONFIGURATION).is_file():
            if self.ensemble:
                raise SettingsError(
                    f"{self.folder} holds {BEST_CONFIGURATION}, which names the configurations to run: "
                    "give it alone, not with more model folders"
                )
            return _best_configuration(self.folder)
        first = self.locate()
        others = [ModelSource(self.generation, folder).locate() for folder in self.ensemble]
        return ModelSelection((first, *others))

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


def _best_configuration(dataset: Path) -> ModelSelection:
    """What ``nnUNetv2_find_best_configuration`` chose for ``dataset`` (its results folder): the
    configurations' folders in it, the folds, and the postprocessing file, found in ``dataset``
    also when the file names the absolute paths of the machine that trained the model."""
    path = dataset / BEST_CONFIGURATION
    try:
        information = json.loads(path.read_text())
        best = information["best_model_or_ensemble"]
        selected = best["selected_model_or_models"]
        members = tuple(
            ModelLocation(
                Generation.V2, dataset / f"{m['trainer']}__{m['plans_identifier']}__{m['configuration']}"
            )
            for m in selected
        )
        folds = tuple(int(f) if str(f).isdigit() else str(f) for f in information["folds"])
        named = Path(best["postprocessing_file"]) if best.get("postprocessing_file") else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} is not as nnUNetv2_find_best_configuration writes it: {exc!r}") from exc
    if not members:
        raise ModelError(f"{path} selects no configuration")
    for member in members:
        if not all((member.folder / name).is_file() for name in _MODEL_FILES[Generation.V2]):
            raise ModelError(
                f"{path} selects {member.folder.name}, which is not a trained model in {dataset}"
            )
    return ModelSelection(members, folds, _inside(dataset, named) if named else None, path)


def _inside(dataset: Path, named: Path) -> Path:
    """A file that ``inference_information.json`` names: where it says, or at the same place
    under ``dataset`` (the file keeps the paths of the machine that wrote it)."""
    if named.is_file():
        return named
    parts = named.parts
    if dataset.name in parts:
        moved = dataset.joinpath(*parts[len(parts) - parts[::-1].index(dataset.name) :])
        for candidate in (moved, moved.with_suffix(".json")):
            if candidate.is_file():
                return moved
    raise ModelError(
        f"{dataset / BEST_CONFIGURATION} names the postprocessing {named}, which is not there nor in "
        f"{dataset}: copy the dataset's whole results folder, or run with --postprocessing none"
    )

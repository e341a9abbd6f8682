"""The backend interface and the model facts every stage can read without torch."""

from __future__ import annotations

import contextlib
import json
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.from_thread
import anyio.lowlevel
import numpy as np

from asyncflow.backends.locate import MODEL_DEFAULTS
from asyncflow.case import PreparedCase
from asyncflow.enums import Generation
from asyncflow.errors import ModelError
from asyncflow.labels.segment import SegmentLabel, labels_from_dataset_json

T = TypeVar("T")

__all__ = [
    "Backend",
    "Composite",
    "HasBytes",
    "MemoryPhases",
    "ModelInfo",
    "ModelSteps",
    "NetworkTimed",
    "NextStage",
    "abandonable",
    "nbytes",
]


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
    generation: Generation = Generation.V2  # v1: nnU-Net 1.x, run through nnUNet_predict

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        *,
        folds: Sequence[int | str] | None = None,
        checkpoint: str = MODEL_DEFAULTS[Generation.V2]["checkpoint"],
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
            trainer = MODEL_DEFAULTS[Generation.V2]["trainer"]
            plans_name = str(plans.get("plans_name", MODEL_DEFAULTS[Generation.V2]["plans"]))
            configuration = configs[0] if len(configs) == 1 else "unknown"
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
            framework=_framework("nnunetv2"),
        )

    @classmethod
    def from_v1_folder(
        cls,
        folder: Path,
        *,
        folds: Sequence[int | str] | None = None,
        checkpoint: str = MODEL_DEFAULTS[Generation.V1]["checkpoint"],
    ) -> ModelInfo:
        """An nnU-Net v1 model: ``RESULTS_FOLDER/nnUNet/<configuration>/<task>/<trainer>__<plans>``.

        v1 keeps its facts in ``plans.pkl``, a pickle: it is read here with an
        unpickler that builds only plain data (dicts, lists, numpy arrays and
        scalars) and refuses any other class, so the file cannot run code in
        this process (``nnUNet_predict`` unpickles it, in its own, as v1 does). v1 has
        no label names;
        those come from a v1 ``dataset.json`` beside ``plans.pkl`` or in the task
        folder when there is one, else labels are named by value.
        """
        parts = folder.name.split("__")
        if len(parts) != 2 or len(folder.parents) < 4 or folder.parents[2].name != "nnUNet":
            raise ModelError(
                f"{folder} is not where nnUNet_predict looks for a v1 model: "
                "RESULTS_FOLDER/nnUNet/<configuration>/<task>/<trainer>__<plans>"
            )
        try:
            with (folder / "plans.pkl").open("rb") as f:
                plans = _PlansUnpickler(f).load()
            num_channels = int(plans["num_modalities"])
            classes = [int(c) for c in plans["all_classes"]]
        except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as exc:
            raise ModelError(f"v1 model folder {folder} has no readable plans.pkl: {exc!r}") from exc

        def fold_dir(fold: int | str) -> Path:
            return folder / ("all" if fold == "all" else f"fold_{fold}")

        def complete(fold_folder: Path) -> bool:
            return all((fold_folder / f"{checkpoint}.model{s}").is_file() for s in ("", ".pkl"))

        if folds is None:
            found = sorted(p.name.removeprefix("fold_") for p in folder.glob("fold_*") if complete(p))
            folds = [int(f) if f.isdigit() else f for f in found]
        missing = [f for f in folds if not complete(fold_dir(f))]
        if not folds or missing:
            raise ModelError(
                f"v1 model folder {folder} has no {checkpoint}.model(.pkl) for fold(s) {missing or 'any'}"
            )
        named = [p / "dataset.json" for p in (folder, folder.parent) if (p / "dataset.json").is_file()]
        if named:
            labels = labels_from_dataset_json(json.loads(named[0].read_text()))
        else:
            labels = labels_from_dataset_json({"labels": {str(c): f"label {c}" for c in classes if c}})
        trainer, plans_name = parts
        return cls(
            folder=folder,
            name=folder.parent.name,
            configuration=folder.parents[1].name,
            trainer=trainer,
            plans=plans_name,
            folds=tuple(folds),
            checkpoint=checkpoint,
            num_channels=num_channels,
            labels=labels,
            framework=_framework("nnunet"),
            generation=Generation.V1,
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


class _PlansUnpickler(pickle.Unpickler):
    """Plain data only: what nnU-Net v1 writes into ``plans.pkl``, and no other global."""

    _ALLOWED = frozenset(
        {
            ("collections", "OrderedDict"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"plans.pkl refers to {module}.{name}, which is not plain data")
        return super().find_class(module, name)


def _framework(package: str) -> str:
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{package} unknown"


@dataclass(frozen=True)
class MemoryPhases:
    """What a case holds at once, in bytes, in each phase of one configuration's steps: ``base``
    (its channels) throughout, and ``preprocess`` (nnU-Net's preprocessing at its peak), the
    ``model_input`` and ``logits`` held together while it is predicted, or ``to_labels`` (the
    logits' way back, the logits included); ``voxels`` and ``classes`` of the source grid."""

    base: int
    preprocess: int
    model_input: int
    logits: int
    to_labels: int
    voxels: int
    classes: int

    @property
    def peak(self) -> int:
        return self.base + max(self.preprocess, self.model_input + self.logits, self.to_labels)


class ModelSteps(Protocol):
    """A model's CPU work on either side of the network, done by the CPU stages, never by the
    prediction worker: ``preprocess`` in the prepare stage (its result becomes
    ``PreparedCase.model_input``), ``to_labels`` in the export stage (the backend's output for a
    case to a (z, y, x) integer label map on the case's ``geometry``). ``memory_bytes``: the most
    a case will hold at once from ``preprocess`` to its label map, estimated from the case as
    read (the pipeline's memory budget admits cases by it). Thread-safe, and usable before the
    model has loaded."""

    def memory_bytes(self, prepared: PreparedCase) -> int: ...

    def preprocess(self, prepared: PreparedCase) -> Any: ...

    def to_labels(self, prepared: PreparedCase, output: Any) -> np.ndarray: ...


@runtime_checkable
class NetworkTimed(Protocol):
    """A backend output that knows the seconds its case spent in the network (v2's logits):
    ``case.predicted`` then tells them apart from the worker's whole hold."""

    network_s: float


@runtime_checkable
class NextStage(Protocol):
    """A backend output after which the case's network runs again (a cascade's first stage):
    ``next_input`` makes the case's next model input from it, CPU work that the prediction
    worker runs in a worker thread without holding its device. The prediction worker then
    predicts the case again, and only an output that is not a NextStage goes to export."""

    network_s: float

    def next_input(self, prepared: PreparedCase) -> Any: ...


@runtime_checkable
class HasBytes(Protocol):
    """A model input or backend output that knows its size (v2's preprocessed data and logits)."""

    @property
    def nbytes(self) -> int: ...


def nbytes(value: object) -> int:
    """The size of a model input or backend output, for the events (0 when it does not say)."""
    return int(value.nbytes) if isinstance(value, HasBytes) else 0


@runtime_checkable
class Backend(Protocol):
    """Predicts prepared cases, up to ``max_batch`` cases per call.

    ``load`` is idempotent and may take long (it runs off the event loop once per
    process). ``predict`` returns one entry per case, in order: the backend's
    output for that case, or the exception that ended that case alone. Raising
    means the whole call failed; the pipeline then retries a batch's cases one
    by one. Calls to one backend never overlap.
    ``steps``: the model's CPU work around the network (v2: nnU-Net's
    preprocessing before ``predict``, the logits' way back to the source grid
    after it), or None when ``predict`` itself returns (z, y, x) integer label
    maps on the cases' ``geometry`` (v1: ``nnUNet_predict`` does it all).
    ``needs_files``: the backend reads ``channel_files`` (else the in-memory
    ``images`` suffice and no input file is written). ``device``: where the network runs
    (``cpu``, ``cuda``, ``cuda:N``; ``model.loaded`` names it once ``load`` has run).
    """

    info: ModelInfo
    max_batch: int
    needs_files: bool
    device: str

    @property
    def steps(self) -> ModelSteps | None: ...

    def load(self) -> None: ...

    async def predict(self, cases: Sequence[PreparedCase]) -> list[Any | Exception]: ...


class Composite:
    """A backend made of backends on one device (an ensemble's configurations, a cascade's
    stages, several models), each loaded once: ``parts`` names them, in order."""

    device: str

    @property
    def parts(self) -> Sequence[Backend]:
        raise NotImplementedError

    def load(self) -> None:
        for part in self.parts:
            part.load()
        self.device = self.parts[0].device  # "auto" resolved by the load


async def abandonable(fn: Callable[[PreparedCase], T], case: PreparedCase) -> T:
    """``fn(case)`` in a daemon thread of its own: cancelling the caller (a request stopped now)
    abandons it, and the process's exit does not wait for it (a worker thread's would)."""
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, fn(case)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome.append((False, exc))
        with contextlib.suppress(RuntimeError):  # the event loop has ended: nobody waits
            anyio.from_thread.run_sync(done.set, token=token)

    threading.Thread(target=run, name="asyncflow-network", daemon=True).start()
    await done.wait()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value

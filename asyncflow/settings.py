"""One typed settings object for every entry point (CLI, FLAME, library).

Environment variables keep the names of the reference image (``nnUNet_input``,
``nnUNet_output``, ``RESULTS_FOLDER``, ``TASK_NAME``, ``MULTI_MODAL``) plus
nnU-Net v2's own ``nnUNet_results``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from asyncflow.backends.locate import ModelSource
from asyncflow.delivery.pacs import Destination, parse_destination
from asyncflow.enums import DeidentifyProfile, ModelGeneration, Resampling, SegCompression, SegType
from asyncflow.errors import SettingsError
from asyncflow.machine import available_memory_bytes, cores, half_the_cores
from asyncflow.reading.archives import ArchiveLimits
from asyncflow.reading.select import Selection
from asyncflow.reading.volumes import Choice, parse_choice

__all__ = [
    "Settings",
    "default_export_workers",
    "default_python_workers",
    "default_workers",
    "packaged_demo_model",
]

Device = str  # auto, cpu, cuda or cuda:N
_EVERY_VOLUME = Choice("all")


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def default_workers() -> int:
    """Prepare workers: one per core, at most 16. SimpleITK's reading and nnU-Net's preprocessing
    release the GIL (benchmarks/gil.py); the memory budget keeps them within memory."""
    return min(16, cores())


def default_python_workers() -> int:
    """Unpack workers: one per two cores, at most four. tarfile and pydicom hold the GIL: on 2
    cores two of them starved the prediction worker (benchmarks/RESULTS.md)."""
    return min(4, half_the_cores())


def default_export_workers() -> int:
    """Export workers: one per two cores, at least one, at most eight. nnU-Net's resampling of
    the logits (most of their time) partly releases the GIL; the SEG build holds it."""
    return min(8, half_the_cores())


def packaged_demo_model() -> Path:
    """The tiny synthetic-phantom model shipped inside the package (demo and tests only)."""
    return Path(__file__).resolve().parent / "models" / "tiny"


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


_PATH_FIELDS = frozenset(
    {"model_dir", "results_folder", "work_dir", "input_dir", "output_dir", "label_config"}
)


def _coerce(name: str, value: object) -> object:
    """Plain values (as FLAME's analyzer kwargs or JSON carry them) to the field's type."""
    if name in _PATH_FIELDS and isinstance(value, str | os.PathLike):
        return Path(value)
    if name == "devices" and not isinstance(value, tuple):
        devices = value if isinstance(value, list) else str(value).replace(",", " ").split()
        return tuple(str(d) for d in devices)
    if name == "folds" and not isinstance(value, tuple):
        folds = value if isinstance(value, list) else str(value).replace(",", " ").split()
        return tuple(int(f) if str(f).isdigit() else f for f in folds)
    default = _DEFAULTS.get(name)
    if isinstance(value, str) and isinstance(default, bool):
        return _flag(value)
    if isinstance(value, str) and isinstance(default, int | float):
        try:
            return type(default)(float(value)) if isinstance(default, float) else int(float(value))
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {value!r}") from None
    return value


@dataclass(frozen=True)
class Settings:
    """Everything one request needs besides its inputs."""

    # Model. v2: a trained model folder holding dataset.json, plans.json and
    # fold_N/<checkpoint>; v1: RESULTS_FOLDER/nnUNet/<configuration>/<task>/<trainer>__<plans>
    # holding plans.pkl and fold_N/<checkpoint>.model(.pkl). When unset it is resolved from
    # results_folder and task_name; "auto" tells the generations apart by their files.
    backend: ModelGeneration = ModelGeneration.AUTO  # auto, v1 (nnUNet_predict subprocess) or v2 (in process)
    # A v2 dataset folder in which nnUNetv2_find_best_configuration wrote inference_information.json
    # runs the configuration or ensemble it chose, with its folds and postprocessing.
    model_dir: Path | None = None
    # More v2 model folders (configurations of model_dir's dataset) whose probabilities are averaged
    # with model_dir's, as nnUNetv2_ensemble averages them (--model given more than once)
    ensemble: tuple[Path, ...] = ()
    # auto: the postprocessing nnUNetv2_find_best_configuration chose (none for a plain model folder);
    # none; or a postprocessing.json/.pkl file (asyncflow.backends.postprocessing)
    postprocessing: str = "auto"
    # More models of any dataset that every case also goes through (--add-model; backends.models)
    models: tuple[Path, ...] = ()
    merge_labels: bool = False  # several models' label maps as one, the later model winning overlaps
    results_folder: Path | None = None  # nnUNet_results (v2) or RESULTS_FOLDER (v1)
    task_name: str | None = None  # dataset/task folder name under results_folder (v1: or its id, "29")
    trainer: str | None = None  # default: nnUNetTrainer (v2), nnUNetTrainerV2 (v1)
    plans: str | None = None  # default: nnUNetPlans (v2), nnUNetPlansv2.1 (v1)
    configuration: str = "3d_fullres"
    folds: tuple[int | str, ...] | None = None  # None: every fold_N found
    checkpoint: str | None = None  # default: checkpoint_final.pth (v2), model_final_checkpoint (v1)
    tile_step_size: float = 0.5
    use_mirroring: bool = True
    device: Device = "auto"
    devices: tuple[Device, ...] | None = None  # one prediction worker per device, e.g. cuda:0,cuda:1
    torch_threads: int | None = None
    # model: the resampling the model's plans name, voxel-identical to nnUNetv2_predict; torch:
    # nnU-Net's resample_torch_fornnunet in the prepare and export workers; torch-device: the
    # same, the logits resampled by the prediction worker on its device (v2 only)
    resampling: Resampling = Resampling.MODEL

    # nnU-Net v1: each nnUNet_predict run pays the process and model start-up once for a batch.
    v1_command: str = "nnUNet_predict"  # found on PATH or beside the running Python
    v1_batch_size: int = 8  # most prepared cases one nnUNet_predict run takes
    v1_case_timeout_s: float = 1800.0  # a run of N cases is stopped after N times this
    v1_preprocess_threads: int = 2  # nnUNet_predict --num_threads_preprocessing
    v1_export_threads: int = 2  # nnUNet_predict --num_threads_nifti_save

    # Inputs
    multi_modal: bool = False  # <id>_0000, <id>_0001 ... form one case
    # Which volumes of a 4D series (time points, phases, b-values, echoes) become cases: all,
    # first, last, a volume's number, or KEYWORD=VALUE (asyncflow.reading.volumes); the others
    # are listed in the report's skipped files with the reason
    volumes: Choice = _EVERY_VOLUME
    # Which DICOM series a model is for: a TOML or JSON rules file (asyncflow.reading.select); the
    # files of the others are skipped, with each rule's first failed condition
    select: Selection | None = None
    # Output names from input indexes (input003, input003_S2, input004_1), not from archive or
    # file names, which may carry a patient's name (the FLAME analyzer's default)
    opaque_names: bool = False

    # Outputs: DICOM SEG
    label_config: Path | None = None  # JSON/YAML label names, codes, colours (asyncflow.labels.config)
    seg_type: SegType = SegType.BINARY  # BINARY, FRACTIONAL or LABELMAP (readers may not know LABELMAP yet)
    seg_keep_empty_frames: bool = False  # a frame for every slice and segment, even empty ones
    # none, rle, jpeg2000, jpegls (FRACTIONAL and LABELMAP only)
    seg_compression: SegCompression = SegCompression.NONE
    # none, or basic: PS3.15's Basic Profile with the Retain UIDs Option on every SEG (the FLAME
    # analyzer's default; asyncflow.writing.deidentify)
    deidentify: DeidentifyProfile = DeidentifyProfile.NONE
    # Send each case's DICOM objects to a PACS as the case ends (asyncflow.delivery.pacs):
    # dicomweb://host:port/path (STOW-RS) or dimse://AET@host:port (C-STORE); never in FLAME
    send: Destination | None = None
    # The optional outputs asked for, by name (asyncflow.writing.registry.OPTIONAL: sr, a TID 1500
    # Measurement Report of each SEG's label volumes and intensities; rtstruct, an RT Structure Set
    # of its label map), each beside its SEG and sent with it. Each was a boolean setting before
    # (measurement_report, rtstruct): from_env still takes those names.
    outputs: tuple[str, ...] = ()
    send_tries: int = 3  # tries per case before its delivery fails (refusals are not tried again)
    send_backoff_s: float = 1.0  # wait after the first failed try; doubled after each next one

    # Pipeline
    work_dir: Path | None = None  # parent of the request's temp dir (default: system temp)
    unpack_workers: int = field(default_factory=default_python_workers)
    prepare_workers: int = field(default_factory=default_workers)
    export_workers: int = field(default_factory=default_export_workers)
    queue_size: int = 2  # items waiting between two stages
    # GB the cases in flight may hold at once in the model's CPU steps (v2: nnU-Net's
    # preprocessing, model input, logits, resampling; asyncflow.pipeline.budget); 0: three quarters of
    # the memory available (container limit included) when the request starts.
    memory_budget_gb: float = 0.0
    # Objects of a store (a FLAME node's S3 data) being fetched or waiting on disk to be unpacked
    # at once (asyncflow.pipeline.fetching); 0: unpack_workers + queue_size, the inputs the
    # unpack stage holds anyway. Each fetch holds one 1 MiB chunk in memory, whatever the size.
    fetch_window: int = 0
    fetch_tries: int = 4  # tries per object (and per listing page) before it is given up
    fetch_backoff_s: float = 1.0  # wait after the first failed try; doubled after each next one
    # After a first interrupt (Ctrl-C, SIGTERM, SIGHUP) no new case starts and those in flight
    # finish; after this many seconds, or a second interrupt, the request stops now
    # (asyncflow.pipeline.stopping)
    grace_s: float = 60.0
    # A Ray cluster that runs the steps, the driver keeping the books (asyncflow.cluster): auto,
    # local, HOST:PORT or ray://HOST:PORT; never inside FLAME, where a node is one container
    cluster: str | None = None

    # Limits on untrusted input (docs/explanation/security.md): an input over one fails alone, with the reason.
    max_archive_bytes: int = 100 << 30  # bytes one archive may expand to
    max_archive_members: int = 200_000
    max_file_bytes: int = 16 << 30  # one member, or the voxels a NIfTI header declares
    max_compression_ratio: float = 100.0  # extracted / archive size, checked above 1 GiB
    max_archive_depth: int = 2  # archives inside archives are unpacked down to this depth
    disk_headroom: float = 2.0  # free space needed before work starts, x the input size (0: no check)

    # Reference-image paths, used by the FLAME entry point and as CLI defaults.
    input_dir: Path | None = None  # nnUNet_input
    output_dir: Path | None = None  # nnUNet_output

    def __post_init__(self) -> None:
        for name in (
            "unpack_workers",
            "prepare_workers",
            "export_workers",
            "queue_size",
            "fetch_tries",
            "send_tries",
            "max_archive_bytes",
            "max_archive_members",
            "max_file_bytes",
            "max_archive_depth",
            "v1_batch_size",
            "v1_preprocess_threads",
            "v1_export_threads",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        self._normalise()
        if self.fetch_window < 0 or self.fetch_backoff_s < 0 or self.send_backoff_s < 0:
            raise SettingsError(
                "fetch_window (0: automatic), fetch_backoff_s and send_backoff_s must not be negative"
            )
        if self.memory_budget_gb < 0:
            raise SettingsError(
                f"memory_budget_gb must be 0 (automatic) or positive, got {self.memory_budget_gb}"
            )
        if self.grace_s < 0:
            raise SettingsError(f"grace_s must not be negative, got {self.grace_s}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise SettingsError(f"torch_threads must be at least 1, got {self.torch_threads}")
        if not 0 < self.tile_step_size <= 1:
            raise SettingsError(f"tile_step_size must be in (0, 1], got {self.tile_step_size}")
        if self.v1_case_timeout_s <= 0:
            raise SettingsError(f"v1_case_timeout_s must be positive, got {self.v1_case_timeout_s}")
        for device in (self.device, *(self.devices or ())):
            if not _DEVICE.fullmatch(device):
                raise SettingsError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
        if self.devices is not None and not self.devices:
            raise SettingsError("devices must name at least one device")
        if self.seg_compression is not SegCompression.NONE and self.seg_type is SegType.BINARY:
            raise SettingsError(
                "BINARY SEG is written uncompressed (highdicom encodes compressed frames for "
                "FRACTIONAL and LABELMAP only): choose another seg_type or seg_compression none"
            )

    def _normalise(self) -> None:
        """Each choice-like value to its type, once, as it enters (plain strings are accepted: the
        command line, FLAME's kwargs and JSON carry them); a value that means nothing is a
        SettingsError that says what is accepted."""
        for name, kind in _CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, kind):
                text = str(value).upper() if kind is SegType else str(value)
                try:
                    object.__setattr__(self, name, kind(text))
                except ValueError:
                    choices = ", ".join(kind)
                    raise SettingsError(f"{name} must be one of {choices}, got {value!r}") from None
        if isinstance(self.volumes, str):
            try:
                object.__setattr__(self, "volumes", parse_choice(self.volumes))
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        if isinstance(self.select, str | os.PathLike):
            object.__setattr__(self, "select", Selection.load(self.select))
        if isinstance(self.send, str):
            try:
                object.__setattr__(self, "send", parse_destination(self.send))
            except ValueError as exc:
                raise SettingsError(f"send: {exc}") from None
        object.__setattr__(self, "outputs", _outputs(self.outputs))
        folders = list(self.model_dir) if isinstance(self.model_dir, list | tuple) else [self.model_dir]
        object.__setattr__(self, "model_dir", Path(folders[0]) if folders and folders[0] else None)
        object.__setattr__(self, "ensemble", _paths([*folders[1:], *_paths(self.ensemble)]))
        object.__setattr__(self, "models", _paths(self.models))

    def model_source(self) -> ModelSource:
        """Where the model is, as these settings name it (:meth:`ModelSource.select` finds it)."""
        return ModelSource(
            self.backend,
            self.model_dir,
            self.ensemble,
            self.results_folder,
            self.task_name,
            self.configuration,
            self.trainer,
            self.plans,
            self.checkpoint,
            self.folds,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from environment variables; keyword overrides win when not None."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {
            "results_folder": _path(env.get("nnUNet_results") or env.get("RESULTS_FOLDER")),
            "task_name": env.get("TASK_NAME") or None,
            "multi_modal": _flag(env.get("MULTI_MODAL")),
            "input_dir": _path(env.get("nnUNet_input")),
            "output_dir": _path(env.get("nnUNet_output")),
        }
        overrides = _legacy_outputs(dict(overrides))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise SettingsError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values.update({k: _coerce(k, v) for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def fetch_window_size(self) -> int:
        """``fetch_window``, or when 0 the inputs the unpack stage holds: its workers' and its queue's."""
        return self.fetch_window or self.unpack_workers + self.queue_size

    def archive_limits(self) -> ArchiveLimits:
        return ArchiveLimits(
            max_bytes=self.max_archive_bytes,
            max_members=self.max_archive_members,
            max_file_bytes=self.max_file_bytes,
            max_ratio=self.max_compression_ratio,
            max_depth=self.max_archive_depth,
        )

    def memory_budget_bytes(self) -> int:
        """``memory_budget_gb`` in bytes; when 0, three quarters of the memory available now
        (at least 1 GiB; 8 GiB where the system does not say)."""
        if self.memory_budget_gb > 0:
            return max(1, int(self.memory_budget_gb * 1e9))
        available = available_memory_bytes()
        return max(1 << 30, available * 3 // 4) if available is not None else 8 << 30


_CHOICES: dict[str, type[StrEnum]] = {
    "backend": ModelGeneration,
    "resampling": Resampling,
    "seg_type": SegType,
    "seg_compression": SegCompression,
    "deidentify": DeidentifyProfile,
}


def _paths(value: object) -> tuple[Path, ...]:
    """Folders as a tuple of paths: from a list or tuple, a path, or a comma-separated string."""
    parts = str(value).split(",") if isinstance(value, str) else [value] if isinstance(value, Path) else value
    return tuple(Path(str(f).strip()) for f in parts if str(f).strip())  # type: ignore[attr-defined]


def _outputs(value: object) -> tuple[str, ...]:
    """The ``outputs`` setting: optional writers by name, each once, in name order."""
    from asyncflow.writing.registry import OPTIONAL

    if isinstance(value, str):
        names = value.replace(",", " ").split()
    elif isinstance(value, Iterable):
        names = [str(v) for v in value]
    else:
        raise SettingsError(f"outputs must name optional outputs, got {value!r}")
    unknown = sorted(set(names) - set(OPTIONAL))
    if unknown:
        raise SettingsError(
            f"outputs: {', '.join(unknown)} is no optional output; known: {', '.join(sorted(OPTIONAL))}"
        )
    return tuple(sorted(set(names)))


def _legacy_outputs(overrides: dict[str, object]) -> dict[str, object]:
    """An optional output's boolean setting of before (``measurement_report=True``) as a name in
    ``outputs``."""
    from asyncflow.writing.registry import OPTIONAL

    asked = list(_outputs(overrides.get("outputs") or ()))
    for name, writer in OPTIONAL.items():
        if writer.setting is not None and writer.setting in overrides:
            value = overrides.pop(writer.setting)
            if _flag(value) if isinstance(value, str) else bool(value):
                asked.append(name)
    if asked:
        overrides["outputs"] = tuple(asked)
    return overrides


def _default(f: Any) -> object:
    return f.default if f.default is not MISSING else f.default_factory()


_DEFAULTS = {f.name: _default(f) for f in fields(Settings)}

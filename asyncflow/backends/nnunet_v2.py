"""nnU-Net v2 in process, split where the hardware changes.

nnU-Net's ``predict_single_npy_array`` does everything in one call: preprocessing
(crop to non-zero, normalise, resample to the model's spacing), the sliding-window
network, and the conversion of the logits back to the source grid (resampling of
the probabilities, argmax, uncropping). Only the network needs the GPU. Here the
same nnU-Net functions run in three places:

- :class:`NnUNetV2Steps` ``.preprocess`` (prepare stage, CPU workers):
  ``preprocessor.run_case_npy``, as nnU-Net's ``PreprocessAdapterFromNpy`` calls it;
- :class:`NnUNetV2Backend` ``.predict`` (the prediction worker):
  ``predict_logits_from_preprocessed_data``, every fold averaged, mirroring as set;
- :class:`NnUNetV2Steps` ``.to_labels`` (export stage, CPU workers):
  ``convert_predicted_logits_to_segmentation_with_correct_shape``, one class at a time
  (:mod:`asyncflow.backends.resampling`).

so the label map is nnU-Net's own, voxel for voxel, and the prediction worker is
held for the network alone. With ``resampling="torch-device"`` the worker also resamples
the logits and takes their argmax on its device (:class:`CroppedLabels`).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk

from asyncflow.backends.base import MemoryPhases, ModelInfo, abandonable
from asyncflow.backends.imports import import_nnunet
from asyncflow.case import PreparedCase
from asyncflow.enums import Resampling
from asyncflow.errors import ModelError
from asyncflow.log import Stopwatch, get_logger
from asyncflow.machine import gpu_problem, half_the_cores

__all__ = ["CroppedLabels", "Logits", "ModelInput", "NnUNetV2Backend", "NnUNetV2Steps"]

log = get_logger(__name__)
T = TypeVar("T")


@dataclass
class ModelInput:
    """A case after nnU-Net's preprocessing: (c, z, y, x) float32 on the model's grid, and the
    properties nnU-Net needs to bring the prediction back to the source grid."""

    data: np.ndarray
    properties: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass
class Logits:
    """The network's answer for one case: (classes, z, y, x) on the model's grid, on the CPU,
    with the preprocessing properties that lead back to the source grid."""

    array: Any  # torch.Tensor, float16 as nnU-Net accumulates it
    properties: dict[str, Any]
    network_s: float  # seconds in nnU-Net's network call, all folds

    @property
    def nbytes(self) -> int:
        return int(self.array.element_size() * self.array.nelement())


@dataclass
class CroppedLabels:
    """The label map the prediction worker made from the logits on its device
    (``resampling="torch-device"``): (z, y, x) on the source grid cropped to its non-zero
    box, on the model's axes, with the properties that put it back into the whole image."""

    array: np.ndarray
    properties: dict[str, Any]
    network_s: float  # seconds in nnU-Net's network call, all folds (not the resampling)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


class NnUNetV2Steps:
    """nnU-Net v2's CPU work on either side of the network, for one model and configuration.

    Built from ``plans.json`` and ``dataset.json`` alone (no weights, no torch
    model), so the prepare and export stages can run it while the model loads.
    Thread-safe: each call builds its own preprocessor and keeps no state.
    """

    def __init__(self, info: ModelInfo, resampling: str = Resampling.MODEL) -> None:
        import_nnunet()
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from asyncflow.backends.resampling import PlannedResampling, TorchResampling

        self.num_channels = info.num_channels
        self.resampling = Resampling(resampling)
        kind = PlannedResampling if self.resampling is Resampling.MODEL else TorchResampling
        try:
            plans = json.loads((info.folder / "plans.json").read_text())
            self.dataset_json = json.loads((info.folder / "dataset.json").read_text())
            self.plans_manager = PlansManager(plans)
            planned = self.plans_manager.get_configuration(info.configuration)
            self.configuration_manager = kind(planned.configuration)
            self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(
                f"nnU-Net v2 cannot read the plans of {info.folder} for configuration "
                f"{info.configuration!r}: {type(exc).__name__}: {exc}"
            ) from exc
        self.previous_stage: str | None = planned.previous_stage_name  # a cascade's second stage

    def preprocess(self, prepared: PreparedCase, previous: np.ndarray | None = None) -> ModelInput:
        """nnU-Net's preprocessing of the case's channels, as ``nnUNetv2_predict`` does it; a
        cascade's second stage also reads ``previous``, the first stage's (1, ...) label map as its
        reader returns it, appended one-hot as nnU-Net's ``PreprocessAdapter`` does."""
        if len(prepared.images) != self.num_channels:
            raise ValueError(
                f"case has {len(prepared.images)} channel(s), the model expects {self.num_channels}"
            )
        if (previous is None) != (self.previous_stage is None):
            raise ValueError(
                f"the previous stage's segmentation is what a cascade reads: {self.previous_stage}"
            )
        data, properties = self._read(prepared)
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        # With a segmentation, run_case_npy also samples its voxels per class for training's
        # patches (properties["class_locations"]); inference never reads them.
        preprocessor._sample_foreground_locations = lambda *_, **__: {}
        data, seg, properties = preprocessor.run_case_npy(
            data, previous, properties, self.plans_manager, self.configuration_manager, self.dataset_json
        )
        if previous is not None:
            from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

            one_hot = convert_labelmap_to_one_hot(seg[0], self.label_manager.foreground_labels, data.dtype)
            data = np.vstack((data, one_hot))
        return ModelInput(np.ascontiguousarray(data, dtype=np.float32), properties)

    def to_labels(self, prepared: PreparedCase, output: Logits | CroppedLabels) -> np.ndarray:
        """nnU-Net's label map in the source grid, as a (z, y, x) array on ``prepared.geometry``."""
        cropped = (
            self.cropped_labels(output.array, output.properties)
            if isinstance(output, Logits)
            else output.array
        )
        return self.finish_labels(prepared, cropped, output.properties)

    def finish_labels(
        self, prepared: PreparedCase, cropped: np.ndarray, properties: dict[str, Any]
    ) -> np.ndarray:
        """A label map on the cropped source grid (model axes) uncropped, on ``prepared.geometry``."""
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

        from asyncflow.backends.resampling import uncropped

        labels = uncropped(cropped, self.plans_manager, self.label_manager, properties)
        reader = self.plans_manager.image_reader_writer_class()
        if type(reader) is SimpleITKIO:  # SimpleITKIO.write_seg writes this array as it is
            return labels
        # Another reader (and axis order): written by it, read back through SimpleITK.
        written = prepared.workdir / "prediction.nii.gz"
        reader.write_seg(labels, str(written), properties)
        return sitk.GetArrayFromImage(sitk.ReadImage(str(written)))

    def cropped_probabilities(self, logits: Any, properties: dict[str, Any]) -> np.ndarray:
        """The probabilities on the cropped source grid (model axes), as ``--save_probabilities``."""
        from asyncflow.backends.resampling import cropped_probabilities

        return cropped_probabilities(
            logits, self.plans_manager, self.configuration_manager, self.label_manager, properties
        )

    def cropped_labels(self, logits: Any, properties: dict[str, Any], device: Any = None) -> np.ndarray:
        """The logits resampled to the source grid (cropped) and their argmax, on ``device``
        (torch resampling) or on the CPU."""
        from asyncflow.backends.resampling import cropped_labels

        return cropped_labels(
            logits, self.plans_manager, self.configuration_manager, self.label_manager, properties, device
        )

    def memory_bytes(self, prepared: PreparedCase) -> int:
        """At most how many bytes the case holds at once from preprocessing to its label map
        (the largest of :meth:`memory_phases`)."""
        return self.memory_phases(prepared).peak

    def memory_phases(self, prepared: PreparedCase) -> MemoryPhases:
        """What the case holds at once in each phase, from preprocessing to its label map.

        Estimated from the case's size and spacing, before any of it runs: the largest of
        nnU-Net's preprocessing, the model input and logits held between stages, and the
        logits' way back to the source grid (one class at a time). nnU-Net's scipy resampling
        works in float64 (order 3 for the image: a spline-filtered copy beside the output);
        thick slices copied along the coarse axis cost one slice at a time
        (:mod:`asyncflow.backends.resampling`). The coefficients were measured on nnU-Net
        2.8.1, with tracemalloc (numpy) and the peak RSS (torch); ``tests/pipeline/test_memory.py``
        checks that they bound what the steps allocate. Cropping to the non-zero region only
        makes a case smaller than estimated.
        """
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        from asyncflow.backends import resampling as rs

        channels = len(prepared.images)
        first = prepared.images[0]
        order = self.plans_manager.transpose_forward
        shape = [first.GetSize()[::-1][i] for i in order]
        spacing = [abs(first.GetSpacing()[::-1][i]) for i in order]
        target = list(self.configuration_manager.spacing)
        if len(target) < len(shape):  # 2D configurations keep the slice spacing
            target = [spacing[0], *target]
        model_shape = [int(n) for n in compute_new_shape(shape, spacing, target)]
        n, m = math.prod(shape), math.prod(model_shape)
        classes = self.label_manager.num_segmentation_heads
        preprocess = channels * (8 * n + 4 * m) + 16 * n
        to_labels = 2 * classes * m + 12 * n  # the logits; best, labels and mask of the source grid
        if shape == model_shape:
            pass
        elif rs.probabilities_function(self.configuration_manager) == rs.TORCH:  # float32 in torch
            preprocess += 8 * max(n, m)
            to_labels += 8 * m + 16 * n
        elif not rs.picks_slices(self.configuration_manager, spacing, target, shape, model_shape):
            preprocess += 48 * max(n, m)
            to_labels += 8 * m + 8 * n
        model_input, logits = 4 * channels * m, 2 * classes * m  # both held while predicted
        if self.previous_stage:  # its labels (float32) resampled after the image, then one-hot stacked
            fg = len(self.label_manager.foreground_labels)
            one_hot, image, grids = 4 * fg * m, 4 * channels * m, (spacing, target, shape, model_shape)
            seg = image + rs.seg_resampling_bytes(self.configuration_manager, *grids, fg + 1)
            preprocess = 4 * n + max(preprocess, seg, 2 * image + 4 * m + 2 * one_hot)
            model_input += one_hot
        return MemoryPhases(2 * channels * n, preprocess, model_input, logits, to_labels, n, classes)

    def _read(self, prepared: PreparedCase) -> tuple[np.ndarray, dict[str, Any]]:
        """The channels as the model's reader class (from ``plans.json``) would read their files."""
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

        reader = self.plans_manager.image_reader_writer_class()
        if type(reader) is SimpleITKIO:  # what SimpleITKIO.read_images returns, without a file
            return _as_simpleitkio_read(prepared.images)
        files = prepared.channel_files or [
            _write(image, prepared.workdir / f"{prepared.case.case_id}_{n:04d}.nii.gz")
            for n, image in enumerate(prepared.images)
        ]
        return reader.read_images([str(f) for f in files])


class NnUNetV2Backend:
    """One ``nnUNetPredictor``, loaded once; ``predict`` runs its network and nothing else."""

    max_batch = 1  # in process: no start-up to share, one case at a time
    needs_files = False  # images from memory: no NIfTI written and read back

    def __init__(
        self,
        info: ModelInfo,
        *,
        tile_step_size: float = 0.5,
        use_mirroring: bool = True,
        device: str = "auto",
        torch_threads: int | None = None,
        resampling: str = Resampling.MODEL,
    ) -> None:
        self.info = info
        self.steps = NnUNetV2Steps(info, resampling)
        self.tile_step_size = tile_step_size
        self.use_mirroring = use_mirroring
        self.device = device
        self.torch_threads = torch_threads
        self._predictor: Any = None
        self._load_lock = threading.Lock()

    def load(self) -> None:
        # One load at a time: a request that ended early may have left one running in its thread.
        with self._load_lock:
            if self._predictor is None:
                self._load()

    def _load(self) -> None:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        name = self.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
            if name == "cpu" and (problem := gpu_problem()) is not None:
                log.warning("device.gpu_unusable", reason=problem)  # not silently on the CPU
        if name.startswith("cuda") and not torch.cuda.is_available():
            problem = gpu_problem() or "no NVIDIA driver is loaded"
            raise ModelError(f"device {name} was asked for, but torch sees no CUDA device: {problem}")
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        elif name == "cpu":
            # Prepare and export threads run beside prediction: leave them half the cores.
            # (Measured here: 2 torch threads on a busy 2-core machine run up to 20x slower.)
            torch.set_num_threads(half_the_cores())
        device = torch.device(name)
        predictor = self._initialise(nnUNetPredictor, device)
        if predictor.configuration_manager.configuration != self.steps.configuration_manager.configuration:
            raise ModelError(
                f"the checkpoint was trained for another configuration than {self.info.configuration!r}: "
                "name the model folder <trainer>__<plans>__<configuration> as nnU-Net does"
            )
        self._predictor = predictor
        self.device = name

    def _initialise(self, predictor_class: Any, device: Any) -> Any:
        import torch

        # nnUNetPredictor prints a notice to stdout for any device but CUDA, and stdout belongs
        # to the caller (the CLI's summary, the FLAME SDK's lines). Swapping sys.stdout would
        # swap it for every thread of the process, so the predictor is made for CUDA (which only
        # sets cudnn.benchmark, put back here) and then given its device, as nnU-Net's own
        # constructor would.
        benchmark = torch.backends.cudnn.benchmark
        predictor = predictor_class(
            tile_step_size=self.tile_step_size,
            use_gaussian=True,
            use_mirroring=self.use_mirroring,
            perform_everything_on_device=device.type == "cuda",
            device=torch.device("cuda") if device.type != "cuda" else device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        if device.type != "cuda":
            torch.backends.cudnn.benchmark = benchmark
        predictor.device = device
        predictor.perform_everything_on_device = device.type == "cuda"
        try:
            predictor.initialize_from_trained_model_folder(
                str(self.info.folder), use_folds=self.info.folds, checkpoint_name=self.info.checkpoint
            )
        except Exception as exc:  # nnU-Net raises anything from KeyError to RuntimeError here
            raise ModelError(f"nnU-Net v2 could not load the model: {type(exc).__name__}: {exc}") from exc
        return predictor

    async def predict(self, cases: Sequence[PreparedCase]) -> list[Logits | CroppedLabels | Exception]:
        return [await abandonable(self.logits, case) for case in cases]

    def logits(self, prepared: PreparedCase) -> Logits | CroppedLabels:
        """The network's logits for a preprocessed case, or with ``resampling="torch-device"``
        their label map (blocking: call it from a worker thread)."""
        if not isinstance(prepared.model_input, ModelInput):
            raise TypeError("predict() needs the case as NnUNetV2Steps.preprocess() left it")
        return self.network(prepared.model_input)

    def network(self, model_input: ModelInput) -> Logits | CroppedLabels:
        """The network's logits for one preprocessed input (see :meth:`logits`)."""
        import torch

        if self._predictor is None:
            raise ModelError("predict() before load()")
        watch = Stopwatch()
        array = self._predictor.predict_logits_from_preprocessed_data(torch.from_numpy(model_input.data))
        network_s = watch.seconds
        if self.steps.resampling is Resampling.TORCH_DEVICE:
            # nnU-Net brings each fold's logits to the CPU (so that the next fold fits); their
            # average goes back once, and only the labels come back.
            labels = self.steps.cropped_labels(array, model_input.properties, self._predictor.device)
            return CroppedLabels(labels, model_input.properties, network_s)
        return Logits(array.cpu(), model_input.properties, network_s)


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def _as_simpleitkio_read(images: Sequence[sitk.Image]) -> tuple[np.ndarray, dict[str, Any]]:
    """nnU-Net v2's ``SimpleITKIO.read_images`` for images already in memory (3D, same grid)."""
    if not images:
        raise ValueError("the case has no image to preprocess")
    first = images[0]
    for image in images[1:]:
        if image.GetSize() != first.GetSize() or image.GetSpacing() != first.GetSpacing():
            raise ValueError("the case's channels differ in size or spacing")
    data = np.vstack(
        [sitk.GetArrayViewFromImage(i)[None] for i in images], dtype=np.float32, casting="unsafe"
    )
    properties = {
        "sitk_stuff": {
            "spacing": first.GetSpacing(),
            "origin": first.GetOrigin(),
            "direction": first.GetDirection(),
        },
        "spacing": [abs(s) for s in first.GetSpacing()[::-1]],
    }
    return data, properties

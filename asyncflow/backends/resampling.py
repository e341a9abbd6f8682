"""Resampling on either side of the network: nnU-Net's own, in bounded memory, or its torch one.

``resampling`` (:class:`asyncflow.enums.Resampling`) chooses the functions:

- ``model``: what the model's plans name (nnU-Net's scipy resampling for most models), run
  as nnU-Net runs it, voxel for voxel, in less memory. :class:`PlannedResampling` resamples
  the image with the plans' function; where that is nnU-Net's scipy resampling along a coarse
  axis with nearest-neighbour slices (``order_z`` 0, its "separate z" path), it first picks
  which slices each output slice copies (the same ``map_coordinates`` rounding on the same
  coordinates) and resizes only those in plane, instead of building three float64
  coordinate grids of the output's size. The non-zero mask nnU-Net resamples beside the
  image is left as it is: inference never reads it (a cascade's previous-stage segmentation,
  which takes its place, is resampled with the plans' function).
- ``torch``: nnU-Net's ``resample_torch_fornnunet`` for the image and the logits, with the
  arguments of its ``*_torchres`` planners (:class:`TorchResampling`), on the CPU workers; on
  the way back to thick slices, only the slices it keeps are resized
  (:func:`~asyncflow.backends.slices.torch_slices_first`);
- ``torch-device``: the same for the image; the logits are resampled and turned into labels
  by the prediction worker on its device (:func:`cropped_labels` with ``device``).

:func:`cropped_labels` is the first half of nnU-Net's
``convert_predicted_logits_to_segmentation_with_correct_shape`` (the logits to the source
grid, argmax) done one class at a time: both resampling functions treat each channel alone,
and a model trained on labels (not regions) needs no softmax before its argmax (nnU-Net skips
it too). A voxel goes to a later class only where that class's value is strictly larger than
the best so far, which is how argmax breaks ties (the first maximum), so the label map is the
same while only one class is resampled at a time. :func:`uncropped` is the second half.
Region-based models and resampling functions not known to work channel by channel go
through nnU-Net's own function whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.preprocessing.resampling.default_resampling import (
    resample_data_or_seg_to_shape,
)
from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from asyncflow.backends.slices import SCIPY_DEFAULTS, picked_axis, scipy_by_channel, torch_slices_first

__all__ = [
    "PlannedResampling",
    "TorchResampling",
    "cropped_labels",
    "cropped_probabilities",
    "picks_slices",
    "seg_resampling_bytes",
    "uncropped",
]

SCIPY = resample_data_or_seg_to_shape.__name__
TORCH = resample_torch_fornnunet.__name__
# What "torch" means here: nnU-Net's nnUNetPlannerResEncL_torchres_sepz. Like nnU-Net's
# default plans, it resamples a coarse axis on its own, slice by nearest slice, where the
# spacing is anisotropic; its sibling without "_sepz" interpolates across thick slices,
# which a model trained on the default plans never saw (docs/explanation/performance.md).
TORCH_KWARGS = {
    "force_separate_z": None,
    "memefficient_seg_resampling": False,
    "separate_z_anisotropy_threshold": ANISO_THRESHOLD,
}

Resample = Callable[[Any, Sequence[int], Sequence[float], Sequence[float]], Any]


def _keep_seg(seg: Any, new_shape: Sequence[int], *_: object) -> Any:
    """The non-zero mask as it is: ``run_case_npy`` returns it resampled, inference never reads it."""
    return seg


def _seg_function(configuration: ConfigurationManager, planned: Resample) -> Resample:
    """What ``run_case_npy`` resamples its segmentation with: the plans' function for a cascade's
    second stage (the segmentation is the previous stage's, which its network reads; nnU-Net's
    scipy one with thick slices picked first), else nothing (the non-zero mask, which inference
    never reads)."""
    if not configuration.previous_stage_name:
        return _keep_seg
    if configuration.configuration["resampling_fn_seg"] == SCIPY:
        return partial(scipy_by_channel, kwargs=configuration.configuration["resampling_fn_seg_kwargs"])
    return planned


class PlannedResampling(ConfigurationManager):
    """The plans' configuration with the plans' resampling, thick slices resampled in bounded
    memory (identical values: ``tests/backends/test_resampling.py``) and the unused mask left alone.
    Where the plans name nnU-Net's torch resampling (``*_torchres`` plans), torch's thread
    count is left as the caller set it: that function sets it for the whole process, to 4
    unless told, which threads running at once could leave changed."""

    @property
    def resampling_fn_data(self) -> Resample:
        kwargs = self.configuration["resampling_fn_data_kwargs"]
        if self.configuration["resampling_fn_data"] == TORCH:
            return _torch(kwargs)
        if self.configuration["resampling_fn_data"] == SCIPY:
            return partial(scipy_by_channel, kwargs=kwargs)
        return super().resampling_fn_data

    @property
    def resampling_fn_seg(self) -> Resample:
        return _seg_function(self, super().resampling_fn_seg)

    @property
    def resampling_fn_probabilities(self) -> Resample:
        if self.configuration["resampling_fn_probabilities"] == TORCH:
            return _torch(self.configuration["resampling_fn_probabilities_kwargs"])
        return super().resampling_fn_probabilities


class TorchResampling(ConfigurationManager):
    """The plans' configuration with nnU-Net's ``resample_torch_fornnunet`` for the image and
    the logits, whatever the plans name, with :data:`TORCH_KWARGS` and torch's thread count
    left as the caller set it."""

    @property
    def resampling_fn_data(self) -> Resample:
        return _torch({"is_seg": False, **TORCH_KWARGS})

    @property
    def resampling_fn_seg(self) -> Resample:
        return _seg_function(self, super().resampling_fn_seg)

    @property
    def resampling_fn_probabilities(self) -> Resample:
        return _torch({"is_seg": False, **TORCH_KWARGS})


def _torch(kwargs: dict[str, Any]) -> Resample:
    return partial(torch_slices_first, **{**kwargs, "num_threads": torch.get_num_threads()})


def probabilities_function(configuration: ConfigurationManager) -> str:
    """The name of the function that resamples the logits under ``configuration``."""
    if isinstance(configuration, TorchResampling):
        return TORCH
    return str(configuration.configuration["resampling_fn_probabilities"])


def cropped_labels(
    logits: Any,
    plans: PlansManager,
    configuration: ConfigurationManager,
    label_manager: LabelManager,
    properties: dict[str, Any],
    device: torch.device | None = None,
) -> np.ndarray:
    """The label map on the cropped source grid (model axes), one class at a time.

    ``logits``: (classes, z, y, x) float16, a tensor or an array. With ``device`` (torch
    resampling only), the logits are moved there and only the labels come back.
    """
    name = probabilities_function(configuration)
    if label_manager.has_regions or name not in (SCIPY, TORCH):  # nnU-Net's own, all classes at once
        return _nnunet_whole(logits, plans, configuration, label_manager, properties)
    shape, model, source = _grids(plans, configuration, properties)
    if name == TORCH:
        tensor = torch.as_tensor(logits)
        tensor = tensor.to(device) if device is not None else tensor
        fn = configuration.resampling_fn_probabilities
        return _argmax_by_channel(
            tensor.shape[0],
            lambda c: fn(tensor[c : c + 1], shape, model, source, device=tensor.device)[0],
            torch_tensors=True,
        )
    array = logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
    kwargs = configuration.configuration["resampling_fn_probabilities_kwargs"]
    return _argmax_by_channel(
        len(array), lambda c: scipy_by_channel(array[c : c + 1], shape, model, source, kwargs=kwargs)[0]
    )


def cropped_probabilities(
    logits: Any,
    plans: PlansManager,
    configuration: ConfigurationManager,
    label_manager: LabelManager,
    properties: dict[str, Any],
) -> np.ndarray:
    """The probabilities on the cropped source grid (model axes), float32, as nnU-Net's
    ``convert_predicted_logits_to_segmentation_with_correct_shape(return_probabilities=True)``
    makes them before it uncrops them: the logits resampled one class at a time into one array
    (both resampling functions treat each channel alone: the same values), then the model's
    inference nonlinearity (softmax, or sigmoid for regions) on all classes at once, in torch
    as nnU-Net applies it. An ensemble averages these (:mod:`asyncflow.backends.ensemble`)."""
    name = probabilities_function(configuration)
    shape, model, source = _grids(plans, configuration, properties)
    resampled: Any
    if name == TORCH:
        tensor = torch.as_tensor(logits)
        fn = configuration.resampling_fn_probabilities
        first = fn(tensor[0:1], shape, model, source)
        resampled = torch.empty((tensor.shape[0], *shape), dtype=first.dtype)
        resampled[0] = first[0]
        del first
        for c in range(1, tensor.shape[0]):
            resampled[c] = fn(tensor[c : c + 1], shape, model, source)[0]
    elif name == SCIPY:
        array = logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
        kwargs = configuration.configuration["resampling_fn_probabilities_kwargs"]
        resampled = np.empty((len(array), *shape), dtype=array.dtype)
        for c in range(len(array)):
            resampled[c] = scipy_by_channel(array[c : c + 1], shape, model, source, kwargs=kwargs)[0]
    else:  # a resampling function not known to work channel by channel: all classes at once
        resampled = configuration.resampling_fn_probabilities(torch.as_tensor(logits), shape, model, source)
    probabilities = label_manager.apply_inference_nonlin(resampled)
    del resampled
    return np.asarray(probabilities.numpy() if isinstance(probabilities, torch.Tensor) else probabilities)


def _grids(
    plans: PlansManager, configuration: ConfigurationManager, properties: dict[str, Any]
) -> tuple[list[int], list[float], list[float]]:
    """The cropped source grid's shape, the model's spacing and the source's (model axes)."""
    shape = [int(n) for n in properties["shape_after_cropping_and_before_resampling"]]
    source = [properties["spacing"][i] for i in plans.transpose_forward]
    model = list(configuration.spacing)
    if len(model) < len(shape):  # 2D configurations keep the slice spacing
        model = [source[0], *model]
    return shape, model, source


def uncropped(
    labels: np.ndarray, plans: PlansManager, label_manager: LabelManager, properties: dict[str, Any]
) -> np.ndarray:
    """The cropped label map put back into the whole image and onto the reader's axes, as nnU-Net does."""
    dtype = np.uint8 if len(label_manager.foreground_labels) < 255 else np.uint16
    whole = np.zeros(properties["shape_before_cropping"], dtype=dtype)
    whole = insert_crop_into_image(whole, labels, properties["bbox_used_for_cropping"])
    return np.asarray(whole).transpose(plans.transpose_backward)


def _nnunet_whole(
    logits: Any,
    plans: PlansManager,
    configuration: ConfigurationManager,
    label_manager: LabelManager,
    properties: dict[str, Any],
) -> np.ndarray:
    """nnU-Net's own conversion, cropped again (its uncropping is :func:`uncropped`'s)."""
    whole = convert_predicted_logits_to_segmentation_with_correct_shape(
        torch.as_tensor(logits).cpu(),
        plans,
        configuration,
        label_manager,
        properties,
        # torch's thread count is process-wide: keep the one the prediction worker runs with.
        num_threads_torch=torch.get_num_threads(),
    )
    box = properties["bbox_used_for_cropping"]
    transposed = np.asarray(whole).transpose(plans.transpose_forward)
    return transposed[tuple(slice(a, b) for a, b in box)]


def _argmax_by_channel(
    classes: int, channel: Callable[[int], Any], torch_tensors: bool = False
) -> np.ndarray:
    """``argmax(0)`` of the stacked channels, holding one channel and the best so far."""
    first = channel(0)  # may be the logits themselves, where no resampling was needed
    best: Any = first.clone() if torch_tensors else first.copy()
    labels: Any
    del first
    if torch_tensors:
        dtype = torch.uint8 if classes <= 255 else torch.int32
        labels = torch.zeros(best.shape, dtype=dtype, device=best.device)
    else:
        labels = np.zeros(best.shape, dtype=np.uint8 if classes <= 255 else np.uint16)
    for c in range(1, classes):
        values = channel(c)
        larger = values > best
        labels[larger] = c
        if torch_tensors:
            torch.maximum(best, values, out=best)
        else:
            np.maximum(best, values, out=best)
        del values, larger
    if torch_tensors:
        return np.asarray(labels.cpu().numpy(), dtype=np.uint8 if classes <= 255 else np.uint16)
    return labels


def picks_slices(
    configuration: ConfigurationManager,
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    shape: Sequence[int],
    new_shape: Sequence[int],
) -> bool:
    """Whether ``configuration`` resamples an image of ``shape`` to ``new_shape`` by picking
    whole slices along a coarse axis (the bounded path of :class:`PlannedResampling`)."""
    if (
        not isinstance(configuration, PlannedResampling)
        or configuration.configuration["resampling_fn_data"] != SCIPY
    ):
        return False
    options = {**SCIPY_DEFAULTS, **configuration.configuration["resampling_fn_data_kwargs"]}
    return picked_axis(options, current_spacing, new_spacing, shape, new_shape) is not None


def seg_resampling_bytes(
    configuration: ConfigurationManager,
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    shape: Sequence[int],
    new_shape: Sequence[int],
    labels: int,
) -> int:
    """At most what resampling a cascade's previous-stage segmentation (float32, of ``shape``,
    ``labels`` values with the background) to ``new_shape`` allocates, its float32 result
    included. nnU-Net's scipy function (what :func:`_seg_function` runs): through
    batchgenerators' ``resize_segmentation``, each label's indicator in float64 on the whole
    volume, a running float64 best and a few boolean maps of the output; or thick slices picked
    first, one slice at a time. Measured with tracemalloc on CT series of 512 x 512 x 80-230
    (3.32 and 3.80 GB against 3.79 and 4.42 estimated, whole volume; 0.44 against 0.85, slices
    picked: ``benchmarks/cascade_memory.py``). nnU-Net's torch function: bounded by the arrays
    its code makes (float16 scores of every label, an int64 argmax), not measured."""
    n, m = math.prod(shape), math.prod(new_shape)
    if list(shape) == list(new_shape):
        return 0
    if configuration.configuration["resampling_fn_seg"] != SCIPY:
        return (4 * labels + 16) * m + 10 * n
    options = {**SCIPY_DEFAULTS, **configuration.configuration["resampling_fn_seg_kwargs"]}
    if picked_axis(options, current_spacing, new_spacing, shape, new_shape) is not None:
        return 8 * m
    return 36 * m + 16 * n

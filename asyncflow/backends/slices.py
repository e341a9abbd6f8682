"""Thick slices picked before they are resized: nnU-Net's resampling along a coarse axis, in
less work and memory, with nnU-Net's values.

Where nnU-Net resamples a coarse axis on its own with nearest slices (its "separate z" path:
each slice resized in plane, then whole slices copied along the axis), the slices it copies
can be known first, from the same coordinates and rounding. :func:`scipy_by_channel` does so
for nnU-Net's scipy ``resample_data_or_seg_to_shape`` (an image, or a segmentation through
``resize_segmentation``), instead of building three float64 coordinate grids of the output's
size; :func:`torch_slices_first` for its ``resample_torch_fornnunet`` on the way back to
fewer slices. :mod:`asyncflow.backends.resampling` chooses where they run.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from batchgenerators.augmentations.utils import resize_segmentation
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.preprocessing.resampling.default_resampling import (
    determine_do_sep_z_and_axis,
    resample_data_or_seg,
    resample_data_or_seg_to_shape,
)
from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet
from scipy.ndimage import map_coordinates
from skimage.transform import resize
from torch.nn import functional as F

__all__ = ["SCIPY_DEFAULTS", "picked_axis", "scipy_by_channel", "torch_slices_first"]


def picked_axis(
    options: dict[str, Any],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    shape: Sequence[int],
    new_shape: Sequence[int],
) -> int | None:
    """The coarse axis along which nnU-Net copies whole slices (order_z 0), if it does."""
    separate, axis = determine_do_sep_z_and_axis(
        options["force_separate_z"], current_spacing, new_spacing, options["separate_z_anisotropy_threshold"]
    )
    if not separate or axis is None or options["order_z"] != 0:
        return None
    return int(axis) if shape[axis] != new_shape[axis] else None


def scipy_by_channel(
    data: np.ndarray | torch.Tensor,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    kwargs: dict[str, Any],
) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape``, each channel alone, thick slices picked before
    they are resized (a segmentation's by nnU-Net's ``resize_segmentation``, as it does)."""
    options = {**SCIPY_DEFAULTS, **kwargs}
    data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    shape, new_shape = data.shape[1:], [int(n) for n in new_shape]
    if list(shape) == new_shape:
        return data
    order, order_z = options["order"], options["order_z"]
    out = np.zeros((len(data), *new_shape), dtype=data.dtype)
    axis = picked_axis(options, current_spacing, new_spacing, shape, new_shape)
    if axis is None:
        separate, nn_axis = determine_do_sep_z_and_axis(
            options["force_separate_z"],
            current_spacing,
            new_spacing,
            options["separate_z_anisotropy_threshold"],
        )
        for c in range(len(data)):
            out[c] = resample_data_or_seg(
                data[c : c + 1], new_shape, options["is_seg"], nn_axis, order, separate, order_z=order_z
            )[0]
        return out
    # nnU-Net's coordinates along the coarse axis (its map_rows/map_cols/map_dims), rounded
    # to a slice as its order-0 map_coordinates rounds them.
    scale = float(shape[axis]) / new_shape[axis]
    coordinates = scale * (np.arange(new_shape[axis]) + 0.5) - 0.5
    ramp = np.arange(shape[axis], dtype=float)
    picked = map_coordinates(ramp, coordinates[None], order=0, mode="nearest").astype(int)
    in_plane = [n for i, n in enumerate(new_shape) if i != axis]
    for c in range(len(data)):
        last, resized = -1, None
        for k, s in enumerate(picked):
            if s != last:  # consecutive output slices often copy the same slice
                plane = np.take(data[c], s, axis=axis).astype(float)
                last, resized = (
                    s,
                    (
                        resize_segmentation(plane, in_plane, order)
                        if options["is_seg"]
                        else resize(plane, in_plane, order, mode="edge", anti_aliasing=False)
                    ),
                )
            index: list[Any] = [c, slice(None), slice(None), slice(None)]
            index[axis + 1] = k
            out[tuple(index)] = resized
    return out


SCIPY_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(resample_data_or_seg_to_shape).parameters.items()
    if p.default is not inspect.Parameter.empty
} | {"separate_z_anisotropy_threshold": ANISO_THRESHOLD}


def torch_slices_first(
    data: np.ndarray | torch.Tensor,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    **kwargs: Any,
) -> np.ndarray | torch.Tensor:
    """nnU-Net's ``resample_torch_fornnunet``, cheaper on the way back to thick slices. Where it
    resamples a coarse axis on its own (each slice resized in plane, then slices picked with
    ``nearest-exact``) and the output has fewer slices along it, the slices it would keep are
    picked first, by torch's own ``nearest-exact`` on their indices, and only those are resized
    (0.17 against 0.03 CPU-s per class for 300 model slices of 300 x 300 back to 60 here).
    Resizing in plane treats each slice alone, and picking among slices already of the output's
    size is the identity, so the values are nnU-Net's: the same tensor on planes of 64 x 64 and
    512 x 512 as measured; on some small planes torch's CPU kernel rounds the planes left over
    after its groups of eight differently (a few float32 roundings, ``tests/backends/
    test_resampling.py``), which can change a label only where two classes tie within them."""
    separate, axis = determine_do_sep_z_and_axis(
        kwargs.get("force_separate_z"),
        current_spacing,
        new_spacing,
        kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD),
    )
    picking = kwargs.get("aniso_axis_mode", "nearest-exact") == "nearest-exact" and not kwargs.get("is_seg")
    if separate and picking and axis is not None and len(np.atleast_1d(axis)) == 1:
        along = int(np.atleast_1d(axis)[0]) + 1  # the channel axis comes first
        count, new_count = data.shape[along], int(new_shape[along - 1])
        if new_count < count:
            positions = torch.arange(count, dtype=torch.float32)[None, None]
            kept = F.interpolate(positions, size=new_count, mode="nearest-exact")[0, 0].long()
            if isinstance(data, np.ndarray):
                data = np.take(data, kept.numpy(), axis=along)
            else:
                data = data.index_select(along, kept.to(data.device))
    return resample_torch_fornnunet(data, new_shape, current_spacing, new_spacing, **kwargs)

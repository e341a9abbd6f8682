"""A dataset's results folder as nnU-Net leaves it after ``nnUNetv2_find_best_configuration``,
built from the tiny model (tests of ensembles and postprocessing).

``nnUNet_results/Dataset999_AsyncflowTiny/`` holds three configurations of one dataset in one
``plans.json``, each in its own ``nnUNetTrainer__nnUNetPlans__<configuration>`` folder:

- ``3d_fullres``: the tiny model itself (1 mm);
- ``3d_lowres``: the same network at 1.6 mm, its weights perturbed (another network);
- ``2d``: the tiny model's network made 2D (each 3D kernel summed over its first axis, so it
  still finds the phantom's organs slice by slice), built by nnU-Net's own network factory;
- ``3d_cascade_fullres``: the second stage of a cascade after ``3d_lowres`` (``previous_stage``
  in the plans): nnU-Net's own network with one input channel per foreground label more (the
  previous stage's segmentation, one-hot), the tiny model's weights for the image and random
  ones for those channels, so that the first stage's label map changes what it finds.

``inference_information.json`` names the ``3d_fullres`` + ``3d_lowres`` ensemble as
``find_best_configuration`` writes it (absolute paths of the machine that "trained" it), and its
``postprocessing.pkl``/``.json`` (keep the largest component of all foreground, then of label 2)
are written with nnU-Net's own ``save_pickle`` of its own function, and ``save_json``.

:func:`make_v1_cascade` builds an nnU-Net v1 cascade from the tiny v1 model the same way.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

DATASET = "Dataset999_AsyncflowTiny"
PREFIX = "nnUNetTrainer__nnUNetPlans__"
ENSEMBLE = f"ensemble___{PREFIX}3d_fullres___{PREFIX}3d_lowres___0"
POSTPROCESSING = (
    ("remove_all_but_largest_component_from_segmentation", {"labels_or_regions": [1, 2]}),
    ("remove_all_but_largest_component_from_segmentation", {"labels_or_regions": 2}),
)


def _plans(tiny: Path) -> dict[str, Any]:
    plans = json.loads((tiny / "plans.json").read_text())
    fullres = plans["configurations"]["3d_fullres"]
    lowres = copy.deepcopy(fullres)
    lowres["spacing"] = [1.6, 1.6, 1.6]
    lowres["data_identifier"] = "nnUNetPlans_3d_lowres"
    two_d = copy.deepcopy(fullres)
    two_d["data_identifier"] = "nnUNetPlans_2d"
    two_d["spacing"] = fullres["spacing"][1:]
    two_d["patch_size"] = fullres["patch_size"][1:]
    two_d["median_image_size_in_voxels"] = fullres["median_image_size_in_voxels"][1:]
    arch = two_d["architecture"]["arch_kwargs"]
    arch["conv_op"] = "torch.nn.modules.conv.Conv2d"
    arch["norm_op"] = "torch.nn.modules.instancenorm.InstanceNorm2d"
    arch["kernel_sizes"] = [k[1:] for k in arch["kernel_sizes"]]
    arch["strides"] = [s[1:] for s in arch["strides"]]
    lowres["next_stage"] = "3d_cascade_fullres"
    cascade = copy.deepcopy(fullres)
    cascade["data_identifier"] = "nnUNetPlans_3d_cascade_fullres"
    cascade["previous_stage"] = "3d_lowres"
    plans["configurations"] = {
        "2d": two_d,
        "3d_fullres": fullres,
        "3d_lowres": lowres,
        "3d_cascade_fullres": cascade,
    }
    return plans


def _checkpoint(tiny: Path, configuration: str, plans: dict[str, Any], dataset: dict[str, Any]) -> dict:
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    checkpoint = torch.load(tiny / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    generator = torch.Generator().manual_seed(20261206)
    if configuration == "3d_lowres":
        weights = {
            k: v * (1 + 0.15 * torch.randn(v.shape, generator=generator)) if v.is_floating_point() else v
            for k, v in weights.items()
        }
    elif configuration == "2d":
        flat = {}
        for name, value in weights.items():
            if value.dim() == 5:  # transposed convolutions copy, convolutions sum over the slices
                value = value.mean(2) if "transpconvs" in name else value.sum(2)
            flat[name] = value
        config = plans["configurations"]["2d"]["architecture"]
        network = get_network_from_plans(
            config["network_class_name"],
            config["arch_kwargs"],
            config["_kw_requires_import"],
            len(dataset["channel_names"]),
            len(dataset["labels"]),
            allow_init=True,
            deep_supervision=False,
        )
        network.load_state_dict(flat)  # strict: every weight of nnU-Net's own 2D network
        weights = network.state_dict()
        checkpoint["inference_allowed_mirroring_axes"] = (0, 1)
    elif configuration == "3d_cascade_fullres":
        config = plans["configurations"][configuration]["architecture"]
        channels = len(dataset["channel_names"]) + len(dataset["labels"]) - 1  # + one-hot foreground
        network = get_network_from_plans(
            config["network_class_name"],
            config["arch_kwargs"],
            config["_kw_requires_import"],
            channels,
            len(dataset["labels"]),
            allow_init=True,
            deep_supervision=False,
        )
        wider = {}
        for name, value in network.state_dict().items():
            tiny_value = weights[name]
            if value.shape != tiny_value.shape:  # the first convolution reads the extra channels
                extra = 0.5 * tiny_value.abs().mean() * torch.randn(value[:, 1:].shape, generator=generator)
                tiny_value = torch.cat([tiny_value, extra], dim=1)
            wider[name] = tiny_value
        network.load_state_dict(wider)  # strict: every weight of nnU-Net's own cascade network
        weights = network.state_dict()
    return {**checkpoint, "network_weights": weights, "init_args": {"configuration": configuration}}


def make_results(root: Path, tiny: Path) -> Path:
    """``root/nnUNet_results/Dataset999_AsyncflowTiny`` as described above; returns that folder."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import save_json, save_pickle
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation,
    )

    folder = root / "nnUNet_results" / DATASET
    plans = _plans(tiny)
    dataset = json.loads((tiny / "dataset.json").read_text())
    for configuration in ("3d_fullres", "3d_lowres", "2d", "3d_cascade_fullres"):
        model = folder / f"{PREFIX}{configuration}"
        (model / "fold_0").mkdir(parents=True)
        (model / "plans.json").write_text(json.dumps(plans, indent=1))
        shutil.copy(tiny / "dataset.json", model / "dataset.json")
        torch.save(
            _checkpoint(tiny, configuration, plans, dataset), model / "fold_0" / "checkpoint_final.pth"
        )

    chosen = folder / "ensembles" / ENSEMBLE
    chosen.mkdir(parents=True)
    functions = [remove_all_but_largest_component_from_segmentation for _ in POSTPROCESSING]
    save_pickle((functions, [kwargs for _, kwargs in POSTPROCESSING]), str(chosen / "postprocessing.pkl"))
    save_json(
        {
            "postprocessing_fns": [name for name, _ in POSTPROCESSING],
            "postprocessing_kwargs": [kwargs for _, kwargs in POSTPROCESSING],
        },
        str(chosen / "postprocessing.json"),
    )
    trained_at = Path("/home/trainer/nnUNet_results") / DATASET  # as the training machine wrote it
    information = {
        "folds": [0],
        "dataset_name_or_id": DATASET,
        "best_model_or_ensemble": {
            "postprocessing_file": str(trained_at / "ensembles" / ENSEMBLE / "postprocessing.pkl"),
            "some_plans_file": str(trained_at / "ensembles" / ENSEMBLE / "plans.json"),
            "selected_model_or_models": [
                {"configuration": c, "trainer": "nnUNetTrainer", "plans_identifier": "nnUNetPlans"}
                for c in ("3d_fullres", "3d_lowres")
            ],
        },
    }
    save_json(information, str(folder / "inference_information.json"))
    return folder


V1_TASK = "Task998_AsyncflowTiny"
V1_PLANS = "nnUNetPlansv2.1"
V1_CASCADE_TRAINER = "nnUNetTrainerV2CascadeFullRes"


def make_v1_cascade(root: Path, tiny_v1: Path) -> Path:
    """A v1 RESULTS_FOLDER under ``root`` with a cascade made from the tiny v1 model (whose
    ``RESULTS_FOLDER`` is ``tiny_v1``), laid out as v1's training leaves it:
    ``nnUNet/3d_lowres/<task>/nnUNetTrainerV2__<plans>`` (stage 0 of two-stage plans, 1.6 mm, the
    tiny network's weights perturbed) and ``nnUNet/3d_cascade_fullres/<task>/
    nnUNetTrainerV2CascadeFullRes__<plans>`` (stage 1, 1 mm; v1's own cascade trainer, whose
    network reads the previous stage's one-hot foreground beside the image: the tiny weights for
    the image, random ones for those channels). Returns the RESULTS_FOLDER."""
    import pickle

    import numpy as np
    import torch

    tiny = tiny_v1 / "nnUNet" / "3d_fullres" / V1_TASK / f"nnUNetTrainerV2__{V1_PLANS}"
    with (tiny / "fold_0" / "model_final_checkpoint.model.pkl").open("rb") as f:
        info = pickle.load(f)  # the repository's own file
    plans = copy.deepcopy(info["plans"])
    fullres = plans["plans_per_stage"][0]
    lowres = copy.deepcopy(fullres)
    lowres["current_spacing"] = np.array([1.6, 1.6, 1.6])
    plans["plans_per_stage"] = {0: lowres, 1: fullres}
    plans["num_stages"] = 2
    checkpoint = torch.load(
        tiny / "fold_0" / "model_final_checkpoint.model", map_location="cpu", weights_only=False
    )
    generator = torch.Generator().manual_seed(20261207)
    classes = len(plans["all_classes"]) + 1
    results = root / "v1_results"
    for configuration, trainer, stage in (
        ("3d_lowres", "nnUNetTrainerV2", 0),
        ("3d_cascade_fullres", V1_CASCADE_TRAINER, 1),
    ):
        model = results / "nnUNet" / configuration / V1_TASK / f"{trainer}__{V1_PLANS}"
        (model / "fold_0").mkdir(parents=True)
        with (model / "plans.pkl").open("wb") as f:
            pickle.dump(plans, f)
        shutil.copy(tiny / "dataset.json", model / "dataset.json")
        init = list(info["init"])
        init[5] = stage
        weights = dict(checkpoint["state_dict"])
        if stage == 0:
            weights = {
                k: v * (1 + 0.15 * torch.randn(v.shape, generator=generator)) for k, v in weights.items()
            }
        else:
            init.insert(8, "nnUNetTrainerV2")  # the cascade trainer's previous_trainer
            first = "conv_blocks_context.0.blocks.0.conv.weight"
            image = weights[first]
            extra = (
                0.5
                * image.abs().mean()
                * torch.randn((image.shape[0], classes - 1, *image.shape[2:]), generator=generator)
            )
            weights[first] = torch.cat([image, extra], dim=1)
        stored = {**info, "init": tuple(init), "name": trainer, "plans": plans}
        with (model / "fold_0" / "model_final_checkpoint.model.pkl").open("wb") as f:
            pickle.dump(stored, f)
        torch.save({**checkpoint, "state_dict": weights}, model / "fold_0" / "model_final_checkpoint.model")
    return results

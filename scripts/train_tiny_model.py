"""Train the tiny real nnU-Net v2 model that ships with asyncflow.

The model is small on purpose (a 3-stage U-Net with 8/16/32 features), trained
on synthetic phantoms from :mod:`asyncflow.cli.synthetic` on the CPU in about a
minute. It is the demo model and the test model: everything around it is stock
nnU-Net v2, so ``nnUNetPredictor`` loads and runs it like any other model.

Steps, all with nnU-Net's own code where nnU-Net has code for it:

1. write a raw dataset (``imagesTr``/``labelsTr``/``dataset.json``, channel "CT");
2. nnU-Net's fingerprint extraction and default experiment planner;
3. shrink the ``3d_fullres`` configuration to the tiny network (64^3 inference patch);
4. nnU-Net's ``DefaultPreprocessor`` on every training case (CT normalisation);
5. a short deterministic training loop (Adam with polynomial decay, Dice +
   cross-entropy, 32^3 patches with foreground oversampling, no augmentation) on the network that ``nnUNetTrainer`` builds from the plans;
6. a weights-only checkpoint (``trainer_name='nnUNetTrainer'``), then held-out
   Dice through ``nnUNetPredictor``.

Usage: ``python scripts/train_tiny_model.py [--output asyncflow/models/tiny]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEED = 20261127
N_TRAIN = 16
N_HELD_OUT = 4
SHAPE = (64, 64, 64)
PATCH = 32
EPOCHS = 25
ITERATIONS = 20
BATCH = 2
LEARNING_RATE = 3e-3
DATASET_ID = 999
DATASET_NAME = f"Dataset{DATASET_ID}_AsyncflowTiny"
LABELS = {"background": 0, "liver": 1, "tumor": 2}


def _write_raw_dataset(raw: Path, phantoms: list) -> None:
    import SimpleITK as sitk

    folder = raw / DATASET_NAME
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i, ph in enumerate(phantoms):
        for array, path in (
            (ph.image, folder / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz"),
            (ph.labels, folder / "labelsTr" / f"tiny_{i:03d}.nii.gz"),
        ):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(ph.spacing)
            image.SetOrigin(ph.origin)
            sitk.WriteImage(image, str(path), useCompression=True)
    dataset = {
        "name": "AsyncflowTiny",
        "description": "asyncflow's tiny demo/test model trained on synthetic phantoms",
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": len(phantoms),
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


def _tiny_plans(plans: dict) -> dict:
    """Keep the planner's 3d_fullres preprocessing, shrink its network."""
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"] = list(SHAPE)
    config["batch_size"] = BATCH
    arch = config["architecture"]["arch_kwargs"]
    arch.update(
        n_stages=3,
        features_per_stage=[8, 16, 32],
        kernel_sizes=[[3, 3, 3]] * 3,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        n_conv_per_stage=[2, 2, 2],
        n_conv_per_stage_decoder=[2, 2],
    )
    plans["configurations"] = {"3d_fullres": config}
    return plans


def _patch_corner(rng: np.random.Generator, seg: np.ndarray, foreground: bool) -> tuple[int, ...]:
    """A random patch corner; with ``foreground`` the patch holds a voxel of a random label.

    Like nnU-Net's foreground oversampling, this lets the small tumour label be seen often."""
    if foreground:
        label = int(rng.integers(1, len(LABELS)))
        voxels = np.argwhere(seg == label)
        if len(voxels):
            centre = voxels[int(rng.integers(len(voxels)))]
            return tuple(
                int(np.clip(c - PATCH // 2 + rng.integers(-PATCH // 4, PATCH // 4 + 1), 0, s - PATCH))
                for c, s in zip(centre, seg.shape, strict=True)
            )
    return tuple(int(rng.integers(0, s - PATCH + 1)) for s in seg.shape)


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    denominator = x.sum() + y.sum()
    return float(2.0 * (x & y).sum() / denominator) if denominator else 1.0


def fit(network, images: list, segs: list, rng: np.random.Generator) -> list[float]:
    """The short training loop both tiny models share; returns the mean loss of each epoch.

    Adam with nnU-Net's polynomial learning-rate decay, Dice + cross-entropy,
    ``PATCH``^3 patches, every second one holding foreground, no augmentation.
    ``images`` are (channels, z, y, x) float tensors, ``segs`` (z, y, x) int64 tensors.
    """
    import torch

    optimiser = torch.optim.Adam(network.parameters(), lr=LEARNING_RATE)
    cross_entropy = torch.nn.CrossEntropyLoss()
    n_classes = len(LABELS)
    network.train()
    epoch_losses = []
    for epoch in range(EPOCHS):
        for group in optimiser.param_groups:  # nnU-Net's polynomial learning-rate decay
            group["lr"] = LEARNING_RATE * (1 - epoch / EPOCHS) ** 0.9
        losses = []
        for _ in range(ITERATIONS):
            batch_x, batch_y = [], []
            for b in range(BATCH):
                i = int(rng.integers(len(images)))
                z, y, x = _patch_corner(rng, segs[i].numpy(), foreground=b % 2 == 1)
                batch_x.append(images[i][:, z : z + PATCH, y : y + PATCH, x : x + PATCH])
                batch_y.append(segs[i][z : z + PATCH, y : y + PATCH, x : x + PATCH])
            inputs, target = torch.stack(batch_x), torch.stack(batch_y)
            logits = network(inputs)
            probabilities = logits.softmax(1)
            one_hot = torch.nn.functional.one_hot(target, n_classes).permute(0, 4, 1, 2, 3)
            dims = (0, 2, 3, 4)
            intersection = (probabilities * one_hot).sum(dims)
            soft_dice = (2 * intersection + 1e-5) / (probabilities.sum(dims) + one_hot.sum(dims) + 1e-5)
            loss = cross_entropy(logits, target) + (1 - soft_dice[1:].mean())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        epoch_losses.append(float(np.mean(losses)))
        print(f"epoch {epoch + 1:2d}/{EPOCHS}  loss {epoch_losses[-1]:.4f}", flush=True)
    return epoch_losses


def train(output: Path) -> dict:
    torch_threads = 1
    os.environ.setdefault("OMP_NUM_THREADS", str(torch_threads))
    os.environ["nnUNet_def_n_proc"] = "1"
    work = Path(tempfile.mkdtemp(prefix="asyncflow-train-"))
    try:
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ[name] = str(work / name)
            (work / name).mkdir()
        # nnU-Net reads its folders at import time: import it only now.
        import torch
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprint_dataset,
            plan_experiment_dataset,
        )
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from asyncflow.cli.synthetic import make_phantom

        torch.set_num_threads(torch_threads)
        torch.manual_seed(SEED)
        torch.use_deterministic_algorithms(True)
        rng = np.random.default_rng(SEED)
        phantoms = [make_phantom(rng, SHAPE) for _ in range(N_TRAIN + N_HELD_OUT)]
        train_set, held_out = phantoms[:N_TRAIN], phantoms[N_TRAIN:]

        _write_raw_dataset(work / "nnUNet_raw", train_set)
        extract_fingerprint_dataset(DATASET_ID, num_processes=1, check_dataset_integrity=True)
        plan_experiment_dataset(DATASET_ID)
        preprocessed = work / "nnUNet_preprocessed" / DATASET_NAME
        plans = _tiny_plans(json.loads((preprocessed / "nnUNetPlans.json").read_text()))
        dataset_json = json.loads((preprocessed / "dataset.json").read_text())
        plans_manager = PlansManager(plans)
        configuration = plans_manager.get_configuration("3d_fullres")

        preprocessor = DefaultPreprocessor(verbose=False)
        images, segs = [], []
        for ph in train_set:
            data, seg, _ = preprocessor.run_case_npy(
                ph.image[None].astype(np.float32),
                ph.labels[None].astype(np.int16),
                {"spacing": list(reversed(ph.spacing))},
                plans_manager,
                configuration,
                dataset_json,
            )
            images.append(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)))
            # The preprocessor marks voxels outside the non-zero mask with -1: background.
            segs.append(torch.from_numpy(np.ascontiguousarray(np.maximum(seg[0], 0), dtype=np.int64)))

        network = nnUNetTrainer.build_network_architecture(
            plans_manager, configuration, 1, len(LABELS), enable_deep_supervision=False
        )
        started = time.perf_counter()
        fit(network, images, segs, rng)
        train_s = time.perf_counter() - started

        fold = output / "fold_0"
        if output.exists():
            shutil.rmtree(output)
        fold.mkdir(parents=True)
        checkpoint = {
            "network_weights": network.state_dict(),
            "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": "3d_fullres"},
            "inference_allowed_mirroring_axes": (0, 1, 2),
        }
        torch.save(checkpoint, fold / "checkpoint_final.pth")
        (output / "plans.json").write_text(json.dumps(plans, indent=2))
        (output / "dataset.json").write_text(json.dumps(dataset_json, indent=2))

        # Held-out evaluation through the stock inference path.
        predictor = nnUNetPredictor(
            tile_step_size=0.5,
            use_mirroring=False,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(str(output), use_folds=(0,))
        scores: dict[str, list[float]] = {name: [] for name, value in LABELS.items() if value}
        for ph in held_out:
            prediction = predictor.predict_single_npy_array(
                ph.image[None].astype(np.float32), {"spacing": list(reversed(ph.spacing))}
            )
            for name in scores:
                scores[name].append(dice(prediction, ph.labels, LABELS[name]))
        summary = {
            "train_s": round(train_s, 1),
            "held_out_dice": {k: round(float(np.mean(v)), 4) for k, v in scores.items()},
            "checkpoint_bytes": (fold / "checkpoint_final.pth").stat().st_size,
        }
        (output / "training.json").write_text(
            json.dumps(
                {
                    "seed": SEED,
                    "train_volumes": N_TRAIN,
                    "held_out_volumes": N_HELD_OUT,
                    "volume_shape": list(SHAPE),
                    "train_patch": [PATCH] * 3,
                    "epochs": EPOCHS,
                    "iterations_per_epoch": ITERATIONS,
                    "batch_size": BATCH,
                    "optimiser": f"Adam lr={LEARNING_RATE}, poly decay 0.9",
                    "torch_threads": torch_threads,
                    **summary,
                },
                indent=2,
            )
            + "\n"
        )
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "asyncflow" / "models" / "tiny",
        help="model folder to write (default: the packaged demo model)",
    )
    args = parser.parse_args(argv)
    summary = train(args.output)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

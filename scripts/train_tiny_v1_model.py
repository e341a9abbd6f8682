"""Train the tiny real nnU-Net **v1** model that the v1 backend's tests run.

It is the v1 twin of ``train_tiny_model.py`` (same synthetic phantoms, same
labels, same short training loop) in the folder layout the stock
``nnUNet_predict`` command expects::

    <output>/nnUNet/3d_fullres/Task998_AsyncflowTiny/nnUNetTrainerV2__nnUNetPlansv2.1/
        plans.pkl  dataset.json  training.json
        fold_0/model_final_checkpoint.model  fold_0/model_final_checkpoint.model.pkl

so ``RESULTS_FOLDER=<output> nnUNet_predict -t Task998_AsyncflowTiny -m 3d_fullres
-f 0 -chk model_final_checkpoint`` runs it. Steps, with nnU-Net v1's own code
where it has code for it:

1. write a raw v1 task (``imagesTr``/``labelsTr``/``dataset.json``, modality "CT");
2. ``nnUNet_plan_and_preprocess`` (v1's cropping, dataset analysis,
   ``ExperimentPlanner3D_v21`` and preprocessing into ``nnUNetData_plans_v2.1_stage0``);
3. shrink the plan's network (3 stages, 8/16/32 features, 64^3 inference patch);
4. the stock ``nnUNetTrainerV2`` builds the network from the plans; the shared
   short loop of ``train_tiny_model.fit`` trains it on the preprocessed data
   (no augmentation, no deep supervision);
5. the trainer's own ``save_checkpoint`` writes the checkpoint, with the loss
   curve as numpy scalars as real v1 training leaves it (so, like a real v1
   model, it loads with torch >= 2.6 only when weights-only loading is lifted);
6. held-out Dice through the stock ``nnUNet_predict`` command.

Usage: ``python scripts/train_tiny_v1_model.py [--output asyncflow/models/tiny_v1]``
(needs ``pip install -e '.[v1]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_model import BATCH, LABELS, N_HELD_OUT, N_TRAIN, SEED, SHAPE, dice, fit

TASK_ID = 998
TASK = f"Task{TASK_ID}_AsyncflowTiny"
TRAINER = "nnUNetTrainerV2"
PLANS = "nnUNetPlansv2.1"
CHECKPOINT = "model_final_checkpoint"


def _write_nifti(array: np.ndarray, phantom, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(phantom.spacing)
    image.SetOrigin(phantom.origin)
    sitk.WriteImage(image, str(path), useCompression=True)


def _dataset_json(count: int) -> dict:
    return {
        "name": "AsyncflowTiny",
        "description": "asyncflow's tiny v1 test model trained on synthetic phantoms",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(value): name for name, value in LABELS.items()},
        "numTraining": count,
        "numTest": 0,
        "training": [
            {"image": f"./imagesTr/tiny_{i:03d}.nii.gz", "label": f"./labelsTr/tiny_{i:03d}.nii.gz"}
            for i in range(count)
        ],
        "test": [],
    }


def _write_raw_task(raw: Path, phantoms: list) -> None:
    folder = raw / "nnUNet_raw_data" / TASK
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i, ph in enumerate(phantoms):
        _write_nifti(ph.image, ph, folder / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz")
        _write_nifti(ph.labels, ph, folder / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps(_dataset_json(len(phantoms)), indent=2))


def _tiny_plans(plans: dict) -> dict:
    """Keep the planner's preprocessing (spacing, normalisation), shrink its network."""
    stages = plans["plans_per_stage"]
    assert len(stages) == 1, f"expected one stage for {SHAPE} volumes, got {len(stages)}"
    stage = stages[0]
    stage.update(
        patch_size=np.array(SHAPE),
        batch_size=BATCH,
        num_pool_per_axis=[2, 2, 2],
        pool_op_kernel_sizes=[[2, 2, 2], [2, 2, 2]],
        conv_kernel_sizes=[[3, 3, 3]] * 3,
    )
    plans["base_num_features"] = 8
    return plans


def _predict_held_out(env: dict[str, str], results: Path, held_out: list, work: Path) -> tuple[dict, float]:
    """Held-out Dice and wall time of one stock ``nnUNet_predict`` run over the held-out volumes."""
    import SimpleITK as sitk

    inputs, outputs = work / "held_out_in", work / "held_out_out"
    inputs.mkdir()
    for i, ph in enumerate(held_out):
        _write_nifti(ph.image, ph, inputs / f"held_{i:03d}_0000.nii.gz")
    command = [
        str(Path(sys.executable).with_name("nnUNet_predict")),
        *("-i", str(inputs), "-o", str(outputs), "-t", TASK, "-m", "3d_fullres"),
        *("-tr", TRAINER, "-p", PLANS, "-f", "0", "-chk", CHECKPOINT, "--disable_tta"),
        *("--num_threads_preprocessing", "1", "--num_threads_nifti_save", "1"),
    ]
    env = {**env, "RESULTS_FOLDER": str(results), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    scores: dict[str, list[float]] = {name: [] for name, value in LABELS.items() if value}
    for i, ph in enumerate(held_out):
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs / f"held_{i:03d}.nii.gz")))
        for name in scores:
            scores[name].append(dice(prediction, ph.labels, LABELS[name]))
    return {k: round(float(np.mean(v)), 4) for k, v in scores.items()}, seconds


def train(output: Path) -> dict:
    torch_threads = 1
    work = Path(tempfile.mkdtemp(prefix="asyncflow-train-v1-"))
    try:
        env = {
            **os.environ,
            "nnUNet_raw_data_base": str(work / "raw"),
            "nnUNet_preprocessed": str(work / "preprocessed"),
            "RESULTS_FOLDER": str(work / "results"),
            "OMP_NUM_THREADS": str(torch_threads),
            "nnUNet_def_n_proc": "1",
        }
        os.environ.update(env)  # nnU-Net v1 reads its folders at import time: import it only below
        import torch
        from batchgenerators.utilities.file_and_folder_operations import load_pickle, write_pickle
        from nnunet.training.network_training.nnUNetTrainerV2 import nnUNetTrainerV2

        from asyncflow.cli.synthetic import make_phantom

        torch.set_num_threads(torch_threads)
        torch.manual_seed(SEED)
        torch.use_deterministic_algorithms(True)
        rng = np.random.default_rng(SEED)
        phantoms = [make_phantom(rng, SHAPE) for _ in range(N_TRAIN + N_HELD_OUT)]
        train_set, held_out = phantoms[:N_TRAIN], phantoms[N_TRAIN:]

        _write_raw_task(work / "raw", train_set)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "nnunet.experiment_planning.nnUNet_plan_and_preprocess",
                *("-t", str(TASK_ID), "-pl2d", "None", "-tl", "1", "-tf", "1"),
                "--verify_dataset_integrity",
            ],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        preprocessed = work / "preprocessed" / TASK
        plans_file = preprocessed / f"{PLANS}_plans_3D.pkl"
        plans = _tiny_plans(load_pickle(str(plans_file)))  # the planner's own output, just written
        write_pickle(plans, str(plans_file))

        folder = work / "results" / "nnUNet" / "3d_fullres" / TASK / f"{TRAINER}__{PLANS}"
        trainer = nnUNetTrainerV2(
            str(plans_file),
            0,
            output_folder=str(folder),
            dataset_directory=str(preprocessed),
            batch_dice=True,
            stage=0,
            unpack_data=False,
            deterministic=True,
            fp16=False,
        )
        trainer.initialize(training=False)  # builds the network from the plans, loads no data
        network = trainer.network
        network.do_ds = False  # train the full-resolution output only
        images, segs = [], []
        for case in sorted((preprocessed / "nnUNetData_plans_v2.1_stage0").glob("*.npz")):
            data = np.load(case)["data"]  # image channels, then the label map (-1 outside the crop mask)
            images.append(torch.from_numpy(np.ascontiguousarray(data[:-1], dtype=np.float32)))
            segs.append(torch.from_numpy(np.ascontiguousarray(np.maximum(data[-1], 0), dtype=np.int64)))
        assert len(images) == N_TRAIN, f"{len(images)} preprocessed cases, expected {N_TRAIN}"

        started = time.perf_counter()
        losses = fit(network, images, segs, rng)
        train_s = time.perf_counter() - started

        trainer.epoch = len(losses) - 1
        trainer.all_tr_losses = [np.float64(loss) for loss in losses]  # as v1's own loop records them
        trainer.save_checkpoint(str(folder / "fold_0" / f"{CHECKPOINT}.model"), save_optimizer=False)
        shutil.copy(plans_file, folder / "plans.pkl")
        for extra in (folder / "fold_0").iterdir():  # the trainer's log file
            if not extra.name.startswith(CHECKPOINT):
                extra.unlink()
        # Label names: a v1 model folder has none of its own; asyncflow reads this file when present.
        (folder / "dataset.json").write_text(
            json.dumps(
                {k: _dataset_json(0)[k] for k in ("name", "description", "modality", "labels")}, indent=2
            )
        )

        dice_scores, predict_s = _predict_held_out(env, work / "results", held_out, work)
        summary = {
            "train_s": round(train_s, 1),
            "held_out_dice": dice_scores,
            "held_out_predict_s": round(predict_s, 1),
            "checkpoint_bytes": (folder / "fold_0" / f"{CHECKPOINT}.model").stat().st_size,
        }
        (folder / "training.json").write_text(
            json.dumps(
                {
                    "seed": SEED,
                    "train_volumes": N_TRAIN,
                    "held_out_volumes": N_HELD_OUT,
                    "volume_shape": list(SHAPE),
                    "base_num_features": plans["base_num_features"],
                    "torch_threads": torch_threads,
                    "training": "train_tiny_model.fit (shared with the v2 tiny model)",
                    **summary,
                },
                indent=2,
            )
            + "\n"
        )
        if output.exists():
            shutil.rmtree(output)
        shutil.copytree(work / "results", output)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "asyncflow" / "models" / "tiny_v1",
        help="RESULTS_FOLDER to write (default: the packaged v1 test model)",
    )
    args = parser.parse_args(argv)
    summary = train(args.output)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

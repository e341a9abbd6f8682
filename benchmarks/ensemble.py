"""An ensemble of two configurations, and a cascade: asyncflow's one request against nnU-Net's
CLI sequence.

The request of ``network_hold.py`` (``--tars`` TARs of ``--series`` synthetic CT series, 512 x
512, 0.7-0.9 mm pixels, 1-5 mm slices) against a two-configuration dataset made from the tiny
model: ``3d_fullres`` planned at 1.0 x 0.8 x 0.8 mm (as CT models are), ``3d_lowres`` at
twice that, and ``3d_cascade_fullres`` (after ``3d_lowres``) at 1.0 x 0.8 x 0.8 mm. The network is the GPU stand-in of ``fixed_service.py`` (``--service-s`` seconds
per configuration and case; every CPU step around it is the real code). Runs, each a child
process (CPU: user + system of its tree; RSS: the peak of its tree):

- ``asyncflow_one``: ``asyncflow run`` with ``3d_fullres`` alone (what the ensemble adds to);
- ``asyncflow_ensemble``: ``asyncflow run --model A --model B``, DICOM in, SEG out;
- ``nnunet_sequence``: on the same series as NIfTI, ``nnUNetv2_predict_from_modelfolder
  --save_probabilities`` per configuration (``-npp 1 -nps 1``: nnU-Net's default worker
  processes held more memory than this machine has in RESULTS-resampling.md), then
  ``nnUNetv2_ensemble -np 1``;
- ``asyncflow_cascade``: ``asyncflow run --model .../3d_cascade_fullres``;
- ``asyncflow_cascade_torch``: the same with ``--resampling torch`` (nnU-Net's torch
  resampling for the image and the logits, not voxel-identical to the CLI: see
  RESULTS-resampling.md);
- ``nnunet_cascade``: ``nnUNetv2_predict_from_modelfolder`` of ``3d_lowres``, then of
  ``3d_cascade_fullres`` with ``-prev_stage_predictions`` (``-npp 1 -nps 1``).

Usage: ``python benchmarks/ensemble.py [--tars 1 --series 2] [--out benchmarks/results-ensemble]
[--runs asyncflow_cascade,nnunet_cascade]`` (``--runs``: some of the runs above; the others'
figures already in ``--out`` are kept)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from network_hold import (  # noqa: E402
    MODEL_SPACING,
    _from_events,
    _me,
    _run,
    add_request_arguments,
    write_nifti_copies,
    write_request,
)

PREFIX = "nnUNetTrainer__nnUNetPlans__"
RUNS = (
    "asyncflow_one",
    "asyncflow_ensemble",
    "asyncflow_cascade",
    "asyncflow_cascade_torch",
    "nnunet_sequence",
    "nnunet_cascade",
)


def three_configurations(folder: Path) -> dict[str, Path]:
    """``3d_fullres`` at MODEL_SPACING, ``3d_lowres`` at twice it and ``3d_cascade_fullres`` after
    it, one plans.json, as nnU-Net lays out a dataset's results (the stand-in network makes their
    weights irrelevant: the cascade's are nnU-Net's initial ones, for its wider input)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from asyncflow.cli.synthetic import replanned_model

    fullres = replanned_model(folder / f"{PREFIX}3d_fullres", MODEL_SPACING)
    plans = json.loads((fullres / "plans.json").read_text())
    configurations = plans["configurations"]
    lowres_config = copy.deepcopy(configurations["3d_fullres"])
    lowres_config["spacing"] = [2 * s for s in MODEL_SPACING]
    lowres_config["data_identifier"] = "nnUNetPlans_3d_lowres"
    lowres_config["next_stage"] = "3d_cascade_fullres"
    configurations["3d_lowres"] = lowres_config
    cascade_config = copy.deepcopy(configurations["3d_fullres"])
    cascade_config["data_identifier"] = "nnUNetPlans_3d_cascade_fullres"
    cascade_config["previous_stage"] = "3d_lowres"
    configurations["3d_cascade_fullres"] = cascade_config
    (fullres / "plans.json").write_text(json.dumps(plans, indent=1))
    dataset = json.loads((fullres / "dataset.json").read_text())
    models = {"3d_fullres": fullres}
    for configuration in ("3d_lowres", "3d_cascade_fullres"):
        models[configuration] = folder / f"{PREFIX}{configuration}"
        shutil.copytree(fullres, models[configuration])
        checkpoint_path = models[configuration] / "fold_0" / "checkpoint_final.pth"
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        checkpoint["init_args"] = {"configuration": configuration}
        if configuration == "3d_cascade_fullres":  # one input channel more per foreground label
            architecture = cascade_config["architecture"]
            channels = len(dataset["channel_names"]) + len(dataset["labels"]) - 1
            network = get_network_from_plans(
                architecture["network_class_name"],
                architecture["arch_kwargs"],
                architecture["_kw_requires_import"],
                channels,
                len(dataset["labels"]),
                allow_init=True,
                deep_supervision=False,
            )
            checkpoint["network_weights"] = network.state_dict()
        torch.save(checkpoint, checkpoint_path)
    return models


def run_asyncflow(
    name: str, tars: list[Path], models: list[Path], scratch: Path, service_s: float, *more: str
) -> dict:
    out, log = scratch / name, scratch / f"{name}.log"
    argv = [*map(str, tars), "-o", str(out), "--device", "cpu", "--no-mirroring", "--threads", "1", *more]
    argv += ["--json-logs", "--work-dir", str(scratch / "work"), "--set", "disk_headroom=0"]
    for model in models:
        argv += ["--model", str(model)]
    measured = _run([_me("asyncflow", service_s, "run", *argv)], log)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    predicted = [e for e in events if e["event"] == "case.predicted"]
    staged = [e for e in events if e["event"] == "case.staged"]  # a cascade's step between its stages
    cases = len({e["case_id"] for e in predicted})
    return {
        **measured,
        **_from_events(events, measured),
        "hold_s_per_case": round(sum(e["duration_s"] for e in predicted) / cases, 3),
        "network_s_per_case": round(sum(e["network_s"] for e in predicted) / cases, 3),
        "staged_s_per_case": round(sum(e["duration_s"] for e in staged) / cases, 3),
    }


NNUNET_OPTIONS = ["-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1", "--disable_progress_bar"]


def _predict(nifti: Path, output: Path, model: Path, service_s: float, *options: str) -> list[str]:
    return [
        *_me("nnunet", service_s, "-i", str(nifti), "-o", str(output), "-m", str(model), "-f", "0"),
        *NNUNET_OPTIONS,
        *options,
    ]


def run_sequence(nifti: Path, models: dict[str, Path], scratch: Path, service_s: float) -> dict[str, Any]:
    outputs = {c: scratch / f"nnunet_{c}" for c in models}
    commands = [_predict(nifti, outputs[c], m, service_s, "--save_probabilities") for c, m in models.items()]
    ensemble = shutil.which("nnUNetv2_ensemble") or str(Path(sys.executable).parent / "nnUNetv2_ensemble")
    commands.append(
        [ensemble, "-i", *map(str, outputs.values()), "-o", str(scratch / "nnunet_ensemble"), "-np", "1"]
    )
    return _run(commands)


def run_cascade(nifti: Path, models: dict[str, Path], scratch: Path, service_s: float) -> dict[str, Any]:
    lowres, cascade = scratch / "nnunet_cascade_lowres", scratch / "nnunet_cascade"
    first = _predict(nifti, lowres, models["3d_lowres"], service_s)
    second = _predict(nifti, cascade, models["3d_cascade_fullres"], service_s)
    return _run([first, [*second, "-prev_stage_predictions", str(lowres)]])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        from network_hold import child_main

        kind, service_s, _, *rest = argv[1:]
        return child_main(kind, float(service_s), rest)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.add_argument("--service-s", type=float, default=2.0, help="stand-in seconds per configuration")
    parser.add_argument("--out", type=Path, default=HERE / "results-ensemble")
    parser.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated")
    args = parser.parse_args(argv)
    chosen = args.runs.split(",")
    if unknown := set(chosen) - set(RUNS):
        parser.error(f"unknown runs {sorted(unknown)}: choose among {', '.join(RUNS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="asyncflow-ensemble-"))
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, CPU only", "service_s": args.service_s}
    kept = args.out / "results.json"
    runs: dict[str, Any] = json.loads(kept.read_text())["runs"] if kept.exists() else {}
    results["runs"] = runs

    def record(name: str, value: dict[str, Any]) -> None:
        runs[name] = {**value, "measured_on": datetime.date.today().isoformat()}
        print(name, json.dumps(value), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    try:
        models = three_configurations(scratch / "Dataset999_AsyncflowTiny")
        ensemble = {c: models[c] for c in ("3d_fullres", "3d_lowres")}
        tars = write_request(
            scratch / "request", args.tars, args.series, args.matrix, np.random.default_rng(16)
        )
        record("request", {"tars": args.tars, "series": args.tars * args.series})
        ours = {
            "asyncflow_one": [models["3d_fullres"]],
            "asyncflow_ensemble": list(ensemble.values()),
            "asyncflow_cascade": [models["3d_cascade_fullres"]],
        }
        for name, chosen_models in ours.items():
            if name in chosen:
                short = name.removeprefix("asyncflow_")
                record(name, run_asyncflow(short, tars, chosen_models, scratch, args.service_s))
        if "asyncflow_cascade_torch" in chosen:  # not nnU-Net's arithmetic: RESULTS-resampling.md
            more = ("--resampling", "torch")
            cascade = ours["asyncflow_cascade"]
            run = run_asyncflow("cascade_torch", tars, cascade, scratch, args.service_s, *more)
            record("asyncflow_cascade_torch", run)
        if {"nnunet_sequence", "nnunet_cascade"} & set(chosen):
            nifti = write_nifti_copies(tars, scratch / "nifti")[0].parent
        if "nnunet_sequence" in chosen:
            record("nnunet_sequence", run_sequence(nifti, ensemble, scratch, args.service_s))
        if "nnunet_cascade" in chosen:
            record("nnunet_cascade", run_cascade(nifti, models, scratch, args.service_s))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

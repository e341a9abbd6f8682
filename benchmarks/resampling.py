"""The ``resampling`` setting side by side on real CT geometry: CPU, wall, memory, agreement.

    python benchmarks/resampling.py [--tars 4] [--series 2] [--service-s 2]
        [--agreement-matrix 512] [--parts 1,2] [--out benchmarks/results-resampling]
    python benchmarks/resampling.py --smoke --out /tmp/resampling     # seconds; CI runs this

Part 1, the GPU stand-in (``fixed_service.patch_nnunet_network``: nnU-Net's network call
sleeps S seconds and returns block-shaped logits; everything around it is the real code), on
``network_hold.py``'s request (``--tars`` TARs of ``--series`` CT series, 512 x 512, 0.7-0.9
mm pixels, 1-5 mm slices, against the tiny model replanned to 1.0 x 0.8 x 0.8 mm). Each run is
a child process (wall, CPU of its tree, peak RSS of its tree sampled every 0.2 s):

- ``whole``: nnU-Net's own functions as asyncflow called them before this setting existed
  (``convert_predicted_logits_to_segmentation_with_correct_shape`` on all classes at once,
  ``run_case_npy`` with the plans' resampling as nnU-Net builds it): the baseline;
- ``model``: the default, nnU-Net's resampling one class at a time, thick slices picked first;
- ``torch`` and ``torch-device``: nnU-Net's ``resample_torch_fornnunet``;
- each of ``whole``, ``model``, ``torch`` once more with one case at a time in nnU-Net's steps
  (``memory_budget_gb`` tiny): the peak RSS per case;
- ``nnUNetv2_predict_from_modelfolder`` on the same series as NIfTI, same stand-in.

The ``model`` and ``whole`` SEGs are compared (pixel data and frame positions): the exact
path must give the same bytes. ``torch`` against ``model``: Dice per label and the share of
differing voxels of the label maps (stand-in logits: this measures the way back only).

Part 2, agreement with the real network (``--agreement-matrix``, 0 skips it): the tiny
model replanned to 1.0 x 0.8 x 0.8 mm on two series of that matrix, 1.25 mm slices at 0.75
mm pixels and 5 mm slices at 0.85 mm pixels (nnU-Net's "separate z"), as NIfTI, with
``model`` and ``torch``: per label Dice, differing voxels, and each run's CPU seconds per step;
and each mode's Dice against the phantoms' own labels, which says whether the tiny network's
answer on that geometry means anything. ``--parts 2`` runs part 2 alone and keeps part 1's
results.

Writes ``results.json`` into ``--out``. Not a test: it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from asyncflow.cli.synthetic import make_phantom, nifti_bytes, replanned_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from network_hold import (  # noqa: E402
    MODEL_SPACING,
    _from_events,
    _run,
    add_request_arguments,
    run_nnunet_nifti,
    write_nifti_copies,
    write_request,
)

ONE_AT_A_TIME = "memory_budget_gb=1e-9"  # every case's estimate is over it: one case at a time


def child_main(kind: str, service_s: float, argv: list[str]) -> int:
    """In a child process: the stand-in network (S > 0), the baseline patched in (``whole``),
    then asyncflow's command line."""
    if service_s > 0:
        from fixed_service import patch_nnunet_network

        patch_nnunet_network(service_s)
    if kind == "whole":
        from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

        from asyncflow.backends import resampling

        resampling.PlannedResampling = ConfigurationManager  # type: ignore[misc, assignment]
        resampling.cropped_labels = _whole  # type: ignore[assignment]
    from asyncflow.cli.main import main

    return main(argv)


def _whole(
    logits: Any, plans: Any, configuration: Any, label_manager: Any, properties: Any, device: Any = None
):
    from asyncflow.backends.resampling import _nnunet_whole

    return _nnunet_whole(logits, plans, configuration, label_manager, properties)


def run(kind: str, inputs: list[Path], model: Path, out: Path, service_s: float, work: Path, *settings: str):
    log = out.with_suffix(".log")
    log.unlink(missing_ok=True)
    argv = [*map(str, inputs), "-o", str(out), "--model", str(model), "--device", "cpu", "--no-mirroring"]
    argv += ["--threads", "1", "--json-logs", "--work-dir", str(work), "--set", "disk_headroom=0"]
    for setting in settings:
        argv += ["--set", setting]
    command = [sys.executable, __file__, "--child", kind, str(service_s), "--", "run", *argv]
    measured = _run([command], log)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return {**measured, **_from_events(events, measured)}


def seg_frames(folder: Path) -> dict[str, tuple[bytes, list[Any]]]:
    """Each SEG's pixel data and frame positions, by file name."""
    import pydicom

    frames = {}
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        positions = [
            [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
            for f in ds.PerFrameFunctionalGroupsSequence
        ]
        frames[path.relative_to(folder).as_posix()] = (bytes(ds.PixelData), positions)
    return frames


def label_maps(folder: Path) -> dict[str, tuple[dict[float, np.ndarray], int]]:
    """Each output's label map as {plane position: (y, x) labels}, with the number of planes
    of its source (a SEG holds frames only where a segment is)."""
    import pydicom
    import SimpleITK as sitk

    maps = {}
    for path in sorted(folder.rglob("*.nii.gz")):
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        maps[path.relative_to(folder).as_posix()] = (
            {float(z): plane for z, plane in enumerate(array)},
            len(array),
        )
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
        planes: dict[float, np.ndarray] = {}
        for frame, group in zip(pixels, ds.PerFrameFunctionalGroupsSequence, strict=True):
            z = round(float(group.PlanePositionSequence[0].ImagePositionPatient[2]), 3)
            segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            planes.setdefault(z, np.zeros((ds.Rows, ds.Columns), np.uint8))[frame > 0] = segment
        total = len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence)
        maps[path.relative_to(folder).as_posix()] = (planes, total)
    return maps


def agreement(
    expected: dict[str, tuple[dict[float, np.ndarray], int]],
    got: dict[str, tuple[dict[float, np.ndarray], int]],
) -> dict[str, Any]:
    """Per output: Dice per label (of ``expected``'s labels) and the share of voxels that differ."""
    result = {}
    for name, (a_planes, total) in expected.items():
        b_planes = got[name][0]
        shape = next(iter({**a_planes, **b_planes}.values())).shape
        empty = np.zeros(shape, np.uint8)
        keys = sorted(set(a_planes) | set(b_planes))
        a = np.stack([a_planes.get(k, empty) for k in keys])
        b = np.stack([b_planes.get(k, empty) for k in keys])
        dice = {
            int(label): round(
                float(2 * ((a == label) & (b == label)).sum() / ((a == label).sum() + (b == label).sum())), 4
            )
            for label in np.unique(a)
            if label
        }
        voxels = total * shape[0] * shape[1]
        result[name] = {
            "dice": dice,
            "differing_share": round(float((a != b).sum() / voxels), 6),
            "voxels": voxels,
        }
    return result


def part_one(args: argparse.Namespace, scratch: Path, record: Any) -> None:
    model = replanned_model(scratch / "ct-model", MODEL_SPACING)
    tars = write_request(scratch / "request", args.tars, args.series, args.matrix, np.random.default_rng(16))
    record(
        "request",
        {"tars": args.tars, "series": args.tars * args.series, "bytes": sum(p.stat().st_size for p in tars)},
    )
    work, s = scratch / "work", args.service_s
    outputs = {}
    for kind, mode in (
        ("whole", "model"),
        ("asyncflow", "model"),
        ("asyncflow", "torch"),
        ("asyncflow", "torch-device"),
    ):
        name = "whole" if kind == "whole" else mode
        outputs[name] = scratch / name
        record(name, run(kind, tars, model, outputs[name], s, work, f"resampling={mode}"))
    for kind, mode in (
        () if args.smoke else (("whole", "model"), ("asyncflow", "model"), ("asyncflow", "torch"))
    ):
        name = f"{'whole' if kind == 'whole' else mode}_one_at_a_time"
        record(name, run(kind, tars, model, scratch / name, s, work, f"resampling={mode}", ONE_AT_A_TIME))
    whole, exact = seg_frames(outputs["whole"]), seg_frames(outputs["model"])
    record("model_equals_whole", {"segs": len(whole), "identical": whole == exact})
    record(
        "torch_against_model_standin", agreement(label_maps(outputs["model"]), label_maps(outputs["torch"]))
    )
    if not args.smoke:
        nifti = write_nifti_copies(tars, scratch / "nifti")
        record("nnUNetv2_predict_nifti", run_nnunet_nifti(nifti[0].parent, model, scratch / "nn", s))


def part_two(args: argparse.Namespace, scratch: Path, record: Any) -> None:
    model = replanned_model(scratch / "ct-model-2", MODEL_SPACING)
    rng = np.random.default_rng(28)
    matrix = args.agreement_matrix
    folder = scratch / "agreement"
    folder.mkdir()
    series = {"thin_1.25mm": (0.75, 1.25, 40), "thick_5mm": (0.85, 5.0, 16)}
    truth = {}
    for name, (pixel, slice_mm, slices) in series.items():
        phantom = make_phantom(rng, (slices, matrix, matrix), spacing=(pixel, pixel, slice_mm))
        (folder / f"{name}.nii.gz").write_bytes(nifti_bytes(phantom.image, phantom.spacing, phantom.origin))
        truth[f"nifti_seg/{name}.nii.gz"] = ({float(z): p for z, p in enumerate(phantom.labels)}, slices)
    inputs = sorted(folder.glob("*.nii.gz"))
    maps = {}
    for mode in ("model", "torch"):
        out = scratch / f"agreement-{mode}"
        record(
            f"real_network_{mode}",
            run("asyncflow", inputs, model, out, 0.0, scratch / "work", f"resampling={mode}"),
        )
        maps[mode] = label_maps(out)
        # Whether the tiny network's answer means anything on this geometry at all.
        record(f"real_network_{mode}_against_truth", agreement(truth, maps[mode]))
    record("torch_against_model_real_network", agreement(maps["model"], maps["torch"]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, service_s, _, *rest = argv[1:]
        return child_main(kind, float(service_s), rest)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.add_argument("--service-s", type=float, default=2.0, help="stand-in network seconds per case")
    parser.add_argument("--agreement-matrix", type=int, default=512, help="0: no real-network agreement")
    parser.add_argument("--parts", default="1,2", help="which parts to run; the others' results are kept")
    parser.add_argument("--out", type=Path, default=HERE / "results-resampling")
    parser.add_argument(
        "--smoke", action="store_true", help="2 small series, S = 0.1 s, no one-at-a-time runs: for CI"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.tars, args.series, args.matrix, args.service_s, args.agreement_matrix = 1, 2, 64, 0.1, 48
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="asyncflow-resampling-"))
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, CPU only",
        "service_s": args.service_s,
        "runs": {},
    }
    parts = set(args.parts.split(","))
    if parts != {"1", "2"} and (args.out / "results.json").exists():
        results["runs"] = json.loads((args.out / "results.json").read_text())["runs"]

    def record(name: str, value: dict[str, Any]) -> None:
        results["runs"][name] = value
        print(name, json.dumps(value), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    try:
        if "1" in parts:
            part_one(args, scratch, record)
        if "2" in parts and args.agreement_matrix:
            part_two(args, scratch, record)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

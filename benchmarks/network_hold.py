"""Real CT geometry: does the prediction worker hold a case only for the network?

    python benchmarks/network_hold.py [--tars 4] [--series 2] [--service-s 2,0.5,5]
        [--memory-budget-gb 3 ...] [--compare nifti,dicom] [--out benchmarks/results-network-hold]
    python benchmarks/network_hold.py --smoke --out /tmp/hold     # seconds; CI runs this

The request: ``--tars`` TAR archives of ``--series`` CT series each, 512 x 512
pixels at 0.7-0.9 mm in-plane, slices of 1.0-5.0 mm covering 200-350 mm (80-300
slices), so nnU-Net must resample every case. The model: asyncflow's tiny model
replanned to 1.0 x 0.8 x 0.8 mm (z, y, x), as CT models are planned. The GPU
stand-in (``fixed_service.patch_nnunet_network``) replaces only nnU-Net's network
call: it sleeps S seconds and returns logits of the right shape, so every CPU
step around it (reading, nnU-Net's preprocessing, its resampling of the logits,
the SEG) is the real code.

Runs, each a child process whose whole process tree is sampled for RSS:

- ``asyncflow run`` on the TARs for every S of ``--service-s`` (default memory
  budget), and at the first S for every ``--memory-budget-gb``;
- with ``--compare nifti``: ``nnUNetv2_predict_from_modelfolder`` (its own
  preprocessing and export worker processes, default counts) against
  ``asyncflow run`` on the same volumes as NIfTI, both with the stand-in at the
  first S;
- with ``--compare dicom``: what a user would script instead for DICOM in, SEG
  out, one step after the other: ``tar -x``, dcm2niix, nnUNetv2_predict,
  dcmqi's ``itkimage2segimage`` per case (``pip install dcmqi``), against
  ``asyncflow run`` on the TARs.

Per asyncflow run (from its event log): per case the hold (``case.predicted``
``duration_s``) against the seconds in the network (``network_s``), the
worker's waits on a full export queue (``predict.blocked``), the GPU-idle share
between the first and the last network call, wall time against the ideal
(network seconds + the first case's prepare + the last case's export), peak RSS
of the process tree, CPU seconds per case (user + system of the tree) and each
step's seconds per case; from those, the cores that would keep a GPU of S
seconds per case busy. Writes ``results.json`` and ``RESULTS.md`` into ``--out``.
Not a test: it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from asyncflow.cli.synthetic import replanned_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import PeakSampler, event_seconds, tree_rss_bytes, union_seconds  # noqa: E402

MODEL_SPACING = (1.0, 0.8, 0.8)  # z, y, x mm


# -- the request -----------------------------------------------------------------------------


def write_request(folder: Path, tars: int, series: int, matrix: int, rng: np.random.Generator) -> list[Path]:
    """``tars`` TARs of ``series`` CT series with realistic, varied geometry."""
    from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in range(tars):
        datasets = []
        for s in range(series):
            in_plane = float(rng.uniform(0.7, 0.9))
            thickness = float(rng.choice([1.0, 1.25, 1.5, 2.0, 3.0, 5.0]))
            slices = int(np.clip(round(rng.uniform(200, 350) / thickness), 80, 300))
            phantom = make_phantom(rng, (slices, matrix, matrix), spacing=(in_plane, in_plane, thickness))
            datasets.append(dicom_series_datasets(phantom, series_number=s + 1, patient_id=f"HOLD-{t}"))
        paths.append(folder / f"study{t:02d}.tar")
        paths[-1].write_bytes(dicom_series_tar(datasets, compression=""))
    return paths


def write_nifti_copies(tars: list[Path], folder: Path) -> list[Path]:
    """Every series of the TARs as ``<case>_0000.nii.gz``, read by SimpleITK in slice order."""
    import tarfile

    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    for t, tar in enumerate(tars):
        scratch = folder / f"x{t}"
        with tarfile.open(tar) as archive:
            archive.extractall(scratch, filter="data")
        reader = sitk.ImageSeriesReader()
        directories = sorted({p.parent for p in scratch.rglob("*") if p.is_file()})
        for d in directories:
            for s, uid in enumerate(reader.GetGDCMSeriesIDs(str(d))):
                reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(d), uid))
                name = f"t{t:02d}{d.name}s{s}_0000.nii.gz"
                sitk.WriteImage(reader.Execute(), str(folder / name), useCompression=True)
        shutil.rmtree(scratch)
    return sorted(folder.glob("*.nii.gz"))


# -- children --------------------------------------------------------------------------------


def child_main(kind: str, service_s: float, argv: list[str]) -> int:
    """In a child process: the stand-in network, then asyncflow's or nnU-Net's own command line."""
    from fixed_service import patch_nnunet_network

    patch_nnunet_network(service_s)
    if kind == "asyncflow":
        from asyncflow.cli.main import main

        return main(argv)
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder

    sys.argv = ["nnUNetv2_predict_from_modelfolder", *argv]
    predict_entry_point_modelfolder()
    return 0


def _run(commands: list[list[str]], log: Path | None = None) -> dict[str, Any]:
    """Run ``commands`` one after the other; wall, CPU (user + system of every child) and peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    pids: list[int] = []
    with PeakSampler(lambda: tree_rss_bytes(pids)) as watch:
        for command in commands:
            stderr = log.open("ab") if log else subprocess.DEVNULL
            try:
                process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
                pids.append(process.pid)
                if process.wait() != 0:
                    raise RuntimeError(f"{command[:3]} exited with {process.returncode}")
            finally:
                if log:
                    stderr.close()  # type: ignore[union-attr]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_s": round(time.perf_counter() - started, 2),
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
        "peak_rss_bytes": watch.peak,
    }


def _me(kind: str, service_s: float, *argv: str) -> list[str]:
    return [sys.executable, __file__, "--child", kind, str(service_s), "--", *argv]


def run_asyncflow(
    inputs: list[Path], model: Path, out: Path, service_s: float, work: Path, *settings: str
) -> dict[str, Any]:
    log = out.with_suffix(".log")
    log.unlink(missing_ok=True)
    argv = [*map(str, inputs), "-o", str(out), "--model", str(model), "--device", "cpu", "--no-mirroring"]
    argv += ["--threads", "1", "--json-logs", "--work-dir", str(work), "--set", "disk_headroom=0"]
    for setting in settings:
        argv += ["--set", setting]
    run = _run([_me("asyncflow", service_s, "run", *argv)], log)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    started = next(e for e in events if e["event"] == "request.started")
    return {**run, "memory_budget_bytes": started["memory_budget_bytes"], **_from_events(events, run)}


def _from_events(events: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    by = {name: [e for e in events if e["event"] == name] for name in {e["event"] for e in events}}
    predicted = by["case.predicted"]
    cases = len({e["case_id"] for e in predicted})  # a cascade predicts a case twice
    network = [(event_seconds(e) - e["network_s"], event_seconds(e)) for e in predicted]
    span = max(b for _, b in network) - min(a for a, _ in network)
    first = min(predicted, key=event_seconds)["case_id"]
    last = max(predicted, key=event_seconds)["case_id"]
    prepared = {e["case_id"]: e for e in by["case.prepared"]}
    exported = {e["case_id"]: e for e in by["case.exported"]}
    ideal = (
        sum(e["network_s"] for e in predicted) + prepared[first]["duration_s"] + exported[last]["duration_s"]
    )
    holds = [e["duration_s"] / e["network_s"] for e in predicted]
    blocked = by.get("predict.blocked", [])
    finished = by["request.finished"][-1]
    assert finished["status"] == "done", finished

    def per_case(values: list[float]) -> float:
        return round(sum(values) / cases, 2)

    return {
        "cases": cases,
        "hold_over_network": {
            "min": round(min(holds), 4),
            "max": round(max(holds), 4),
            "median": round(float(np.median(holds)), 4),
            "total": round(
                sum(e["duration_s"] for e in predicted) / sum(e["network_s"] for e in predicted), 4
            ),
        },
        "blocked_s": round(sum(e["duration_s"] for e in blocked), 2),
        "blocked_times": len(blocked),
        "gpu_idle_share": round(1 - union_seconds(network) / span, 4) if cases > 1 else 0.0,
        "ideal_s": round(ideal, 2),
        "efficiency": round(ideal / run["wall_s"], 3),
        "cpu_s_per_case": round(run["cpu_s"] / cases, 2),
        "step_s_per_case": {
            "read": per_case([e["duration_s"] - e["preprocess_s"] for e in by["case.prepared"]]),
            "preprocess": per_case([e["preprocess_s"] for e in by["case.prepared"]]),
            "hold": per_case([e["duration_s"] for e in predicted]),
            "to_labels": per_case([e["to_labels_s"] for e in by["case.exported"]]),
            "seg": per_case(
                [
                    e["duration_s"] - e["to_labels_s"] - e["writers_s"]["statistics"]
                    for e in by["case.exported"]
                ]
            ),
            "statistics": per_case([e["writers_s"]["statistics"] for e in by["case.exported"]]),
        },
        "memory_wait_s_per_case": per_case([e["memory_wait_s"] for e in by["case.prepared"]]),
        "memory_reserved_mb_max": round(
            max(e["memory_reserved_bytes"] for e in by["case.prepared"]) / 1e6, 1
        ),
        "model_input_mb_max": round(max(e["model_input_bytes"] for e in by["case.prepared"]) / 1e6, 1),
        "logits_mb_max": round(max(e["output_bytes"] for e in predicted) / 1e6, 1),
    }


def run_nnunet_nifti(nifti: Path, model: Path, out: Path, service_s: float) -> dict[str, Any]:
    argv = ["-i", str(nifti), "-o", str(out), "-m", str(model), "-f", "0", "-device", "cpu", "--disable_tta"]
    return _run([_me("nnunet", service_s, *argv, "--disable_progress_bar")])


def run_scripted_dicom(
    tars: list[Path], model: Path, out: Path, service_s: float, work: Path
) -> dict[str, Any]:
    """tar -x, dcm2niix, nnUNetv2_predict, itkimage2segimage: one after the other, as a script would."""
    dicom, nifti, segs = work / "dicom", work / "nifti", work / "segs"
    for folder in (dicom, nifti, segs, out):
        folder.mkdir(parents=True, exist_ok=True)
    meta = work / "meta.json"
    meta.write_text(json.dumps(_dcmqi_metadata()))
    commands = [["tar", "-xf", str(t), "-C", str(dicom / t.stem)] for t in tars]
    for t in tars:
        (dicom / t.stem).mkdir()
    run = _run(commands)
    # dcm2niix writes one NIfTI per series; the case name carries the archive and series number.
    run2 = _run(
        [
            ["dcm2niix", "-z", "y", "-f", f"{t.stem}_s%s_0000", "-o", str(nifti), str(dicom / t.stem)]
            for t in tars
        ]
    )
    run3 = run_nnunet_nifti(nifti, model, segs, service_s)
    converts = []
    for seg in sorted(segs.glob("*.nii.gz")):
        study, series = seg.name.removesuffix(".nii.gz").rsplit("_s", 1)
        source = _series_folder(dicom / study, int(series))
        converts.append(
            [
                shutil.which("itkimage2segimage") or str(Path(sys.executable).parent / "itkimage2segimage"),
                "--inputImageList", str(seg), "--inputDICOMDirectory", str(source),
                "--inputMetadata", str(meta), "--outputDICOM", str(out / f"{seg.name.removesuffix('.nii.gz')}.dcm"),
            ]
        )  # fmt: skip
    run4 = _run(converts)
    parts = (run, run2, run3, run4)
    return {
        "wall_s": round(sum(r["wall_s"] for r in parts), 2),
        "cpu_s": round(sum(r["cpu_s"] for r in parts), 2),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in parts),
        "segs_written": len(list(out.glob("*.dcm"))),
        "steps_wall_s": {
            "tar": run["wall_s"],
            "dcm2niix": run2["wall_s"],
            "nnUNetv2_predict": run3["wall_s"],
            "itkimage2segimage": run4["wall_s"],
        },
    }


def _series_folder(study: Path, series_number: int) -> Path:
    """A folder of symlinks to the files of one series (dcmqi reads a whole directory)."""
    import pydicom

    folder = study.parent / f"{study.name}-series{series_number}"
    if not folder.exists():
        folder.mkdir()
        for path in study.rglob("*"):
            if path.is_file():
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesNumber"])
                if int(header.SeriesNumber) == series_number:
                    (folder / path.name).symlink_to(path)
    return folder


def _dcmqi_metadata() -> dict[str, Any]:
    def segment(number: int, name: str, colour: list[int]) -> dict[str, Any]:
        tissue = {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Tissue"}
        return {
            "labelID": number,
            "SegmentDescription": name,
            "SegmentAlgorithmType": "AUTOMATIC",
            "SegmentAlgorithmName": "nnU-Net",
            "SegmentedPropertyCategoryCodeSequence": tissue,
            "SegmentedPropertyTypeCodeSequence": {**tissue, "CodeMeaning": name},
            "recommendedDisplayRGBValue": colour,
        }

    return {
        "ContentCreatorName": "nnU-Net",
        "ClinicalTrialSeriesID": "1",
        "ClinicalTrialTimePointID": "1",
        "SeriesDescription": "Segmentation",
        "SeriesNumber": "300",
        "InstanceNumber": "1",
        "BodyPartExamined": "ABDOMEN",
        "segmentAttributes": [[segment(1, "liver", [221, 130, 101]), segment(2, "tumor", [144, 238, 144])]],
        "ContentLabel": "SEGMENTATION",
        "ContentDescription": "nnU-Net",
    }


# -- driver ----------------------------------------------------------------------------------


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The request's size: how many TARs, series per TAR, and the matrix."""
    parser.add_argument("--tars", type=int, default=4)
    parser.add_argument("--series", type=int, default=2, help="series per TAR")
    parser.add_argument("--matrix", type=int, default=512)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, service_s, _, *rest = argv[1:]
        return child_main(kind, float(service_s), rest)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.add_argument(
        "--service-s", default="2,0.5,5", help="stand-in network seconds; the first is the target's"
    )
    parser.add_argument(
        "--compare", default="nifti,dicom", help="nifti, dicom, both or none (comma-separated)"
    )
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        action="append",
        default=[],
        help="also run asyncflow on the TARs at the first S with this memory_budget_gb; repeatable",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results-network-hold")
    parser.add_argument(
        "--smoke", action="store_true", help="2 small series, S = 0.1 s, no comparisons: for CI"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.tars, args.series, args.matrix, args.service_s, args.compare = 1, 2, 64, "0.1", "none"
    services = [float(s) for s in args.service_s.split(",")]
    compare = {c for c in args.compare.split(",") if c and c != "none"}
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="asyncflow-hold-"))
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, CPU only", "runs": {}}
    try:
        model = replanned_model(scratch / "model", MODEL_SPACING)
        tars = write_request(
            scratch / "request", args.tars, args.series, args.matrix, np.random.default_rng(16)
        )
        results["request"] = {
            "tars": args.tars,
            "series": args.tars * args.series,
            "bytes": sum(p.stat().st_size for p in tars),
            "model_spacing_zyx_mm": MODEL_SPACING,
        }
        print(json.dumps(results["request"]), flush=True)
        work = scratch / "work"

        def record(name: str, run: dict[str, Any]) -> None:
            results["runs"][name] = run
            print(name, json.dumps(run), flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

        for s in services:
            name = f"asyncflow_dicom_S{s:g}"
            record(name, run_asyncflow(tars, model, scratch / name, s, work))
        s = services[0]
        for budget in args.memory_budget_gb:
            name = f"asyncflow_dicom_S{s:g}_budget{budget:g}GB"
            record(name, run_asyncflow(tars, model, scratch / name, s, work, f"memory_budget_gb={budget}"))
        if "nifti" in compare:
            nifti = write_nifti_copies(tars, scratch / "nifti")
            record(
                f"nnUNetv2_predict_nifti_S{s:g}", run_nnunet_nifti(nifti[0].parent, model, scratch / "nn", s)
            )
            record(f"asyncflow_nifti_S{s:g}", run_asyncflow(nifti, model, scratch / "af-nifti", s, work))
        if "dicom" in compare:
            record(
                f"scripted_dicom_S{s:g}",
                run_scripted_dicom(tars, model, scratch / "sc", s, scratch / "sc-work"),
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

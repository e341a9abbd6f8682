"""Speed at scale: the asyncflow pipeline against a sequential baseline on one multi-TAR request.

    python benchmarks/pipeline_speed.py [--tars 16] [--series 4] [--matrix 512] [--slices 100-300]
        [--predictor fixed,real] [--real-matrix 64] [--real-tars 8] [--service-s auto] [--gpus 1]
        [--set NAME=VALUE] [--out benchmarks/results]
    python benchmarks/pipeline_speed.py --smoke --out /tmp/smoke      # seconds; CI runs this

It writes a synthetic request (``--tars`` TAR archives of ``--series`` CT series,
``--matrix``^2 pixels, slice counts spread over ``--slices``), then runs it

- **sequential**, as the reference did: unpack all -> prepare all -> predict all
  -> export all, with asyncflow's own stage functions (only the scheduling
  differs), and
- through the **pipeline** (``run_request``),

each with a **fixed**-service-time predictor (``fixed_service.py``: holds the
worker S seconds without CPU, a stand-in for a GPU; ``--service-s auto`` sets S
to one case's measured CPU work) and/or the **real** tiny nnU-Net model on the
CPU (``--real-matrix`` and ``--real-tars`` shrink its request: the CPU is not a
GPU). Every run is a child process of its own, so peak RSS is its own.

Outputs in ``--out``: ``results.json`` (per run: wall, ideal = sum(predict) +
first case's prepare + last case's export, efficiency = ideal / wall, GPU-idle
share between the first prediction's start and the last one's end, mean
seconds per stage and case, peak RSS, peak temporary disk) and ``gantt.png``
(stages per case over time, from the records and the pipeline's event log).
Not a test: it prints what it measured.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixed_service import FixedServiceBackend, block_labels
from measure import PeakSampler, event_seconds, folder_bytes, union_seconds

from asyncflow import build_backend, run_request
from asyncflow.artifact import Artifact
from asyncflow.backends import Backend, ModelSteps
from asyncflow.case import Case, PreparedCase
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom
from asyncflow.log import configure_logging
from asyncflow.machine import peak_rss_bytes
from asyncflow.reading.archives import unpack
from asyncflow.reading.assemble import CaseBuilder
from asyncflow.reading.prepare import prepare_case
from asyncflow.reading.request import request_items
from asyncflow.reading.scan import scan
from asyncflow.settings import Settings, packaged_demo_model
from asyncflow.writing.base import Algorithm, LabelMap, OutputOptions
from asyncflow.writing.registry import write_outputs

STAGES = ("unpack", "prepare", "predict", "export")
COLOURS = {"unpack": "#9e9e9e", "prepare": "#4e79a7", "predict": "#e15759", "export": "#59a14f"}


# -- the request -----------------------------------------------------------------------------


def write_request(folder: Path, tars: int, series: int, matrix: int, slices: tuple[int, int]) -> list[Path]:
    """``tars`` TAR files of ``series`` CT series each; slice counts spread evenly over ``slices``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261127)
    counts = np.linspace(slices[0], slices[1], tars * series).round().astype(int)
    rng.shuffle(counts)
    paths = []
    for t in range(tars):
        datasets = []
        for s in range(series):
            phantom = make_phantom(
                rng, (int(counts[t * series + s]), matrix, matrix), spacing=(0.8, 0.8, 1.5)
            )
            datasets.append(dicom_series_datasets(phantom, series_number=s + 1, patient_id=f"BENCH-{t}"))
        paths.append(folder / f"study{t:02d}.tar")
        paths[-1].write_bytes(dicom_series_tar(datasets, compression=""))
    return paths


# -- one run (child process) -----------------------------------------------------------------


def _backends(spec: dict[str, Any], settings: Settings) -> list[Backend]:
    if spec["predictor"] == "real":
        return [build_backend(settings)]
    info = build_backend(settings).info
    return [FixedServiceBackend(info, spec["service_s"]) for _ in range(spec["gpus"])]


async def _sequential(paths: list[Path], settings: Settings, backend: Backend, work: Path) -> list[dict]:
    """Unpack all -> prepare all -> predict all -> export all, one thing at a time."""
    records: list[dict] = []
    t0 = time.perf_counter()

    def timed(case: str, stage: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter() - t0
        value = fn(*args)
        records.append({"case": case, "stage": stage, "start": start, "end": time.perf_counter() - t0})
        return value

    limits = settings.archive_limits()
    builder = CaseBuilder()
    unpacked = [
        timed(f"input-{i.index}", "unpack", unpack, i, work / "inputs" / f"{i.index:04d}", limits)
        for i in request_items(paths)
    ]
    cases = [c for u in unpacked for c in builder.add(scan(u, limits.max_file_bytes))]
    cases += builder.finish()
    steps = backend.steps
    prepared = [
        timed(c.case_id, "prepare", _prepare, c, work / "cases" / c.case_id, backend.needs_files, steps)
        for c in cases
    ]
    backend.load()
    outputs = []
    for p in prepared:
        start = time.perf_counter() - t0
        (output,) = await backend.predict([p])
        assert not isinstance(output, Exception), output
        records.append(
            {"case": p.case.case_id, "stage": "predict", "start": start, "end": time.perf_counter() - t0}
        )
        p.images, p.model_input = [], None  # as the pipeline does: the voxels are not needed any more
        outputs.append((p, output))
    info = backend.info
    algorithm = Algorithm(f"nnU-Net {info.name}", info.framework, info.parameters)
    options = OutputOptions(settings.seg_type, settings.seg_keep_empty_frames, settings.seg_compression)

    def export(p: PreparedCase, output: Any) -> list[Artifact]:
        """The export stage's work: the label map on the source grid, then every output."""
        labels = output if steps is None else steps.to_labels(p, output)
        return write_outputs(LabelMap.of(p, labels, info.labels, {}, algorithm, options))

    for p, output in outputs:
        timed(p.case.case_id, "export", export, p, output)
    shutil.rmtree(work, ignore_errors=True)
    return records


def _prepare(case: Case, folder: Path, write_files: bool, steps: ModelSteps | None) -> PreparedCase:
    """The prepare stage's work for one case: read it, then the model's CPU preprocessing."""
    prepared = prepare_case(case, folder, write_files)
    if steps is not None:
        prepared.model_input = steps.preprocess(prepared)
        prepared.images = []
    return prepared


def _records_from_events(lines: list[dict]) -> list[dict]:
    """Stage intervals from the pipeline's own log: each event ends a stage of duration_s."""
    t0 = next(event_seconds(e) for e in lines if e["event"] == "request.started")
    names = {"archive.extracted": "unpack", "case.prepared": "prepare", "case.predicted": "predict"}
    names["case.exported"] = "export"
    records = []
    for e in lines:
        stage = names.get(e["event"])
        if stage is None:
            continue
        end = event_seconds(e) - t0
        case = e.get("case_id") or f"input-{e['input_index']}"
        records.append({"case": case, "stage": stage, "start": end - e["duration_s"], "end": end})
    return records


async def _pipeline(paths: list[Path], settings: Settings, backends: list[Backend]) -> list[dict]:
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    backend: Backend | list[Backend] = backends if len(backends) > 1 else backends[0]
    result = await run_request(paths, settings, backend=backend)
    assert result.status == "done", result.report()
    return _records_from_events([json.loads(line) for line in logs.getvalue().splitlines()])


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env(
        {},
        model_dir=packaged_demo_model(),
        device="cpu",
        use_mirroring=False,
        work_dir=work,
        disk_headroom=0,
        **spec.get("settings", {}),
    )
    backends = _backends(spec, settings)
    paths = [Path(p) for p in spec["paths"]]
    started = time.perf_counter()
    with PeakSampler(lambda: folder_bytes(work)) as disk:
        if spec["mode"] == "sequential":
            configure_logging(json=True, stream=io.StringIO())  # the model's notices: not on stdout
            request_dir = Path(tempfile.mkdtemp(dir=work))
            records = anyio.run(_sequential, paths, settings, backends[0], request_dir)
        else:
            records = anyio.run(_pipeline, paths, settings, backends)
    wall = time.perf_counter() - started
    return {
        **{k: spec[k] for k in ("mode", "predictor", "gpus", "service_s")},
        "wall_s": wall,
        "records": records,
        "peak_rss_bytes": peak_rss_bytes(),  # this child's own
        "peak_temp_disk_bytes": disk.peak,
    }


# -- metrics and chart -----------------------------------------------------------------------


def metrics(run: dict[str, Any]) -> dict[str, Any]:
    records = run["records"]
    by_stage = {s: [r for r in records if r["stage"] == s] for s in STAGES}
    predict = by_stage["predict"]
    cases = sorted({r["case"] for r in predict})
    first = min(predict, key=lambda r: r["start"])
    last = max(predict, key=lambda r: r["end"])
    first_prepare = next(r for r in by_stage["prepare"] if r["case"] == first["case"])
    last_export = next(r for r in by_stage["export"] if r["case"] == last["case"])
    busy = sum(r["end"] - r["start"] for r in predict) / run["gpus"]
    ideal = (
        busy + (first_prepare["end"] - first_prepare["start"]) + (last_export["end"] - last_export["start"])
    )
    span = last["end"] - first["start"]
    idle = 1 - union_seconds([(r["start"], r["end"]) for r in predict]) / span if run["gpus"] == 1 else None
    return {
        "mode": run["mode"],
        "predictor": run["predictor"],
        "gpus": run["gpus"],
        "service_s": run["service_s"],
        "cases": len(cases),
        "wall_s": round(run["wall_s"], 2),
        "ideal_s": round(ideal, 2),
        "efficiency": round(ideal / run["wall_s"], 3),
        "first_prediction_at_s": round(first["start"], 2),
        "gpu_idle_share": None if idle is None else round(idle, 4),
        "stage_s_per_case": {
            s: round(sum(r["end"] - r["start"] for r in rs) / len(cases), 3) for s, rs in by_stage.items()
        },
        "peak_rss_bytes": run["peak_rss_bytes"],
        "peak_temp_disk_bytes": run["peak_temp_disk_bytes"],
    }


def gantt(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 2.2 + 0.12 * 40 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        rows = sorted({r["case"] for r in run["records"]}, key=lambda c: (not c.startswith("input"), c))
        for r in run["records"]:
            y = rows.index(r["case"])
            ax.barh(y, r["end"] - r["start"], left=r["start"], color=COLOURS[r["stage"]], height=0.8)
        ax.set_yticks(range(len(rows)), rows, fontsize=5)
        ax.invert_yaxis()
        m = metrics(run)
        ax.set_title(
            f"{run['mode']} / {run['predictor']}"
            + (f" x{run['gpus']}" if run["gpus"] > 1 else "")
            + f": {m['wall_s']} s, efficiency {m['efficiency']}",
            fontsize=9,
        )
        ax.set_xlabel("seconds")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    fig.legend(handles, list(COLOURS), loc="upper right", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- driver ----------------------------------------------------------------------------------


def _child(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    spec_file = out / "spec.json"
    spec_file.write_text(json.dumps(spec))
    result_file = out / "run.json"
    subprocess.run([sys.executable, __file__, "--child", str(spec_file), str(result_file)], check=True)
    run = json.loads(result_file.read_text())
    spec_file.unlink()
    result_file.unlink()
    return run


def _service_time(paths: list[Path], work: Path) -> float:
    """One case's CPU work (its share of its archive's unpack + prepare + export), measured here."""
    settings = Settings(model_dir=packaged_demo_model(), work_dir=work)
    limits = settings.archive_limits()
    (item,) = request_items(paths[:1])
    started = time.perf_counter()
    unpacked = unpack(item, work / "pilot", limits)
    builder = CaseBuilder()
    cases = [*builder.add(scan(unpacked, limits.max_file_bytes)), *builder.finish()]
    unpack_share = (time.perf_counter() - started) / len(cases)
    case = cases[0]
    started = time.perf_counter()
    prepared = prepare_case(case, work / "pilot-case", write_files=False)  # as for the v2 backend
    shape = tuple(reversed(prepared.geometry.size))
    info = build_backend(settings).info
    algorithm = Algorithm(f"nnU-Net {info.name}", info.framework, info.parameters)
    options = OutputOptions(settings.seg_type, settings.seg_keep_empty_frames, settings.seg_compression)
    write_outputs(LabelMap.of(prepared, block_labels(shape), info.labels, {}, algorithm, options))
    seconds = unpack_share + time.perf_counter() - started
    shutil.rmtree(work / "pilot", ignore_errors=True)
    shutil.rmtree(work / "pilot-case", ignore_errors=True)
    return round(seconds, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tars", type=int, default=16)
    parser.add_argument("--series", type=int, default=4, help="series per TAR")
    parser.add_argument("--matrix", type=int, default=512, help="rows = columns per slice")
    parser.add_argument("--slices", default="100-300", help="slice counts, spread over this range")
    parser.add_argument("--real-matrix", type=int, default=64, help="--matrix for the real model's request")
    parser.add_argument("--real-tars", type=int, default=8, help="--tars for the real model's request")
    parser.add_argument("--predictor", default="fixed,real", help="fixed, real or both (comma-separated)")
    parser.add_argument("--service-s", default="auto", help="fixed predictor seconds per case, or auto")
    parser.add_argument(
        "--gpus", type=int, default=1, help="also run the pipeline with this many fixed workers"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline setting for every run (e.g. export_workers=1); repeatable",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--smoke", action="store_true", help="a tiny request and S=0.1 s: seconds, for CI")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec_file, result_file = args.child
        result_file.write_text(json.dumps(run_child(json.loads(spec_file.read_text()))))
        return 0
    if args.smoke:
        args.tars, args.series, args.matrix, args.slices = 2, 2, 64, "16-24"
        args.predictor, args.service_s = "fixed", "0.1"
    low, high = (int(n) for n in args.slices.split("-"))
    overrides = dict(item.split("=", 1) for item in args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="asyncflow-speed-"))
    runs = []
    try:
        for predictor in args.predictor.split(","):
            matrix = args.matrix if predictor == "fixed" else args.real_matrix
            tars = args.tars if predictor == "fixed" else args.real_tars
            started = time.perf_counter()
            paths = write_request(scratch / f"request-{matrix}", tars, args.series, matrix, (low, high))
            print(
                f"request: {len(paths)} TARs, {sum(p.stat().st_size for p in paths) / 1e9:.2f} GB, "
                f"{matrix}^2 x {low}-{high} slices, written in {time.perf_counter() - started:.0f} s",
                flush=True,
            )
            service = 0.0
            if predictor == "fixed":
                service = _service_time(paths, scratch) if args.service_s == "auto" else float(args.service_s)
            gpu_counts = [1] + ([args.gpus] if predictor == "fixed" and args.gpus > 1 else [])
            for mode, gpus in [("sequential", 1)] + [("pipeline", g) for g in gpu_counts]:
                spec = {
                    "mode": mode,
                    "predictor": predictor,
                    "gpus": gpus,
                    "service_s": service,
                    "paths": [str(p) for p in paths],
                    "work": str(scratch / "work"),
                    "settings": overrides,
                }
                run = _child(spec, args.out)
                runs.append(run)
                print(json.dumps(metrics(run)), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {
        "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, CPU only",
        "request": {
            "tars": args.tars,
            "series_per_tar": args.series,
            "matrix": args.matrix,
            "real_matrix": args.real_matrix,
            "real_tars": args.real_tars,
            "settings": overrides,
            "slices": [low, high],
        },
        "runs": [metrics(run) for run in runs],
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    gantt(runs, args.out / "gantt.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'gantt.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

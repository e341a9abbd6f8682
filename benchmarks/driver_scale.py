"""The driver's books as a request grows: is its time and memory per case flat up to 100,000 cases?

    python benchmarks/driver_scale.py [--sizes 1000 10000 100000] [--out benchmarks/results-driver-scale]

On a cluster the driver does, for every case, what it does on one machine besides the steps:
it unpacks the inputs, assembles the cases, books each stage, logs the events, journals each
finished case and writes its outputs. This runs exactly that code (``run_request`` with an
``OutputFolder`` and JSON events to a file) over tiny NIfTI inputs (4x4x4 voxels), with
``asyncflow.testing.FakeBackend`` standing in for the model, so what is measured is the
bookkeeping and not the network: wall seconds per case, events and journal lines per second,
and the process's peak RSS, at each size. Not a test: it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from asyncflow import OutputFolder, Settings, run_request_sync
from asyncflow.cli.synthetic import nifti_bytes
from asyncflow.log import configure_logging
from asyncflow.testing import FakeBackend


def _run(cases: int, work: Path) -> dict[str, float]:
    volume = nifti_bytes(np.arange(64, dtype=np.int16).reshape(4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    inputs = [{f"case{n:06d}.nii.gz": volume} for n in range(cases)]
    log = work / "events.jsonl"
    with log.open("w") as events:
        configure_logging(json=True, stream=open(os.devnull, "w"), json_file=events)  # noqa: SIM115
        settings = Settings(work_dir=work / "tmp", unpack_workers=2, prepare_workers=2, export_workers=2)
        start = time.perf_counter()
        result = run_request_sync(inputs, settings, backend=FakeBackend(), sink=OutputFolder(work / "out"))
        wall = time.perf_counter() - start
    assert result.status == "done" and len(result.cases) == cases
    lines = sum(1 for _ in log.open())
    journal = sum(1 for _ in (work / "out" / "journal.jsonl").open())
    return {
        "cases": cases,
        "wall_s": round(wall, 2),
        "ms_per_case": round(1000 * wall / cases, 3),
        "events": lines,
        "events_per_s": round(lines / wall, 1),
        "journal_lines_per_s": round(journal / wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results-driver-scale")
    args = parser.parse_args()
    runs = []
    for size in args.sizes:  # ascending: peak RSS is the process's, so each size's is its own or more
        work = Path(tempfile.mkdtemp(prefix="bench-driver-"))
        try:
            runs.append(_run(size, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(runs[-1]), file=sys.stderr)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# The driver's books at scale ({os.cpu_count()} CPUs; FakeBackend, 4x4x4 NIfTI cases)",
        "",
        "| cases | wall s | ms per case | events | events/s | journal lines/s | peak RSS MB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r['cases']} | {r['wall_s']} | {r['ms_per_case']} | {r['events']} | {r['events_per_s']} "
            f"| {r['journal_lines_per_s']} | {r['peak_rss_mb']} |"
        )
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

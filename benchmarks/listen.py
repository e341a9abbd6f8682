"""What ``asyncflow listen`` takes: instances per second received to disk, and the latency from a
series' last instance to its SEG in a PACS.

    python benchmarks/listen.py [--slices 300] [--matrix 512] [--quiet-s 2] [--out benchmarks/results-listen]

1. ``receive``: the listener as ``asyncflow listen`` runs it (a subprocess), its pipeline idle
   (a quiet period of an hour: no series completes), and dcmtk's ``storescu`` sending one CT
   series of ``--slices`` images of ``--matrix``² 16-bit pixels from one process, one
   association: instances and MB per second from the first to the last acknowledgement
   (storescu's wall time), each instance fsync'd before it is acknowledged.
2. ``latency``: a listener with the packaged tiny model on the CPU, ``--quiet-s``, sending to
   an Orthanc (Debian) over STOW-RS; ``storescu`` sends a series of ``--latency-slices`` images of
   128² pixels; from storescu's end to the SEG's arrival in Orthanc (its Lua filter's log).

Writes ``results.json`` and ``RESULTS.md`` into ``--out``. Not a test: it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers import dicom_bytes  # noqa: E402
from pacs import _free_port, orthanc  # noqa: E402

from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom  # noqa: E402
from asyncflow.settings import packaged_demo_model  # noqa: E402


def _series(folder: Path, slices: int, matrix: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True)
    phantom = make_phantom(np.random.default_rng(seed), (slices, matrix, matrix), spacing=(0.8, 0.8, 1.0))
    paths = []
    for k, ds in enumerate(dicom_series_datasets(phantom)):
        paths.append(folder / f"{k:04d}.dcm")
        paths[-1].write_bytes(dicom_bytes(ds))
    return paths


def _listener(work: Path, port: int, quiet_s: float, *more: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = work / "listen.jsonl"
    command = [
        sys.executable, "-m", "asyncflow", "listen", "-o", str(work / "out"), "--spool", str(work / "spool"),
        "--host", "127.0.0.1", "--port", str(port), "--quiet-s", str(quiet_s), "--model", str(packaged_demo_model()),
        "--device", "cpu", "--no-mirroring", "--log-file", str(log), "-q", *more,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (log.is_file() and '"listen.started"' in log.read_text()):
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"the listener did not start: {log}")
        time.sleep(0.1)
    return process, log


def _storescu(port: int, paths: list[Path]) -> float:
    started = time.monotonic()
    subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", "ASYNCFLOW", "127.0.0.1", str(port), *map(str, paths)],
        check=True,
        capture_output=True,
    )
    return time.monotonic() - started


def receive(work: Path, slices: int, matrix: int) -> dict[str, Any]:
    paths = _series(work / "series", slices, matrix, 1)
    size = sum(p.stat().st_size for p in paths)
    port = _free_port()
    process, _ = _listener(work, port, 3600.0)
    try:
        seconds = _storescu(port, paths)
    finally:
        process.terminate()
        process.wait(timeout=60)
    spooled = list((work / "spool").rglob("*.dcm"))
    return {
        "instances": len(paths),
        "bytes": size,
        "spooled": len(spooled),
        "seconds": round(seconds, 3),
        "instances_per_s": round(len(paths) / seconds, 1),
        "mb_per_s": round(size / seconds / 1e6, 1),
    }


def latency(work: Path, slices: int, quiet_s: float) -> dict[str, Any]:
    paths = _series(work / "series", slices, 128, 2)
    port = _free_port()
    with orthanc(work / "pacs") as pacs:
        process, log = _listener(work, port, quiet_s, "--send", pacs.dicomweb)
        try:
            sent = _storescu(port, paths)
            ended = time.monotonic()
            deadline = ended + 300
            while pacs.received() < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("no SEG arrived")
                time.sleep(0.05)
            arrived = time.monotonic() - ended
        finally:
            process.terminate()
            process.wait(timeout=60)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    finished = next(e for e in events if e["event"] == "case.finished")
    return {
        "instances": len(paths),
        "storescu_s": round(sent, 3),
        "quiet_s": quiet_s,
        "last_instance_to_seg_in_pacs_s": round(arrived, 3),
        "case_stage_s": {k: finished.get(f"{k}_s") for k in ("prepare", "predict", "export")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--latency-slices", type=int, default=64)
    parser.add_argument("--quiet-s", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=HERE / "results-listen")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        raise SystemExit("dcmtk's storescu is needed (apt-get install dcmtk)")
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()}
    }
    with tempfile.TemporaryDirectory() as scratch:
        results["receive"] = receive(Path(scratch) / "receive", args.slices, args.matrix)
        print("receive:", results["receive"])
        results["latency"] = latency(Path(scratch) / "latency", args.latency_slices, args.quiet_s)
        print("latency:", results["latency"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    r, lat = results["receive"], results["latency"]
    (args.out / "RESULTS.md").write_text(
        "# asyncflow listen\n\n"
        f"- received to disk, pipeline idle: {r['instances']} instances of {args.matrix}² in {r['seconds']} s: "
        f"{r['instances_per_s']} instances/s, {r['mb_per_s']} MB/s (storescu, one association, each fsync'd)\n"
        f"- last instance -> SEG in Orthanc: {lat['last_instance_to_seg_in_pacs_s']} s "
        f"(quiet period {lat['quiet_s']} s, {lat['instances']} instances of 128², tiny model on the CPU)\n"
    )


if __name__ == "__main__":
    main()

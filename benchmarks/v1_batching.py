"""nnU-Net v1 batching: one ``nnUNet_predict`` run per case vs. runs that take every waiting case.

    python benchmarks/v1_batching.py [--cases 8] [--mirroring] [--json FILE]

Runs one request of ``--cases`` synthetic 48x64x64 NIfTI volumes through the
pipeline with the tiny v1 model on the CPU twice: ``v1_batch_size=1`` (what
calling v1 once per case costs) and the default ``v1_batch_size=8``. From the
``nnunet_v1.finished`` events it fits run seconds = start-up + cases x per-case
(least squares over both requests' runs) and prints wall times, runs, and the
fit. Not a test: it prints what it measured. Needs ``pip install -e '.[v1]'``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import anyio
import numpy as np

from asyncflow import run_request
from asyncflow.cli.synthetic import make_phantom, nifti_bytes
from asyncflow.log import configure_logging
from asyncflow.settings import Settings

RESULTS = Path(__file__).resolve().parents[1] / "asyncflow" / "models" / "tiny_v1"


async def _request(entries: list, batch_size: int, mirroring: bool, work: Path) -> dict:
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    settings = Settings(
        backend="v1",
        results_folder=RESULTS,
        task_name="Task998_AsyncflowTiny",
        device="cpu",
        use_mirroring=mirroring,
        v1_batch_size=batch_size,
        work_dir=work,
    )
    started = time.perf_counter()
    result = await run_request(entries, settings)
    wall = time.perf_counter() - started
    events = [json.loads(line) for line in logs.getvalue().splitlines()]
    runs = [(e["cases"], e["duration_s"]) for e in events if e["event"] == "nnunet_v1.finished"]
    return {
        "v1_batch_size": batch_size,
        "status": result.status,
        "wall_s": round(wall, 2),
        "runs": len(runs),
        "cases_per_run": [c for c, _ in runs],
        "run_s": [round(s, 2) for _, s in runs],
        "predict_s_total": round(sum(s for _, s in runs), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring on (8x the work)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    phantoms = [make_phantom(rng, (48, 64, 64)) for _ in range(args.cases)]
    entries = [{f"v{n}.nii.gz": nifti_bytes(p.image, p.spacing, p.origin)} for n, p in enumerate(phantoms)]
    work = Path(tempfile.mkdtemp(prefix="asyncflow-bench-v1-"))
    requests = [anyio.run(_request, entries, batch_size, args.mirroring, work) for batch_size in (1, 8)]
    runs = [(c, s) for r in requests for c, s in zip(r["cases_per_run"], r["run_s"], strict=True)]
    design = np.array([[1.0, c] for c, _ in runs])
    (start_up, per_case), *_ = np.linalg.lstsq(design, np.array([s for _, s in runs]), rcond=None)
    summary = {
        "machine": f"{os.cpu_count()} cores, CPU only",
        "cases": args.cases,
        "volume": [48, 64, 64],
        "mirroring": args.mirroring,
        "requests": requests,
        "fit": {"start_up_s": round(float(start_up), 2), "per_case_s": round(float(per_case), 2)},
        "speedup": round(requests[0]["wall_s"] / requests[1]["wall_s"], 2),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

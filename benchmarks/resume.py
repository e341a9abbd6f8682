"""What ``--resume`` costs: a finished request run again, and one that grew by an archive.

    python benchmarks/resume.py [--tars 3] [--series 2] [--matrix 512] [--out benchmarks/results-resume]

The request is network_hold's: ``--tars`` TARs of ``--series`` CT series of
``--matrix``² pixels, 80-300 slices each, and asyncflow's tiny model replanned to
1.0 x 0.8 x 0.8 mm; nnU-Net's network call is the stand-in of
``fixed_service.patch_nnunet_network`` (0.5 s), every CPU step around it is real.
Three runs of ``asyncflow run`` into one output folder, one after the other:

- ``first``: the whole request;
- ``resume``: the same inputs with ``--resume``: nothing is left to do (``--repeat``
  times; its wall time is the median, each run's is in ``wall_s_each``);
- ``grown``: ``--resume`` after one more TAR (one new series) joined the inputs.

Per run, from its event log and from outside: wall time, cases predicted and
resumed, what unpacking wrote into the work dir (``archive.extracted`` bytes and
files), what it withheld (``files_withheld``, ``bytes_withheld``: members a
finished case was made of, classified in memory, never written), files unpacked
again (``input.restored``), unpack seconds, and the peak of the work dir's size
and of the process tree's RSS, sampled every 0.05 s. Then the ``resume`` request
alone, ``--repeat`` times in this process (no process start, no model load: a
FakeBackend finishes a first run into a second folder). Writes ``results.json``
and ``RESULTS.md`` into ``--out``. Not a test: it prints what it measured.
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
from typing import Any

import numpy as np

from asyncflow.cli.synthetic import replanned_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import PeakSampler, folder_bytes, tree_rss_bytes  # noqa: E402
from network_hold import MODEL_SPACING, write_request  # noqa: E402

SERVICE_S = 0.5


def run(inputs: Path, model: Path, out: Path, work: Path, log: Path, *extra: str) -> dict[str, Any]:
    """One ``asyncflow run`` (network_hold's child: the stand-in network), measured."""
    argv = [str(inputs), "-o", str(out), "--model", str(model), "--device", "cpu", "--no-mirroring"]
    argv += ["--threads", "1", "--json-logs", "--work-dir", str(work), "--set", "disk_headroom=0", *extra]
    command = [sys.executable, str(HERE / "network_hold.py"), "--child", "asyncflow", str(SERVICE_S), "--"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pids: list[int] = []
    started = time.perf_counter()
    with (
        log.open("wb") as stderr,
        PeakSampler(lambda: folder_bytes(work), 0.05) as disk,
        PeakSampler(lambda: tree_rss_bytes(pids), 0.05) as rss,
    ):
        process = subprocess.Popen(
            [*command, "run", *argv], stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )
        pids.append(process.pid)
        if process.wait() != 0:
            raise RuntimeError(f"asyncflow run exited with {process.returncode}; see {log}")
    wall = time.perf_counter() - started
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]

    def of(name: str) -> list[dict[str, Any]]:
        return [e for e in events if e["event"] == name]

    extracted = of("archive.extracted")
    finished = of("request.finished")[-1]
    assert finished["status"] == "done", finished
    return {
        "wall_s": round(wall, 2),
        "cases_predicted": len(of("case.predicted")),
        "cases_resumed": finished["cases_resumed"],
        "unpack_s": round(sum(e["duration_s"] for e in extracted), 2),
        "files_written": sum(e["files"] for e in extracted),
        "bytes_written": sum(e["bytes"] for e in extracted),
        "files_withheld": sum(e.get("files_withheld", 0) for e in extracted),
        "bytes_withheld": sum(e.get("bytes_withheld", 0) for e in extracted),
        "files_restored": sum(e["files"] for e in of("input.restored")),
        "peak_work_dir_bytes": disk.peak,
        "peak_rss_bytes": rss.peak,
    }


def request_seconds(inputs: Path, scratch: Path, repeats: int) -> list[float]:
    """The resume request alone, in this process: no process start, no model (a FakeBackend
    that labels everything 1 finishes the first run), ``repeats`` resumes, each one's seconds."""
    from asyncflow import run_request_sync
    from asyncflow.pipeline.journal import OutputFolder
    from asyncflow.settings import Settings
    from asyncflow.testing import FakeBackend

    settings = Settings(work_dir=scratch / "work-fake", disk_headroom=0)
    out = scratch / "out-fake"
    run_request_sync([inputs], settings, backend=FakeBackend(), sink=OutputFolder(out))
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run_request_sync(
            [inputs], settings, backend=FakeBackend(), sink=OutputFolder(out, resume=True)
        )
        seconds.append(round(time.perf_counter() - started, 3))
        assert {case.status for case in result.cases} == {"resumed"}, result.cases
    return seconds


def report(results: dict[str, Any]) -> str:
    request = results["request"]
    lines = [
        "# What --resume costs",
        "",
        f"{results['machine']}; commit {results['commit']}. Request: {request['tars']} TARs, "
        f"{request['series']} CT series of {request['matrix']}² ({request['bytes'] / 1e6:.0f} MB); "
        f"`grown` adds one TAR of one series ({request['added_bytes'] / 1e6:.0f} MB).",
        "",
        "Wall time includes the process start and the model's load (about 5 s here); "
        "`resume` is the median of its runs.",
        "",
        "| run | wall s | predicted | resumed | unpack s | written MB (files) | withheld MB (files) "
        "| restored files | peak work dir MB | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["runs"].items():
        lines.append(
            f"| {name} | {r['wall_s']} | {r['cases_predicted']} | {r['cases_resumed']} | {r['unpack_s']} "
            f"| {r['bytes_written'] / 1e6:.0f} ({r['files_written']}) "
            f"| {r['bytes_withheld'] / 1e6:.0f} ({r['files_withheld']}) | {r['files_restored']} "
            f"| {r['peak_work_dir_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / 1e6:.0f} |"
        )
    only = results["request_only_resume_s"]
    lines += [
        "",
        f"The `resume` request alone, in one process (no process start, no model: a FakeBackend "
        f"finished the first run): median {only['median']} s of {len(only['each'])} runs ({only['each']}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tars", type=int, default=3)
    parser.add_argument("--series", type=int, default=2)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="runs of `resume` (its wall time: the median)")
    parser.add_argument("--out", type=Path, default=HERE / "results-resume")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="asyncflow-resume-"))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=False
    ).stdout.strip()
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, CPU only", "commit": commit, "runs": {}}
    try:
        model = replanned_model(scratch / "model", MODEL_SPACING)
        rng = np.random.default_rng(18)
        inputs = scratch / "request"
        tars = write_request(inputs, args.tars, args.series, args.matrix, rng)
        extra = write_request(scratch / "extra", 1, 1, args.matrix, rng)[0]
        results["request"] = {
            "tars": args.tars,
            "series": args.tars * args.series,
            "matrix": args.matrix,
            "bytes": sum(p.stat().st_size for p in tars),
            "added_bytes": extra.stat().st_size,
        }
        out, work = scratch / "out", scratch / "work"
        for name, flags in (("first", ()), ("resume", ("--resume",)), ("grown", ("--resume",))):
            if name == "grown":
                shutil.move(extra, inputs / "added.tar")
            repeats = args.repeat if name == "resume" else 1
            runs = [run(inputs, model, out, work, args.out / f"{name}.log", *flags) for _ in range(repeats)]
            results["runs"][name] = {
                **runs[-1],
                "wall_s": round(float(np.median([r["wall_s"] for r in runs])), 2),
            }
            results["runs"][name]["wall_s_each"] = [r["wall_s"] for r in runs]
            print(name, json.dumps(results["runs"][name]), flush=True)
        shutil.move(inputs / "added.tar", extra)  # the request as the first run saw it
        seconds = request_seconds(inputs, scratch, args.repeat)
        results["request_only_resume_s"] = {"median": round(float(np.median(seconds)), 3), "each": seconds}
        print("request only", json.dumps(results["request_only_resume_s"]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "RESULTS.md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stopping is safe and quick: SIGTERM, SIGHUP and Ctrl-C in a real process, two steps, nothing
left on disk but what finished; and request folders of killed processes are swept at start-up."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import phantom_backend, phantom_nifti

from asyncflow import run_request
from asyncflow.cli import main
from asyncflow.log import configure_logging
from asyncflow.pipeline.journal import JOURNAL

# The CLI over a FakeBackend whose every prediction takes TEST_PREDICT_DELAY seconds (an await,
# as a prediction's is: stopping now abandons it).
SLOW_CLI = textwrap.dedent(
    """
    import os, sys, anyio
    sys.path.insert(0, sys.argv.pop(1))
    from helpers import phantom_backend
    from asyncflow.cli import main

    DELAY = float(os.environ["TEST_PREDICT_DELAY"])
    backend = phantom_backend()
    predict = backend.predict

    async def slow(cases):
        await anyio.sleep(DELAY)
        return await predict(cases)

    backend.predict = slow
    sys.exit(main(sys.argv[1:], backend=backend))
    """
)
ONE_AT_A_TIME = ["--set", "unpack_workers=1", "--set", "prepare_workers=1", "--set", "export_workers=1"]


def _inputs(folder: Path, rng: np.random.Generator, count: int) -> Path:
    folder.mkdir()
    for n in range(count):
        (folder / f"v{n}.nii.gz").write_bytes(phantom_nifti(rng, (8, 16, 16)))
    return folder


def _start(tmp_path: Path, inputs: Path, delay: float, *extra: str) -> subprocess.Popen[str]:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    argv = [sys.executable, str(script), str(Path(__file__).parents[1]), "run", str(inputs)]
    argv += ["-o", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--json-logs"]
    argv += [*ONE_AT_A_TIME, "--set", "queue_size=1", *extra]
    env = {**os.environ, "TEST_PREDICT_DELAY": str(delay)}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _journaled(out: Path) -> list[dict]:
    lines = (out / JOURNAL).read_text().splitlines() if (out / JOURNAL).exists() else []
    return [entry for entry in map(json.loads, lines) if "case" in entry]


def _wait_for(condition, process: subprocess.Popen[str], what: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _events(stderr: str, name: str) -> list[dict]:
    lines = [line for line in stderr.splitlines() if line.startswith("{")]
    return [e for e in map(json.loads, lines) if e.get("event") == name]


def test_sigterm_finishes_the_cases_in_flight_keeps_them_and_removes_every_temporary_file(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    inputs, out = _inputs(tmp_path / "in", rng, 8), tmp_path / "out"
    run = _start(tmp_path, inputs, 1.0)
    _wait_for(lambda: len(_journaled(out)) >= 1, run, "a first case did not finish")
    run.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _, stderr = run.communicate(timeout=60)

    assert run.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "asyncflow: stopping: no new case starts; finishing" in stderr
    (stopping,) = _events(stderr, "request.stopping")
    assert stopping["signal"] == "SIGTERM" and stopping["cases_in_flight"] >= 1
    (finished,) = _events(stderr, "request.finished")
    assert finished["status"] == "cancelled"
    report = json.loads((out / "report.json").read_text())
    statuses = [case["status"] for case in report["cases"]]
    done = [entry["report"]["output"] for entry in _journaled(out)]
    # The cases in flight finished and were written; no new one started.
    assert statuses.count("done") == len(done) == 1 + stopping["cases_in_flight"]
    assert len(done) < 8 and set(statuses) <= {"done", "pending"}
    # Every input is listed: those the stop left unread say so.
    assert sorted(i["index"] for i in report["inputs"]) == list(range(8))
    assert {i["failure"] for i in report["inputs"] if i["error"]} <= {"not read"}
    assert sorted(p.name for p in (out / "nifti_seg").iterdir()) == sorted(done)
    assert list((tmp_path / "work").iterdir()) == []
    assert time.monotonic() - signalled < 30

    # --resume goes on with what finished.
    argv = ["run", str(inputs), "-o", str(out), "--work-dir", str(tmp_path / "work"), "--resume"]
    assert main([*argv, "--json-logs"], backend=phantom_backend()) == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(case["status"] for case in report["cases"]).count("resumed") == len(done)


@pytest.mark.parametrize("second", ["signal", "grace"])
def test_a_second_interrupt_or_the_grace_s_end_stops_now(
    tmp_path: Path, rng: np.random.Generator, second: str
) -> None:
    inputs, out = _inputs(tmp_path / "in", rng, 3), tmp_path / "out"
    run = _start(tmp_path, inputs, 120.0, "--grace-s", "2" if second == "grace" else "60")
    _wait_for(lambda: (out / JOURNAL).exists(), run, "the run did not start")
    time.sleep(1.0)  # the first case is in its two-minute prediction
    run.send_signal(signal.SIGINT)
    if second == "signal":
        time.sleep(0.5)
        run.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    _, stderr = run.communicate(timeout=60)

    assert run.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert time.monotonic() - signalled < 20  # not the prediction's two minutes
    (stopped,) = _events(stderr, "request.stopped_now")
    assert stopped["reason"] == ("second SIGINT" if second == "signal" else "grace of 2 s over")
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "cancelled" and {c["status"] for c in report["cases"]} <= {"pending"}
    assert list((tmp_path / "work").iterdir()) == []
    # Stopped before any case ended: --resume still goes on (the journal was begun as the run began).
    argv = ["run", str(inputs), "-o", str(out), "--work-dir", str(tmp_path / "work"), "--resume"]
    assert main([*argv, "--json-logs"], backend=phantom_backend()) == 0


def test_sighup_outside_a_request_ends_the_command_as_ctrl_c_does(tmp_path: Path) -> None:
    """``monitor`` reading a pipe that never ends: SIGHUP ends it, with its summary."""
    monitor = subprocess.Popen(
        [sys.executable, "-m", "asyncflow", "monitor", "--summary", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    monitor.send_signal(signal.SIGHUP)
    _, stderr = monitor.communicate(timeout=30)
    assert monitor.returncode in (0, 128 + signal.SIGHUP), stderr[-3000:]


@pytest.mark.anyio
async def test_folders_of_requests_whose_process_died_are_swept_at_start(
    tmp_path: Path, rng: np.random.Generator, fake_settings
) -> None:
    work = tmp_path / "work"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    owners = {
        "asyncflow-000000000001-dead": {"pid": int(dead.stdout), "started": None},
        "asyncflow-000000000002-alive": {"pid": os.getpid(), "started": None},
        "asyncflow-000000000003-elsewhere": {"pid": int(dead.stdout), "started": None, "host": "other"},
    }
    for name, owner in owners.items():
        (work / name / "inputs").mkdir(parents=True)
        (work / name / "inputs" / "scan.dcm").write_bytes(b"x" * 1000)
        (work / name / "owner.json").write_text(json.dumps({"host": socket.gethostname(), **owner}))
    (work / "asyncflow-000000000004-older").mkdir()  # no owner: an older asyncflow's, left alone
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)

    result = await run_request(
        [phantom_nifti(rng, (8, 16, 16))], fake_settings(work), backend=phantom_backend()
    )

    assert result.status == "done"
    assert sorted(p.name for p in work.iterdir()) == [
        "asyncflow-000000000002-alive",
        "asyncflow-000000000003-elsewhere",
        "asyncflow-000000000004-older",
    ]
    (swept,) = [e for e in map(json.loads, logs.getvalue().splitlines()) if e["event"] == "workspace.swept"]
    assert swept["folders"] == 1 and swept["bytes"] >= 1000 and "dead" not in json.dumps(swept)

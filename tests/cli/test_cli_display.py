"""The command line on a terminal and in a pipe: a progress line that moves during a long
prediction, log levels around it, a reader that goes away, options that take lists."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_run_argv, phantom_nifti

from asyncflow import RequestError, run_request
from asyncflow.cli import main
from asyncflow.cli.monitor import Monitor
from asyncflow.cli.parser import build_parser
from asyncflow.log import configure_logging

# The CLI with a FakeBackend that holds each case for DELAY seconds (a long prediction).
FAKE_CLI = textwrap.dedent(
    """
    import os, sys
    from asyncflow.cli import main
    from asyncflow.testing import FakeBackend

    backend = FakeBackend(delay_s=float(os.environ["TEST_PREDICT_DELAY"]))
    sys.exit(main(sys.argv[1:], backend=backend))
    """
)


def _in_a_terminal(tmp_path: Path, *extra: str, delay: float) -> tuple[int, str]:
    """Run the CLI on one NIfTI in a pseudo-terminal; its exit code and everything it drew."""
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    inputs = tmp_path / "in"
    inputs.mkdir(exist_ok=True)
    (inputs / "scan.nii.gz").write_bytes(phantom_nifti(np.random.default_rng(1), (16, 24, 24)))
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    argv = cli_run_argv(script, inputs, out)
    master, slave = pty.openpty()
    env = {**os.environ, "TEST_PREDICT_DELAY": str(delay), "COLUMNS": "150"}
    process = subprocess.Popen([*argv, *extra], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    drawn = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed: the process has ended
                break
            if not chunk:
                break
            drawn += chunk
        elif process.poll() is not None:
            break
    os.close(master)
    return process.wait(timeout=30), drawn.decode(errors="replace")


@pytest.mark.slow
def test_the_progress_line_moves_during_a_long_prediction_and_keeps_info_lines_in_the_log_file(
    tmp_path: Path,
) -> None:
    log_file = tmp_path / "run.jsonl"
    code, drawn = _in_a_terminal(tmp_path, "--log-file", str(log_file), delay=4.0)
    assert code == 0, drawn[-2000:]
    frames = [f for f in drawn.split("\r\x1b[K") if f.startswith("segmenting")]
    while_predicting = [f for f in frames if "predict 1" in f]
    elapsed = {re.search(r"\[(\d\d:\d\d)", f).group(1) for f in while_predicting}
    assert len(elapsed) >= 3, while_predicting  # the clock moved while the one case was predicting
    assert "0/1" in while_predicting[0] and "1/1" in frames[-1]
    assert "case.exported" not in drawn  # info lines stay out of the terminal...
    events = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
    assert "case.exported" in events and "request.finished" in events  # ...and go to the log file

    code, drawn = _in_a_terminal(tmp_path, "-q", delay=0.5)  # -q: no log lines, the line stays
    assert code == 0 and "segmenting" in drawn
    code, drawn = _in_a_terminal(tmp_path, "--no-progress", delay=0.5)
    assert code == 0 and "segmenting" not in drawn and "case.exported" in drawn  # info lines, no line


def test_a_reader_that_goes_away_ends_the_monitor_quietly(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    line = {
        "event": "request.started",
        "timestamp": "2026-11-30T00:00:00Z",
        "request_id": "r",
        "level": "info",
    }
    log.write_text((json.dumps(line) + "\n") * 20_000)
    monitor = [sys.executable, "-m", "asyncflow", "monitor", "--summary", "--json", str(log)]
    process = subprocess.Popen(monitor, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # as `| head` does once it has what it wants
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr


def test_list_options_take_one_value_and_the_demo_lists_only_what_it_uses(capsys) -> None:
    args = build_parser().parse_args(["run", "--folds", "0,1", "in.tar", "-o", "out"])
    assert (args.folds, args.inputs) == ("0,1", ["in.tar"])  # a path, or a PACS query: text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    demo_help = capsys.readouterr().out
    assert "--task" not in demo_help and "--folds" not in demo_help and "--device" in demo_help
    for command in ("run", "flame", "stats", "monitor"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "``" not in capsys.readouterr().out


@pytest.mark.anyio
async def test_a_request_that_ends_in_error_logs_its_cause_for_the_monitor(
    tmp_path: Path, fake_settings
) -> None:
    from helpers import phantom_backend

    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    with pytest.raises(RequestError):
        await run_request([b"plain text"], fake_settings(tmp_path), backend=phantom_backend())
    summary = Monitor().feed_all(logs.getvalue().splitlines()).summary()
    (error,) = summary["request_errors"]
    assert error["error_type"] == "RequestError" and error["reason"].startswith(
        "no usable case in the request"
    )


def test_while_inputs_are_read_the_line_says_what_is_known_and_an_eta_once_a_case_ended() -> None:
    from asyncflow.cli.progress import ProgressDisplay
    from asyncflow.result import Progress

    display = ProgressDisplay(enabled=False)
    display(Progress(done=0, failed=0, total=None, known=9, inputs_read=3, inputs=4))
    assert "at least 9 cases, 3 of 4 inputs read" in display.line() and "<" not in display.line()
    display(Progress(done=2, failed=0, total=None, known=9, inputs_read=3, inputs=4))
    assert "2/9" in display.line() and "<" in display.line()  # elapsed<remaining
    display(Progress(done=2, failed=0, total=14, known=14, inputs_read=4, inputs=4))
    assert "2/14" in display.line() and "inputs read" not in display.line()

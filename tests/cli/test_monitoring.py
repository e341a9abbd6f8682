"""Log-based monitoring: every event matches ops/events.schema.json; the monitor agrees with the report;
the ops assets only use documented events and fields."""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from helpers import phantom_nifti

from asyncflow import Result, run_request
from asyncflow.backends import Backend
from asyncflow.cli import main
from asyncflow.cli.monitor import Monitor
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom
from asyncflow.log import configure_logging

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
SCHEMA = json.loads((OPS / "events.schema.json").read_text())
EVENTS: dict[str, dict[str, Any]] = SCHEMA["$defs"]
COMMON_FIELDS = set(SCHEMA["properties"])
STREAM_LABELS = {"app", "level", "node"}


def _validator() -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    return jsonschema.Draft202012Validator(SCHEMA)


@pytest.fixture(scope="module")
def two_interleaved_runs(
    tmp_path_factory, settings_factory, loaded_backend: Backend
) -> tuple[str, list[Result]]:
    """Two requests run concurrently in one process: one log with their lines interleaved."""
    rng = np.random.default_rng(99)
    flat = tmp_path_factory.mktemp("flat") / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(flat))
    series = [dicom_series_datasets(make_phantom(rng, (32, 48, 48)), series_number=n) for n in (1, 2)]
    requests = [
        [
            *(dicom_series_tar([s]) for s in series),
            {"flat.nii.gz": flat.read_bytes()},
            {"v1.nii.gz": phantom_nifti(rng)},
        ],
        [{"v2.nii.gz": phantom_nifti(rng)}, {"v3.nii.gz": phantom_nifti(rng)}],
    ]
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    results: list[Result] = []

    async def both() -> None:
        async def one(entries: list[Any]) -> None:
            settings = settings_factory(tmp_path_factory.mktemp("work"))
            results.append(await run_request(entries, settings, backend=loaded_backend))

        async with anyio.create_task_group() as tg:
            for entries in requests:
                tg.start_soon(one, entries)

    anyio.run(both)
    return logs.getvalue(), results


def test_every_line_of_a_run_is_a_documented_event(two_interleaved_runs) -> None:
    text, results = two_interleaved_runs
    validator = _validator()
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        errors = [e.message for e in validator.iter_errors(line)]
        assert errors == [], (line["event"], errors)
    # The two requests really interleave, and each has one summary.
    ids = [line.get("request_id") for line in lines if "request_id" in line]
    assert {r.request_id for r in results} == set(ids)
    switches = sum(a != b for a, b in itertools.pairwise(ids))
    assert switches > 2
    assert sum(line["event"] == "request.finished" for line in lines) == 2


def test_the_schema_rejects_undocumented_events_and_fields() -> None:
    validator = _validator()
    line = {"event": "case.predicted", "level": "info", "timestamp": "2026-11-27T10:00:00.000001Z"}
    line |= {"request_id": "0123456789ab", "case_id": "case-0001", "voxels": 8, "duration_s": 0.5}
    line |= {"predict_queue": 0, "batch": 1, "worker": 0}
    assert list(validator.iter_errors(line)) == []
    assert list(validator.iter_errors({**line, "event": "case.vanished"}))
    assert list(validator.iter_errors({**line, "patient_name": "x"}))
    assert list(validator.iter_errors({k: v for k, v in line.items() if k != "voxels"}))


def test_every_event_in_the_code_is_in_the_schema_and_the_runbook() -> None:
    code = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "asyncflow").rglob("*.py"))
    emitted = set(re.findall(r"log\.(?:debug|info|warning|error)\(\s*\"([a-z0-9_]+\.[a-z0-9_]+)\"", code))
    emitted.add("library.logged")  # set by the stdlib bridge in log.py
    assert emitted == set(EVENTS)
    runbook = (OPS / "README.md").read_text(encoding="utf-8")
    assert all(f"| `{event}` |" in runbook for event in EVENTS)


def test_library_logging_becomes_library_events() -> None:
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    logging.getLogger("highdicom.seg").warning("cannot read /data/Doe_John/ct/1.dcm")
    logging.getLogger("highdicom.seg").info("chatty detail")  # below WARNING: not shown
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    validator = _validator()
    assert [(line["event"], line["logger"]) for line in lines] == [("library.logged", "highdicom.seg")]
    assert lines[0]["message"] == "cannot read <path>" and list(validator.iter_errors(lines[0])) == []


def test_monitor_summary_matches_the_reports(two_interleaved_runs, tmp_path: Path, capsys) -> None:
    text, results = two_interleaved_runs
    summary = Monitor().feed_all(text.splitlines()).summary()
    cases = [c for r in results for c in r.cases]
    assert summary["requests"] == {"total": 2, "by_status": {"partial": 1, "done": 1}}
    assert summary["cases"] == {
        "total": len(cases),
        "done": sum(c.status == "done" for c in cases),
        "failed": sum(c.status == "failed" for c in cases),
        "resumed": 0,
    }
    for stage in ("prepare", "predict", "export"):
        seconds = [round(c.stage_s[stage], 4) for c in cases if stage in c.stage_s]
        row = summary["stages"][stage]
        assert row["n"] == len(seconds)
        assert row["p50_s"] == pytest.approx(np.percentile(seconds, 50), abs=1e-4)
        assert row["p95_s"] == pytest.approx(np.percentile(seconds, 95), abs=1e-4)
    assert summary["stages"]["unpack"]["n"] == 6  # one per input
    reasons = [f"{f['stage']}: {f['error_type']}: {f['reason']}" for f in summary["failures"]]
    assert reasons == [c.error for c in cases if c.error]
    assert 0 < summary["gpu_busy_share"] <= 1
    assert summary["busy_label"] == "predict busy"  # the tiny model ran on the CPU: no GPU to speak of

    # The command prints the same, as text or JSON.
    log = tmp_path / "run.log"
    log.write_text(text + "not json\n")
    assert main(["monitor", "--summary", str(log)]) == 0
    printed = capsys.readouterr().out
    assert "failures by reason:" in printed and reasons[0] in printed
    assert re.search(rf"^predict\s+{summary['stages']['predict']['n']}\s", printed, flags=re.MULTILINE)
    assert main(["monitor", "--json", str(log)]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["failures"] == summary["failures"] and as_json["lines"]["ignored"] == 1


def test_monitor_live_view_while_requests_run() -> None:
    monitor = Monitor()
    base = {"request_id": "0123456789ab", "level": "info"}

    def feed(second: int, event: str, **fields: Any) -> None:
        monitor.feed(
            json.dumps({**base, "event": event, "timestamp": f"2026-11-27T10:00:{second:02d}Z", **fields})
        )

    feed(0, "request.started", inputs=1, bytes=10)
    for n in (1, 2, 3):
        feed(1, "case.assembled", case_id=f"case-000{n}", kind="nifti", files=1)
    feed(1, "request.assembled", cases=3, files_skipped=0)
    feed(2, "case.prepared", case_id="case-0001", channels=1, duration_s=1.0, predict_queue=0)
    feed(4, "case.predicted", case_id="case-0001", voxels=8, duration_s=2.0, predict_queue=1)
    feed(6, "case.predicted", case_id="case-0002", voxels=8, duration_s=2.0, predict_queue=0)
    feed(6, "case.finished", case_id="case-0001", status="done", kind="nifti", prepare_s=1.0, predict_s=2.0)
    snapshot = monitor.snapshot()
    assert snapshot["in_stage"] == {"prepare": 1, "predict": 0, "export": 1}
    assert (snapshot["cases_known"], snapshot["cases_done"], snapshot["requests_running"]) == (3, 1, 1)
    assert snapshot["cases_per_min"] == pytest.approx(10.0)  # 1 case in 6 s
    assert snapshot["eta_s"] == pytest.approx(12.0)
    assert snapshot["gpu_busy_share"] == pytest.approx(1.0)  # 2..4 and 4..6: no gap
    # A cascade's case between its networks is in the CPU work of its next input, then waits for
    # the device again, then for export.
    feed(7, "case.predicted", case_id="case-0003", voxels=8, duration_s=1.0, predict_queue=0, stage=1)
    assert monitor.snapshot()["in_stage"] == {"prepare": 1, "predict": 0, "export": 1}
    feed(8, "case.staged", case_id="case-0003", stage=2, duration_s=1.0, worker=0)
    assert monitor.snapshot()["in_stage"] == {"prepare": 0, "predict": 1, "export": 1}
    feed(9, "case.predicted", case_id="case-0003", voxels=8, duration_s=1.0, predict_queue=0, stage=2)
    assert monitor.snapshot()["in_stage"] == {"prepare": 0, "predict": 0, "export": 2}


def _queries() -> list[str]:
    dashboard = json.loads((OPS / "grafana" / "asyncflow-dashboard.json").read_text())
    rules = yaml.safe_load((OPS / "loki" / "asyncflow-rules.yaml").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return queries


@pytest.mark.parametrize("query", _queries())
def test_ops_queries_use_only_documented_events_fields_and_labels(query: str) -> None:
    events = set()
    for pattern in re.findall(r'event=~?"([^"]+)"', query):
        events |= {e for e in EVENTS if re.fullmatch(pattern.replace(".", r"\."), e)}
        assert any(re.fullmatch(pattern.replace(".", r"\."), e) for e in EVENTS), pattern
    fields = COMMON_FIELDS | {f for e in events for f in EVENTS[e]["properties"]}
    selectors = re.findall(r"\{([^{}]*)\}\s*\|", query)
    for selector in selectors:
        assert {name for name in re.findall(r"(\w+)\s*=~?", selector)} <= STREAM_LABELS, selector
    used = set(re.findall(r"unwrap (\w+)", query))
    used |= {name for part in re.findall(r"\bby \(([^)]*)\)", query) for name in re.findall(r"\w+", part)}
    used |= set(re.findall(r"\|\s*(\w+)\s*(?:=|!=|=~|>|<)", query)) - {"__error__"}
    used |= set(re.findall(r"\{\{\s*\.(\w+)\s*\}\}", query))
    assert events, "every query names the events it reads"
    assert used <= fields | STREAM_LABELS, used - fields - STREAM_LABELS


def test_collector_sets_only_low_cardinality_labels() -> None:
    alloy = (OPS / "alloy" / "asyncflow.alloy").read_text()
    blocks = re.findall(r"stage\.(?:labels|static_labels) \{\s*values = \{([^}]*)\}", alloy)
    assert blocks
    labels = {name for block in blocks for name in re.findall(r"(\w+)\s*=", block)}
    assert labels == STREAM_LABELS

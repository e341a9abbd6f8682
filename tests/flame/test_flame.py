"""The FLAME adapter, driven through a stand-in of FLAME's local test mode (tests/flame_harness.py)."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from flame_harness import MockFlameCore, analyzer_kwargs, run_star
from helpers import make_tar, phantom_nifti

from asyncflow import Progress, SettingsError
from asyncflow.cli import main
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom
from asyncflow.flame.analysis import PassThroughAggregator, ZipAggregator, nnUNetAnalyzer
from asyncflow.flame.bundle import BUNDLE_FORMAT, MANIFEST, pack_node_results
from asyncflow.flame.hub import HubReporter, hub_text
from asyncflow.log import configure_logging

# Planted in node data: none of it may reach the Hub or the logs.
PATIENT_NAME, PATIENT_ID = "Mustermann^Erika", "PID-998877"
PHI_KEY = "site-x/Mustermann_Erika_CT.tar.gz"
SECRETS = ("Mustermann", "Erika", PATIENT_ID, "19700101", "site-x")


def _series(rng: np.random.Generator, **kwargs: Any) -> list[pydicom.Dataset]:
    return dicom_series_datasets(make_phantom(rng, (32, 48, 48)), patient_name=PATIENT_NAME, patient_id=PATIENT_ID, **kwargs)  # fmt: skip


def test_module_imports_and_subclasses_the_stand_ins_without_the_sdk() -> None:
    code = (
        "import importlib.util, asyncflow.flame.analysis as f, asyncflow.flame.standin as s;"
        "assert importlib.util.find_spec('flame') is None;"
        "assert not f.FLAME_SDK and issubclass(f.nnUNetAnalyzer, s.StarAnalyzer);"
        "assert issubclass(f.ZipAggregator, s.StarAggregator)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_three_nodes_with_several_archives_each_end_to_end(
    tmp_path: Path, model_dir: Path, rng: np.random.Generator
) -> None:
    series = {name: _series(rng, series_number=n) for n, name in enumerate("abcdef", start=1)}
    gappy = _series(rng, series_number=9)
    del gappy[10]  # a missing slice: the case fails in prepare, the others go on
    nodes = [
        [{PHI_KEY: dicom_series_tar([series["a"]]), "site-x/second.tar": dicom_series_tar([series["b"]], compression="")}],
        [
            {"ct/both.tar.gz": dicom_series_tar([series["c"], series["d"]]), "ct/gappy.tar.gz": dicom_series_tar([gappy])},
            {
                "ct/broken.tar.gz": make_tar({"x": rng.bytes(40_000)})[:9_000],
                "vol/scan.nii.gz": phantom_nifti(rng),
                "site-x/Erika_Mustermann_notes.tar": make_tar({"Mustermann/Erika_19700101.txt": b"notes"}),
            },
        ],
        [{"e.tar.gz": dicom_series_tar([series["e"]]), "f.tar.gz": dicom_series_tar([series["f"]])}],
    ]  # fmt: skip
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    run = run_star(
        nnUNetAnalyzer,
        ZipAggregator,
        nodes,
        output_type="bytes",
        analyzer_kwargs=analyzer_kwargs(model_dir, tmp_path / "work"),
    )

    # The aggregated bytes are a ZIP: one SEG per good DICOM series, one NIfTI, a manifest.
    archive = zipfile.ZipFile(io.BytesIO(run.final_result))
    manifest = json.loads(archive.read(MANIFEST))
    assert manifest["format"] == BUNDLE_FORMAT
    segs = sorted(n for n in archive.namelist() if "/dicom_seg/" in n and n.endswith(".dcm"))
    label_files = [n for n in archive.namelist() if n.endswith(".mitklabel.json")]
    assert sorted(n.removesuffix(".mitklabel.json") for n in label_files) == [s[:-4] for s in segs]
    niftis = [n for n in archive.namelist() if "/nifti_seg/" in n]
    assert len(niftis) == 1 and niftis[0].startswith("node_1/nifti_seg/input")  # named by input index
    # No byte of the ZIP (names, manifest, SEGs, label files) holds a name, ID or birth date, nor
    # the object keys or member names that carry them.
    for member in archive.namelist():
        content = member.encode() + archive.read(member)
        assert not any(secret.encode() in content for secret in SECRETS), member
    referenced = []
    for name in segs:
        seg = pydicom.dcmread(io.BytesIO(archive.read(name)))
        assert seg.Modality == "SEG" and seg.PatientIdentityRemoved == "YES"  # FLAME's default
        data = archive.read(name)
        assert not any(secret.encode() in data for secret in (PATIENT_NAME, PATIENT_ID, "19700101"))
        referenced.append(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    assert sorted(referenced) == sorted(s[0].SeriesInstanceUID for s in series.values())
    assert [n.split("/")[0] for n in segs] == ["node_0"] * 2 + ["node_1"] * 2 + ["node_2"] * 2

    # The manifest accounts for every case and input, with reasons.
    assert manifest["totals"] == {
        "nodes": 3, "cases": 8, "cases_done": 7, "cases_failed": 1, "files": 13
    }  # fmt: skip
    # Nodes are listed in arrival order, which the threads decide.
    by_node = {n["node"]: n for n in manifest["nodes"]}
    assert {n: entry["status"] for n, entry in by_node.items()} == {
        "node_0": "done", "node_1": "partial", "node_2": "done"
    }  # fmt: skip
    for case in manifest["cases"]:
        if case["status"] == "done":
            assert case["file"] in archive.namelist()
        else:
            assert case["file"] is None and case["error_stage"] == "prepare" and case["error"]
    inputs = {i["name"]: i["error"] for i in by_node["node_1"]["report"]["inputs"]}
    assert inputs["input-2"].startswith("archive could not be read")  # ct/broken.tar.gz, named by index
    skipped = by_node["node_1"]["report"]["skipped_files"]
    assert [(f["origin"], f["path"]) for f in skipped] == [("input-4", "input-4/skipped-1")]

    # What reached the Hub: valid log types, progress strictly rising to 100, no patient data.
    for node in ("node_0", "node_1", "node_2"):
        hub = run.hubs[node]
        assert hub.warnings == []
        assert hub.progress == sorted(set(hub.progress)) and hub.progress[-1] == 100
        assert all(t != "error" for t, _ in hub.logs)
    assert any(
        t == "warn" and "failed: prepare ValueError x1; inputs lost: unreadable archive x1" in m
        for t, m in run.hubs["node_1"].logs
    )
    hub_text_sent = "\n".join(m for h in run.hubs.values() for _, m in h.logs)
    for secret in (*SECRETS, "broken", "gappy", "scan.nii"):
        assert secret not in hub_text_sent
        assert secret not in logs.getvalue()


@pytest.mark.slow
def test_pass_through_keeps_every_node_result_and_an_empty_node_does_not_sink_the_others(
    tmp_path: Path, model_dir: Path, rng: np.random.Generator
) -> None:
    nodes = [[{"a.nii.gz": phantom_nifti(rng)}], [{"notes.txt": b"not an image"}]]
    run = run_star(
        nnUNetAnalyzer,
        PassThroughAggregator,
        nodes,
        output_type="pickle",
        analyzer_kwargs=analyzer_kwargs(model_dir, tmp_path / "work"),
    )
    results = sorted(pickle.loads(run.final_result), key=lambda r: r["node"])  # arrival order
    assert results == [run.analyzers["node_0"].latest_result, run.analyzers["node_1"].latest_result]
    assert [r["status"] for r in results] == ["done", "failed"]
    assert list(results[0]["nifti_seg_bytes"]) == ["input000_1.nii.gz"]
    assert "no usable case" in results[1]["error"]
    assert results[1]["report"]["skipped_files"][0]["reason"] == "neither DICOM nor NIfTI"
    (case,) = results[0]["report"]["cases"]
    assert case["files"] == 1 and "location" not in case  # no path inside an input leaves the node
    assert ("warn", "no case segmented: no usable case in the request: 1 input(s), 0 unreadable, "
            "1 file(s) skipped (the report gives each file's reason)") in run.hubs["node_1"].logs  # fmt: skip
    assert run.hubs["node_1"].progress == [100]
    assert not any(t == "error" for h in run.hubs.values() for t, _ in h.logs)


def test_a_bad_setting_fails_the_node_with_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("nnUNet_results", "RESULTS_FOLDER", "TASK_NAME"):
        monkeypatch.delenv(name, raising=False)
    core = MockFlameCore("node_0", "default", ["node_0", "node_1"], "node_1", {}, s3_data=[])
    with pytest.raises(
        SettingsError, match=r"no trained model found: looked for .* as an nnU-Net v2 model folder"
    ):
        nnUNetAnalyzer(flame=core, model_dir=str(tmp_path))
    with pytest.raises(SettingsError, match="unknown setting"):
        nnUNetAnalyzer(flame=core, modeldir=str(tmp_path))
    with pytest.raises(SettingsError, match=r"FLAME: analyzer_kwargs=\{'model_dir': DIR\}"):
        nnUNetAnalyzer(flame=core)  # the error says how a FLAME user names a model
    assert [t for t, _ in core.hub.logs] == ["error", "error", "error"]
    assert str(tmp_path) not in core.hub.logs[0][1]


def test_bundle_keeps_every_file_and_accounts_for_odd_node_results() -> None:
    good = {
        "status": "partial",
        "node": "../evil/node",
        "dicom_seg_bytes": {"s1.dcm": b"SEG-1", "../../etc/passwd": b"SEG-2"},
        "nifti_seg_bytes": {"v.nii.gz": b"NII"},
        "report": {
            "request_id": "r1",
            "cases": [
                {"case_id": "case-0001", "status": "done", "output": "s1.dcm"},
                {"case_id": "case-0002", "status": "failed", "output": None, "error": "prepare: X: y"},
            ],
        },
    }
    failed = {"status": "failed", "error": "no usable case", "dicom_seg_bytes": {}, "nifti_seg_bytes": {}}
    archive = zipfile.ZipFile(io.BytesIO(pack_node_results([good, None, failed, good])))
    assert archive.testzip() is None
    manifest = json.loads(archive.read(MANIFEST))
    nodes = manifest["nodes"]
    assert [n["node"] for n in nodes] == ["evil_node", "node-2", "node-3", "evil_node-2"]
    assert [n["status"] for n in nodes] == ["partial", "invalid", "failed", "partial"]
    assert nodes[1]["error"] == "not an asyncflow result: NoneType"
    assert nodes[2]["error"] == "no usable case"
    assert nodes[0]["renamed"] == {"evil_node/dicom_seg/etc_passwd": "../../etc/passwd"}
    # Byte for byte, nothing outside the node folders but the manifest.
    assert archive.read("evil_node/dicom_seg/etc_passwd") == b"SEG-2"
    assert archive.read("evil_node-2/nifti_seg/v.nii.gz") == b"NII"
    assert all(n == MANIFEST or n.split("/")[0] in {"evil_node", "evil_node-2"} for n in archive.namelist())
    assert [(c["node"], c["case_id"], c["file"]) for c in manifest["cases"]] == [
        ("evil_node", "case-0001", "evil_node/dicom_seg/s1.dcm"),
        ("evil_node", "case-0002", None),
        ("evil_node-2", "case-0001", "evil_node-2/dicom_seg/s1.dcm"),
        ("evil_node-2", "case-0002", None),
    ]
    assert manifest["totals"]["files"] == 6


def test_hub_progress_only_moves_forward_and_reports_quarters() -> None:
    core = MockFlameCore("node_0", "default", ["node_0", "node_1"], "node_1", {})
    hub = HubReporter(core)
    hub(Progress(done=1, failed=0, total=None))  # total unknown yet: nothing to say
    for ended in range(1, 9):
        failed = 1 if ended >= 2 else 0
        hub(Progress(done=ended - failed, failed=failed, total=8))
    hub.progress(50)  # a step back is never sent
    assert core.hub.warnings == []
    assert core.hub.progress == [12, 25, 37, 50, 62, 75, 87, 99]
    messages = [m for _, m in core.hub.logs]
    assert messages == [
        "8 case(s) found",
        "2/8 cases finished, 1 failed",
        "4/8 cases finished, 1 failed",
        "6/8 cases finished, 1 failed",
    ]


def test_hub_progress_follows_the_cases_before_the_last_input_is_read() -> None:
    """A node's 32 objects, each one case: objects are fetched while earlier cases end, and the
    number of cases is final only when the last object is read. Progress follows the cases that
    end (the least total being the cases found so far) instead of waiting at 20 % and jumping."""
    core = MockFlameCore("node_0", "default", ["node_0", "node_1"], "node_1", {})
    hub = HubReporter(core)
    objects, lag = 32, 3  # cases end three objects behind the fetching
    sent: list[tuple[int, int]] = []  # (cases ended, progress sent so far)

    def step(ended: int, fetched: int, total: int | None) -> None:
        read = fetched  # each object read as it is fetched, one case each
        hub(Progress(ended, 0, total, fetched, objects, known=read, inputs_read=read, inputs=objects))
        sent.append((ended, core.hub.progress[-1] if core.hub.progress else 0))

    for fetched in range(1, objects + 1):
        step(max(0, fetched - lag), fetched, None)
    for ended in range(objects - lag + 1, objects + 1):
        step(ended, objects, objects)
    assert core.hub.warnings == []
    half = next(p for ended, p in sent if ended == objects // 2)
    assert half >= 50  # most of the objects fetched (of 20 %), half the cases ended (of 80 %)
    steps = [b - a for a, b in zip(core.hub.progress, core.hub.progress[1:], strict=False)]
    assert max(steps) <= 5  # no jump when the total becomes known
    quarters = [m for _, m in core.hub.logs if "cases finished" in m]
    assert quarters[0] == "8/at least 11 cases finished, 0 failed"


def test_a_gpu_torch_cannot_use_is_said_on_the_hub_when_the_device_is_auto(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = "NVIDIA driver 550.54.15 is older than 580.65.06, which torch 2.14.1 (built for CUDA 13.0) needs"
    monkeypatch.setattr("asyncflow.flame.analysis.gpu_problem", lambda: reason)
    for device, said in (
        ("auto", [("warn", f"GPU not used, the model runs on the CPU: {reason}")]),
        ("cpu", []),
    ):
        core = MockFlameCore("node_0", "default", ["node_0", "node_1"], "node_1", {})
        nnUNetAnalyzer(flame=core, **analyzer_kwargs(model_dir, tmp_path, device=device))
        assert core.hub.logs == said  # asked for the CPU: nothing to say


def test_hub_text_drops_names_and_paths() -> None:
    message = "entry 0: value of 'site-x/Mustermann_Erika.tar' is str; see /tmp/asyncflow-1/inputs/0001/x"
    assert hub_text(message) == "entry 0: value of <name> is str; see <path>"


def test_flame_command_without_the_sdk_says_how_to_install_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flame"]) == 2
    assert "FLAME SDK is not installed" in capsys.readouterr().err


def test_with_the_sdk_installed_the_classes_subclass_it_and_the_command_starts_a_star_model(
    tmp_path: Path, model_dir: Path
) -> None:
    # A stand-in SDK package on the path: its StarModel records how it was started.
    sdk = tmp_path / "sdk" / "flame"
    sdk.mkdir(parents=True)
    (sdk / "__init__.py").write_text("")
    (sdk / "star.py").write_text(
        "import json, os\n"
        "class StarAnalyzer:\n    pass\n"
        "class StarAggregator:\n    pass\n"
        "class StarModel:\n"
        "    def __init__(self, analyzer, aggregator, data_type, query=None, simple_analysis=True,\n"
        "                 output_type='str', analyzer_kwargs=None, aggregator_kwargs=None):\n"
        "        assert issubclass(analyzer, StarAnalyzer) and issubclass(aggregator, StarAggregator)\n"
        "        with open(os.environ['STAR_RECORD'], 'w') as f:\n"
        "            json.dump(dict(analyzer=analyzer.__name__, aggregator=aggregator.__name__,\n"
        "                           data_type=data_type, query=query, simple_analysis=simple_analysis,\n"
        "                           output_type=output_type, analyzer_kwargs=analyzer_kwargs), f, default=str)\n"
    )
    record = tmp_path / "record.json"
    env = {**os.environ, "PYTHONPATH": str(sdk.parent), "STAR_RECORD": str(record)}

    def start(*args: str) -> dict[str, Any]:
        command = [sys.executable, "-m", "asyncflow", "flame", *args]
        subprocess.run(command, env=env, check=True, capture_output=True)
        return json.loads(record.read_text())

    assert start("--model", str(model_dir), "--device", "cpu") == {
        "analyzer": "nnUNetAnalyzer",
        "aggregator": "ZipAggregator",
        "data_type": "s3",
        "query": None,  # the SDK fetches nothing (and logs none of it): the analyzer streams
        "simple_analysis": True,
        "output_type": "bytes",
        "analyzer_kwargs": {"model_dir": str(model_dir), "device": "cpu"},
    }
    passthrough = start("--aggregator", "passthrough", "--query", "a.tar", "--query", "b.tar")
    assert passthrough["aggregator"] == "PassThroughAggregator" and passthrough["output_type"] == "pickle"
    assert passthrough["query"] is None and passthrough["analyzer_kwargs"] == {"keys": ["a.tar", "b.tar"]}
    in_memory = start("--inputs", "sdk", "--query", "a.tar", "--fetch-window", "3")
    assert in_memory["query"] == ["a.tar"] and in_memory["analyzer_kwargs"] == {"fetch_window": 3}


@pytest.fixture
def _restore_process_logging():
    """take_over_logging changes process-wide hooks and handlers: put them back afterwards."""
    import logging
    import sys
    import threading

    root = logging.getLogger()
    saved = (sys.excepthook, threading.excepthook, list(root.handlers), root.level)
    yield
    sys.excepthook, threading.excepthook = saved[0], saved[1]
    root.handlers[:] = saved[2]
    root.setLevel(saved[3])


@pytest.mark.usefixtures("_restore_process_logging")
@pytest.mark.parametrize("sdk", ["stand-in", "flamesdk"])
def test_under_the_sdk_every_line_is_written_once_scrubbed_and_httpx_stays_quiet(
    tmp_path: Path, model_dir: Path, capfd: pytest.CaptureFixture[str], sdk: str
) -> None:
    import logging
    import threading

    from flame_harness import MockFlameCore, sdk_logging_setup

    if sdk == "flamesdk":  # where the real SDK is installed, its own set-up
        sdk_logging = pytest.importorskip("flamesdk.resources.utils.logging")
        sdk_logging_setup = sdk_logging._get_logger  # what FlameLogger() calls
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    sdk_logging_setup()  # the SDK's core is built before the analyzer, and sets up its own logging
    core = MockFlameCore("node_0", "default", ["node_0", "node_1"], "node_1", {})
    nnUNetAnalyzer(core, **analyzer_kwargs(model_dir, tmp_path / "work"))
    logging.getLogger("flamesdk.resources").warning("could not send /data/Mustermann_Erika/ct.tar")
    logging.getLogger("httpx").info("HTTP Request: POST http://po/stream_logs")
    worker = threading.Thread(
        target=lambda: (_ for _ in ()).throw(RuntimeError("at /data/Mustermann_Erika/x.dcm"))
    )
    worker.start()
    worker.join()
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # nothing reaches the console but through asyncflow's handler
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    sdk = [line for line in lines if line.get("logger") == "flamesdk.resources"]
    assert len(sdk) == 1 and sdk[0]["message"] == "could not send <path>"
    assert not any("HTTP Request" in json.dumps(line) for line in lines)
    (crash,) = [line for line in lines if line["event"] == "exception.unhandled"]
    assert crash["error_type"] == "RuntimeError" and crash["reason"] == "at <path>"
    assert "Mustermann" not in stream.getvalue()

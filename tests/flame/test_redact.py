"""What of a report leaves a FLAME node: no name from the data, every count and reason."""

from __future__ import annotations

from asyncflow.flame.redact import redact_report

REPORT = {
    "request_id": "0123456789ab",
    "status": "partial",
    "duration_s": 1.0,
    "error": None,
    "inputs": [
        {
            "index": 0,
            "name": "bucket/Doe_Jane/ct.tar",
            "kind": "archive",
            "files": 3,
            "bytes": 9,
            "error": None,
        },
        {
            "index": 1,
            "name": "a",
            "kind": "archive",
            "files": 0,
            "bytes": 9,
            "error": "archive could not be read: OSError: [Errno 5] /tmp/asyncflow-x/inputs/0001/Doe_Jane/x",
        },
    ],
    "cases": [
        {
            "case_id": "case-0001",
            "origin": "bucket/Doe_Jane/ct.tar",
            "input": 0,
            "location": "Doe_Jane/CT",
            "status": "failed",
            "error": "prepare: ValueError: series has a gap",
            "fallback": None,
            "series_number": 3,
        },
        {
            "case_id": "case-0002",
            "origin": "bucket/Doe_Jane/ct.tar",
            "input": 0,
            "location": "Doe_Jane/MR",
            "status": "done",
            "error": None,
            "fallback": None,
            "statistics_error": "FileNotFoundError: [Errno 2] /tmp/asyncflow-x/inputs/0000/Doe_Jane/MR/1",
        },
    ],
    "skipped_files": [
        {
            "origin": "bucket/Doe_Jane/ct.tar",
            "input": 0,
            "path": "Doe_Jane/notes.txt",
            "reason": "neither DICOM nor NIfTI",
            "refused": False,
        },
        {
            "origin": "bucket/Doe_Jane/ct.tar",
            "input": 0,
            "path": "Doe_Jane/CT/copy",
            "reason": "same SOPInstanceUID as another file, which was kept (see kept)",
            "refused": False,
            "kept": {"origin": "a", "input": 1, "path": "Doe_Jane/CT/1"},
        },
    ],
}


def test_a_redacted_report_names_inputs_and_files_by_position_only() -> None:
    redacted = redact_report(REPORT)
    assert "Doe" not in repr(redacted) and "Jane" not in repr(redacted)
    assert [i["name"] for i in redacted["inputs"]] == ["input-0", "input-1"]
    assert redacted["inputs"][1]["error"] == "archive could not be read: OSError: [Errno 5] <path>"
    case, other = redacted["cases"]
    assert other["statistics_error"] == "FileNotFoundError: [Errno 2] <path>"  # an output's error too
    assert "location" not in case and case["origin"] == "input-0" and case["series_number"] == 3
    assert case["error"] == "prepare: ValueError: series has a gap"  # reasons stay
    assert [(s["path"], s["reason"][:12]) for s in redacted["skipped_files"]] == [
        ("input-0/skipped-1", "same SOPInst"),  # ranked by path: Doe_Jane/CT/copy < Doe_Jane/notes.txt
        ("input-0/skipped-2", "neither DICO"),
    ]
    assert redacted["skipped_files"][0]["kept"] == "another copy of the same image"
    # A short input name ("a") is replaced only as a whole token, never inside words.
    assert "another" in redacted["skipped_files"][0]["reason"]
    assert REPORT["inputs"][0]["name"] == "bucket/Doe_Jane/ct.tar"  # the local report is untouched


def test_inputs_of_the_same_name_keep_their_own_cases() -> None:
    """Two data sources may both hold ``study.tar``: each case and skipped file stays with its input."""
    report = {
        "inputs": [
            {"index": 0, "name": "study.tar", "error": None},
            {"index": 1, "name": "study.tar", "error": None},
        ],
        "cases": [
            {"case_id": "case-0001", "origin": "study.tar", "input": 0, "error": None},
            {"case_id": "case-0002", "origin": "study.tar", "input": 1, "error": None},
        ],
        "skipped_files": [
            {"origin": "study.tar", "input": 1, "path": "notes.txt", "reason": "neither DICOM nor NIfTI"},
            {"origin": "study.tar", "input": 0, "path": "notes.txt", "reason": "neither DICOM nor NIfTI"},
        ],
    }
    redacted = redact_report(report)
    assert [c["origin"] for c in redacted["cases"]] == ["input-0", "input-1"]
    assert [s["path"] for s in redacted["skipped_files"]] == ["input-0/skipped-1", "input-1/skipped-1"]

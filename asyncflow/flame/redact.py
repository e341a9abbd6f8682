"""What of a request's report may leave a FLAME node: counts, reasons and series identity, never a
name taken from the data.

Object keys, archive names, member paths and file names may carry a patient's
name. :func:`redact_report` renames every input ``input-<index>`` (inputs are told apart
by index, never by name: two data sources may hold the same key), every skipped
file ``input-<index>/skipped-<k>`` (its rank among that input's skipped files,
sorted by path: whoever holds the input can list it again), drops each case's
``location``, and removes those names and any path from reasons and errors. The
local report (the CLI's ``report.json``) keeps every name.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from asyncflow.log import scrub

__all__ = ["redact_report"]


def redact_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``report`` (``Result.report()``) without any name from the data."""
    inputs = [dict(i) for i in report.get("inputs", [])]
    # By index: two data sources may hold objects of the same key.
    ids: dict[Any, str] = {int(i["index"]): f"input-{i['index']}" for i in inputs}
    renamed = {str(i["name"]): ids[int(i["index"])] for i in inputs}  # for the names in messages
    by_input: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for skipped in report.get("skipped_files", []):
        by_input[skipped.get("input")].append(dict(skipped))
    skipped_files = []
    for index, files in by_input.items():
        input_id = ids.get(index, "input-unknown")
        for rank, entry in enumerate(sorted(files, key=lambda f: str(f["path"])), start=1):
            renamed[str(entry["path"])] = f"{input_id}/skipped-{rank}"
            skipped_files.append({**entry, "origin": input_id, "path": f"{input_id}/skipped-{rank}"})
    clean = _cleaner(renamed)
    for entry in skipped_files:
        entry["reason"] = clean(entry["reason"])
        if "kept" in entry:
            entry["kept"] = "another copy of the same image"
    for entry in inputs:
        entry["name"] = ids[int(entry["index"])]
        entry["error"] = clean(entry.get("error"))
    cases = []
    for case in report.get("cases", []):
        case = {k: v for k, v in case.items() if k != "location"}
        case["origin"] = ids.get(case.get("input"), "input-unknown")
        for key in ("error", "fallback", *(k for k in case if k.endswith("_error"))):
            case[key] = clean(case.get(key))  # an output's error (statistics_error ...) may quote a path
        cases.append(case)
    return {
        **report,
        "error": clean(report.get("error")),
        "inputs": inputs,
        "cases": cases,
        "skipped_files": sorted(skipped_files, key=lambda f: f["path"]),
    }


def _cleaner(renamed: Mapping[str, str]) -> Any:
    """Replace every known file-like name (with a dot or a slash) by its id, longest first, then
    any remaining path. A bare word ("a", "scan") is left alone: it may be an English word of
    the text, and asyncflow's own reasons name inputs by index, not by name."""
    known = sorted((n for n in renamed if "." in n or "/" in n), key=len, reverse=True)
    # A name counts only as a whole token: "a" must not match inside "case".
    alternatives = "|".join(re.escape(n) for n in known)
    pattern = re.compile(rf"(?<![\w./\\-])(?:{alternatives})(?![\w./\\-])") if known else None

    def clean(text: str | None) -> str | None:
        if text is None:
            return None
        if pattern is not None:
            text = pattern.sub(lambda m: renamed[m.group(0)], text)
        return scrub(text, 1000)

    return clean

"""Pack the results of several FLAME nodes into one ZIP an analyst can open anywhere.

::

    manifest.json
    <node>/<folder>/<file>      each file of each map of output files, in its writer's folder
                                (asyncflow.writing.registry: dicom_seg/<case>.dcm, its label
                                file, SR and RTSTRUCT; nifti_seg/<case>.nii.gz)

``manifest.json`` lists every node (its status, request-level error and report)
and every case (its node, status, reason and file inside the ZIP). Nothing is
altered or dropped: every file of every node result is written byte for byte;
a name that is not a plain file name is made one and the manifest says so; a
node result that is not an asyncflow result is listed as ``invalid`` with its
type. Plain data only: nothing in the bundle needs pickle to read.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from asyncflow._version import __version__
from asyncflow.reading.names import sanitise_relpath
from asyncflow.writing.registry import contract_keys, folders

__all__ = ["BUNDLE_FORMAT", "MANIFEST", "pack_node_results"]

BUNDLE_FORMAT = "asyncflow.flame-bundle/1"
MANIFEST = "manifest.json"
# (folder in the ZIP, result key) of every map of output files (asyncflow.writing.registry): a
# node's result holds each map its asyncflow version writes
_FOLDERS = folders()


def _component(name: str, fallback: str) -> str:
    """``name`` when it is a plain file name, else a tame one derived from it."""
    return "_".join(sanitise_relpath(name, fallback).parts)


def _is_result(result: object) -> bool:
    """An asyncflow result: a status and the contract's maps of output files (those of the
    case outputs; a node of another version may lack the others)."""
    return (
        isinstance(result, Mapping)
        and all(isinstance(result.get(key), Mapping) for key in contract_keys())
        and "status" in result
    )


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate = f"{name}-{n}"
        n += 1
    taken.add(candidate)
    return candidate


class _Bundle:
    def __init__(self, archive: zipfile.ZipFile) -> None:
        self.archive = archive
        self.stamp = datetime.now(UTC).timetuple()[:6]
        self.node_names: set[str] = set()
        self.nodes: list[dict[str, Any]] = []
        self.cases: list[dict[str, Any]] = []

    def write(self, arcname: str, data: bytes) -> None:
        info = zipfile.ZipInfo(arcname, date_time=self.stamp)
        info.external_attr = 0o644 << 16
        # .nii.gz is compressed already; DICOM SEG frames and JSON shrink well.
        info.compress_type = zipfile.ZIP_STORED if arcname.endswith(".gz") else zipfile.ZIP_DEFLATED
        self.archive.writestr(info, data)

    def add(self, index: int, result: object) -> None:
        fallback = f"node-{index + 1}"
        if not _is_result(result):
            error = f"not an asyncflow result: {type(result).__name__}"
            node = _unique(fallback, self.node_names)
            self.nodes.append(
                {"node": node, "index": index, "status": "invalid", "error": error, "files": []}
            )
            return
        assert isinstance(result, Mapping)
        node = _unique(_component(str(result.get("node") or fallback), fallback), self.node_names)
        files: list[str] = []
        renamed: dict[str, str] = {}
        where: dict[str, str] = {}  # output name -> path in the ZIP
        taken: dict[str, set[str]] = {folder: set() for folder, _ in _FOLDERS}
        for folder, key in _FOLDERS:
            for name, data in (result.get(key) or {}).items():
                safe = _unique(_component(str(name), "output"), taken[folder])
                arcname = f"{node}/{folder}/{safe}"
                if safe != name:
                    renamed[arcname] = str(name)
                self.write(arcname, bytes(data))
                files.append(arcname)
                where[str(name)] = arcname
        report = dict(result.get("report") or {})
        for case in report.pop("cases", []):
            self.cases.append({"node": node, **case, "file": where.get(case.get("output") or "")})
        entry: dict[str, Any] = {
            "node": node,
            "index": index,
            "status": result["status"],
            "error": result.get("error"),
            "files": files,
            "report": report,
        }
        if renamed:
            entry["renamed"] = renamed
        self.nodes.append(entry)

    def manifest(self) -> dict[str, Any]:
        statuses = [c.get("status") for c in self.cases]
        return {
            "format": BUNDLE_FORMAT,
            "asyncflow_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "totals": {
                "nodes": len(self.nodes),
                "cases": len(self.cases),
                "cases_done": statuses.count("done"),
                "cases_failed": statuses.count("failed"),
                "files": sum(len(n["files"]) for n in self.nodes),
            },
            "nodes": self.nodes,
            "cases": self.cases,
        }


def pack_node_results(results: Sequence[object]) -> bytes:
    """One ZIP (bytes) holding every node's SEG/NIfTI files and a manifest, in arrival order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        bundle = _Bundle(archive)
        for index, result in enumerate(results):
            bundle.add(index, result)
        bundle.write(MANIFEST, (json.dumps(bundle.manifest(), indent=2) + "\n").encode())
    return buffer.getvalue()

"""A FLAME node's local storage as the request's case sink: a restarted analysis redoes only
what its earlier deployment did not finish.

FLAME's pod orchestrator restarts an analysis that failed or hangs as a fresh deployment.
The SDK's node-local storage outlives it: ``save_intermediate_data(data, location="local",
tag=...)`` puts ``data``, pickled, into the node's result service, which keeps the object in
the node's MinIO and the tag in its database, under the analysis' project
(PrivateAIM/node-result-service, ``project/routers/local.py``), until the project is deleted.
``get_local_tags()`` lists the project's tags, ``get_intermediate_data(location="local",
tag=...)`` reads what is stored under one.

:class:`NodeStorage` keeps each finished case there, as ``--resume``'s journal keeps it in an
output folder: its artifacts, their bytes and its report, under a tag made from the analysis,
the model key and the case key (:mod:`asyncflow.pipeline.keys`: the case's content, model,
settings). A tag holds no name and no object key (sha256, 22 hex digits: the service's tags have
at most 32 characters, lowercase letters, digits and hyphens). A restarted analyzer finds the
case by its key, gives back its outputs (status ``resumed``) and does not segment it again.

Storing never fails the request: a call that raises is logged (``flame.storage_failed``), and
costs only that case's shortcut on a restart. The SDK itself, though, marks the analysis failed
when its storage client gets an HTTP error (``raise_error``), whatever asyncflow does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from asyncflow.artifact import Artifact
from asyncflow.log import get_logger
from asyncflow.pipeline.journal import JOURNAL_VERSION, done_entry

__all__ = ["TAG_PREFIX", "NodeStorage", "case_tag"]

log = get_logger(__name__)

TAG_PREFIX = "asyncflow-"
_CALLS = ("save_intermediate_data", "get_intermediate_data", "get_local_tags")


def case_tag(analysis: str, model: str, case: str) -> str:
    """The tag a finished case is stored under: 32 characters, none of them from the data."""
    digest = hashlib.sha256(f"{analysis}\n{model}\n{case}".encode()).hexdigest()
    return f"{TAG_PREFIX}{digest[:22]}"


class NodeStorage:
    """The cases a FLAME node finished, in its local storage (a :class:`CaseSink` that keeps no
    files: the analysis' result holds them too)."""

    keeps_files = False

    def __init__(self, flame: Any) -> None:
        self._flame = flame
        get_analysis_id = getattr(flame, "get_analysis_id", None)
        self._analysis = str(get_analysis_id()) if callable(get_analysis_id) else ""
        tags = self._call("list", flame.get_local_tags, TAG_PREFIX)
        self._stored = {str(tag) for tag in tags or [] if str(tag).startswith(TAG_PREFIX)}
        self._models: dict[str, str] = {}  # case key -> the model key it was stored or found with
        log.info("flame.storage_listed", cases=len(self._stored))

    @classmethod
    def of(cls, flame: Any) -> NodeStorage | None:
        """The node's storage, or None when the FLAME core at hand lacks the SDK's three calls."""
        return cls(flame) if all(callable(getattr(flame, call, None)) for call in _CALLS) else None

    def _call(self, step: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the storage is a shortcut, never the request
            log.warning("flame.storage_failed", step=step, error_type=type(exc).__name__)
            return None

    def finished(self, case: str, model: str) -> dict[str, Any] | None:
        """A case an earlier deployment of this analysis finished with this model, or None."""
        tag = case_tag(self._analysis, model, case)
        if tag not in self._stored:
            return None
        stored = self._call("read", self._flame.get_intermediate_data, "local", tag=tag, tag_option="last")
        entry = stored[-1] if isinstance(stored, list) and stored else None
        try:
            valid = (
                isinstance(entry, dict)
                and entry["journal"] == JOURNAL_VERSION
                and entry["status"] == "done"
                and entry["case"] == case
                and entry["model"] == model
                and isinstance(entry["report"], dict)
                and len(entry["data"]) == len(entry["artifacts"])
            )
        except (KeyError, TypeError):
            valid = False
        if not valid:
            return None  # the case is done again, never resumed wrongly
        self._models[case] = model
        return entry

    def finished_sources(self, model: str) -> frozenset[str]:
        """None known: they would take reading every stored case first. A restarted request
        unpacks all its inputs again (disk, not GPU time)."""
        return frozenset()

    def data(self, entry: Mapping[str, Any]) -> list[bytes | None]:
        """Each artifact's bytes, as stored with the case."""
        return list(entry["data"])

    def finish_case(
        self,
        case: str | None,
        model: str,
        artifacts: Iterable[Artifact],
        report: Mapping[str, Any],
        sources: Iterable[str] = (),
    ) -> None:
        """Store a finished case: its artifacts, their bytes and its report."""
        if case is None:
            return
        artifacts = list(artifacts)
        self._models[case] = model
        self._save(case, model, done_entry(case, model, artifacts, report, data=[a.data for a in artifacts]))

    def withdraw(self, case: str | None, files: Iterable[tuple[str, str]]) -> None:
        """A stored case was withdrawn (its series grew): a later entry under its tag says so."""
        if case is not None and case in self._models:
            entry = {"journal": JOURNAL_VERSION, "case": case, "status": "withdrawn"}
            self._save(case, self._models[case], entry)

    def _save(self, case: str, model: str, entry: dict[str, Any]) -> None:
        tag = case_tag(self._analysis, model, case)
        self._call("save", self._flame.save_intermediate_data, entry, location="local", tag=tag)

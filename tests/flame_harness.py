"""FLAME's local test mode, without the SDK.

Mirrors python-sdk-patterns (``flame/star/star_model.py``, ``star_model_tester.py``,
``flame/utils/mock_flame_core.py``) and flamesdk's result upload
(``storage_client.push_result``), in the parts asyncflow's FLAME classes meet:

- every node (analyzers and the aggregator) runs in its own thread of one process;
- a node is built as ``cls(flame=core, **kwargs)`` after StarModel's ``issubclass``
  check against the star base classes;
- ``get_s3_data(query)``: ``[]`` returns every object, ``None`` returns None;
- ``get_data_sources()``: the node's data sources, as the hub adapter lists them
  (``[{"id", "name", "paths"}]``), for an analyzer that fetches its own objects;
- the analyzer's result crosses to the aggregator pickled (the message broker);
- the aggregator result is uploaded as ``bytes(result)`` for ``output_type="bytes"``,
  falling back to pickle with a warning, as ``push_result`` does;
- ``flame_log`` accepts only FLAME's log types; ``set_progress`` warns on values
  outside 0..100 or not above the current one, as the mock does. The harness
  records every call so tests can check what would reach the Hub;
- the node's local storage (``save_intermediate_data(..., location="local", tag=...)``,
  ``get_intermediate_data(location="local", tag=...)``, ``get_local_tags``): with a
  ``storage`` folder, as the node's result service keeps it (each object pickled,
  listed by tag in the order saved, outliving the node's process); without, the
  SDK mock's no-ops.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import queue
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom

from asyncflow.flame.bundle import MANIFEST
from asyncflow.flame.hub import FLAME_LOG_TYPES
from asyncflow.flame.standin import StarAggregator, StarAnalyzer

TIMEOUT_S = 600


@dataclass
class HubRecord:
    """What one node sent towards the Hub."""

    logs: list[tuple[str, str]] = field(default_factory=list)  # (log_type, message)
    progress: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the SDK's complaints about our calls


def stored(tag: Path) -> list[Path]:
    """The objects stored under a tag's folder (not one a killed node left half written)."""
    return [p for p in tag.iterdir() if not p.name.startswith(".")]


class LocalStorage:
    """A FLAME node's local storage, as its result service keeps it: each object pickled, listed
    by tag in the order saved, in ``folder`` (so it outlives the node's process); without a
    folder, the SDK mock's no-ops. ``patch(MockFlameCoreSDK)`` gives the SDK's own mock the same."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def save_intermediate_data(
        self, data: Any, location: str, remote_node_ids: list[str] | None = None, tag: str | None = None
    ) -> dict[str, str] | None:
        if self.folder is None or location != "local" or tag is None:
            return None
        folder = self.folder / tag
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}"
        partial = folder / f".{name}"
        partial.write_bytes(pickle.dumps(data))  # the service stores what the SDK pickled
        os.replace(partial, folder / name)  # a node killed meanwhile leaves no half object
        return {"status": "success"}

    def get_intermediate_data(
        self, location: str, id: str | None = None, tag: str | None = None, tag_option: str = "all", **_: Any
    ) -> list[Any] | None:
        if self.folder is None or tag is None or not (self.folder / tag).is_dir():
            return None
        names = sorted(p.name for p in (self.folder / tag).iterdir() if not p.name.startswith("."))
        names = names[-1:] if tag_option == "last" else names[:1] if tag_option == "first" else names
        return [pickle.loads((self.folder / tag / name).read_bytes()) for name in names]

    def get_local_tags(self, filter: str | None = None) -> list[str] | None:
        """The tags that hold an object (a node killed between making a tag's folder and
        storing its object leaves a tag the service never had)."""
        if self.folder is None or not self.folder.is_dir():
            return None
        return sorted(
            p.name for p in self.folder.iterdir() if (filter is None or filter in p.name) and stored(p)
        )

    def patch(self, core_class: type, setter: Callable[[Any, str, Any], None] = setattr) -> None:
        """Give ``core_class`` (the SDK's ``MockFlameCoreSDK``, whose storage calls do nothing)
        this storage, for every node it makes (``setter``: pytest's ``monkeypatch.setattr``
        to undo it after the test)."""
        for call in ("save_intermediate_data", "get_intermediate_data", "get_local_tags"):
            setter(
                core_class,
                call,
                lambda _core, *args, _call=call, **kwargs: getattr(self, _call)(*args, **kwargs),
            )


class MockFlameCore:
    """The subset of ``FlameCoreSDK`` / ``MockFlameCoreSDK`` used by StarModel and asyncflow."""

    def __init__(
        self,
        node_id: str,
        role: str,
        participants: list[str],
        aggregator_id: str,
        inboxes: dict[str, queue.Queue[tuple[str, bytes]]],
        s3_data: list[dict[str, bytes]] | None = None,
        data_sources: list[dict[str, Any]] | None = None,
        storage: Path | None = None,
    ) -> None:
        self.node_id, self.role, self.aggregator_id = node_id, role, aggregator_id
        self.local = LocalStorage(storage)
        self.participants = [p for p in participants if p != node_id]
        self.inboxes = inboxes
        self.s3_data = s3_data
        self.data_sources = data_sources
        self.hub = HubRecord()
        self.final_result: bytes | None = None
        self.sent: list[Any] = []  # what this node sent to others, as they receive it
        self._progress = 0

    def get_id(self) -> str:
        return self.node_id

    def get_role(self) -> str:
        return self.role

    def get_participant_ids(self) -> list[str]:
        return list(self.participants)

    def get_aggregator_id(self) -> str:
        return self.aggregator_id

    def flame_log(self, msg: str, sep: str = " ", end: str = "\n", log_type: str = "info", **_: Any) -> None:
        if log_type not in FLAME_LOG_TYPES:
            raise ValueError(f"unknown FLAME log type {log_type!r}")
        self.hub.logs.append((log_type, str(msg)))

    def set_progress(self, progress: int | float) -> None:
        progress = int(progress)
        if not 0 <= progress <= 100:
            self.hub.warnings.append(f"invalid progress {progress}")
        elif progress <= self._progress:
            self.hub.warnings.append(f"progress {progress} not above {self._progress}")
        else:
            self._progress = progress
            self.hub.progress.append(progress)

    def get_analysis_id(self) -> str:
        return "analysis_id"  # as the SDK's mock says; a restart keeps the analysis' id

    def save_intermediate_data(self, data: Any, location: str, **kwargs: Any) -> dict[str, str] | None:
        return self.local.save_intermediate_data(data, location, **kwargs)

    def get_intermediate_data(self, location: str, **kwargs: Any) -> list[Any] | None:
        return self.local.get_intermediate_data(location, **kwargs)

    def get_local_tags(self, filter: str | None = None) -> list[str] | None:
        return self.local.get_local_tags(filter)

    def get_data_sources(self) -> list[dict[str, Any]] | None:
        return self.data_sources

    def get_s3_data(self, s3_keys: list[str] | None = None) -> list[dict[str, bytes]] | None:
        if s3_keys is None or self.s3_data is None:
            return None
        if not s3_keys:
            return self.s3_data
        return [{k: v for k, v in d.items() if k in s3_keys} for d in self.s3_data if set(d) & set(s3_keys)]

    def send_intermediate_data(self, receivers: list[str], data: Any) -> None:
        payload = pickle.dumps(data)  # results cross nodes pickled
        self.sent.append(pickle.loads(payload))
        for receiver in receivers:
            self.inboxes[receiver].put((self.node_id, payload))

    def await_intermediate_data(self, senders: list[str]) -> dict[str, Any]:
        received: dict[str, Any] = {}
        while len(received) < len(senders):
            sender, payload = self.inboxes[self.node_id].get(timeout=TIMEOUT_S)
            received[sender] = pickle.loads(payload)
        return received

    def submit_final_result(self, result: Any, output_type: str = "str") -> dict[str, str]:
        try:
            if output_type == "str":
                body = str(result).encode()
            elif output_type == "bytes":
                body = bytes(result)
            else:
                body = pickle.dumps(result)
        except (TypeError, ValueError):
            self.hub.warnings.append(f"failed to translate result to type={output_type}; pickled instead")
            body = pickle.dumps(result)
        self.final_result = body
        self.set_progress(100)
        return {"status": "success"}


def analyzer_kwargs(model_dir: Path, work: Path, **more: Any) -> dict[str, Any]:
    """The analyzer's kwargs for the tests (plain values, as StarModel's analyzer_kwargs carry
    them): the tiny model on the CPU, one worker per stage."""
    return {
        "model_dir": str(model_dir),
        "work_dir": str(work),
        "device": "cpu",
        "use_mirroring": False,
        "torch_threads": 1,
        "unpack_workers": 1,
        "prepare_workers": 1,
        "export_workers": 1,
        **more,
    }


@dataclass
class StarRun:
    final_result: bytes
    hubs: dict[str, HubRecord]  # node id -> what it sent towards the Hub
    analyzers: dict[str, Any]  # node id -> the analyzer object
    sent: dict[str, list[Any]]  # node id -> what it sent to other nodes (an analyzer: its result)


def run_star(
    analyzer: type,
    aggregator: type,
    data_splits: Sequence[list[dict[str, bytes]] | None],
    *,
    query: Sequence[str] | None = (),
    data_sources: Sequence[list[dict[str, Any]]] | None = None,
    output_type: str = "str",
    analyzer_kwargs: dict[str, Any] | None = None,
    aggregator_kwargs: dict[str, Any] | None = None,
    storage: Path | None = None,
) -> StarRun:
    """One simple (single-round) StarModel analysis over ``len(data_splits)`` analyzer nodes
    (``data_sources``: each node's sources, for ``query=None``; ``storage``: a folder holding
    each node's local storage, in a folder of the node's id)."""
    if not issubclass(analyzer, StarAnalyzer) or not issubclass(aggregator, StarAggregator):
        raise TypeError("the analyzer and aggregator must subclass the star base classes")
    query = None if query is None else list(query)
    analyzer_ids = [f"node_{i}" for i in range(len(data_splits))]
    aggregator_id = f"node_{len(data_splits)}"
    everyone = [*analyzer_ids, aggregator_id]
    inboxes: dict[str, queue.Queue[tuple[str, bytes]]] = {n: queue.Queue() for n in everyone}
    cores = {
        n: MockFlameCore(
            n,
            "aggregator" if n == aggregator_id else "default",
            everyone,
            aggregator_id,
            inboxes,
            s3_data=data_splits[i] if n != aggregator_id else None,
            data_sources=data_sources[i] if data_sources is not None and n != aggregator_id else None,
            storage=storage / n if storage is not None else None,
        )
        for i, n in enumerate(everyone)
    }
    analyzers: dict[str, Any] = {}
    errors: list[BaseException] = []

    def analyzer_node(node_id: str) -> None:
        core = cores[node_id]
        node = analyzer(flame=core, **(analyzer_kwargs or {}))
        analyzers[node_id] = node
        data = core.get_s3_data(query)
        result = node.analyze(data=data)
        core.send_intermediate_data([aggregator_id], result)
        node.node_finished()

    def aggregator_node() -> None:
        core = cores[aggregator_id]
        node = aggregator(flame=core, **(aggregator_kwargs or {}))
        results = core.await_intermediate_data(analyzer_ids)
        aggregated, converged = node.aggregate(list(results.values()), True)
        assert converged
        core.submit_final_result(aggregated, output_type)
        node.node_finished()

    def guarded(target: Any, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
            # Unblock the aggregator: a failed analyzer sends nothing.
            inboxes[aggregator_id].put(("failed", pickle.dumps(None)))

    threads = [threading.Thread(target=guarded, args=(analyzer_node, n), name=n) for n in analyzer_ids]
    threads.append(threading.Thread(target=guarded, args=(aggregator_node,), name=aggregator_id))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    if errors:
        raise errors[0]
    final = cores[aggregator_id].final_result
    assert final is not None, "the aggregator submitted no result"
    return StarRun(
        final, {n: c.hub for n, c in cores.items()}, analyzers, {n: c.sent for n, c in cores.items()}
    )


def sdk_logging_setup() -> None:
    """What flamesdk does to logging when its core is built (``flamesdk/resources/utils/logging.py``,
    ``_get_logger``, python-sdk at 52d06db): a JSON handler on stdout, the root logger at DEBUG,
    and its own ``sys.excepthook`` and ``threading.excepthook`` that log tracebacks unscrubbed."""
    import json
    import logging
    import sys

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            log = {"level": record.levelname, "logger": record.name, "msg": record.getMessage()}
            if record.exc_info:
                log["error"] = self.formatException(record.exc_info)
            return json.dumps(log, default=str)

    def log_uncaught(exc_type: Any, exc: Any, tb: Any) -> None:
        logging.getLogger("uncaught").critical("Unhandled exception", exc_info=(exc_type, exc, tb))

    root = logging.getLogger()
    if not any(type(h.formatter).__name__ == "JsonFormatter" for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
    sys.excepthook = log_uncaught
    threading.excepthook = lambda a: log_uncaught(a.exc_type, a.exc_value, a.exc_traceback)


def bundle_outputs(bundle: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the analyst downloads: the bundle's manifest, and each SEG or NIfTI by its name:
    (SOP Instance UID, voxels)."""
    archive = zipfile.ZipFile(io.BytesIO(bundle))
    outputs: dict[str, Any] = {}
    for name in archive.namelist():
        data = archive.read(name)
        if name.endswith(".dcm"):
            seg = pydicom.dcmread(io.BytesIO(data))
            outputs[name] = (seg.SOPInstanceUID, seg.pixel_array.tobytes())
        elif name.endswith(".nii.gz"):
            image = nib.Nifti1Image.from_bytes(gzip.decompress(data))
            outputs[name] = (None, np.asarray(image.dataobj).tobytes())
    return json.loads(archive.read(MANIFEST)), outputs


def star_bundle(
    data_splits: Sequence[list[dict[str, bytes]]],
    analyzer_kwargs: dict[str, Any],
    *,
    sdk: bool = False,
    storage: Path | None = None,
    setter: Callable[[Any, str, Any], None] = setattr,
) -> bytes:
    """The ZIP an analysis gives the analyst: asyncflow's analyzer on each split's node, its ZIP
    aggregator, the objects handed out in memory; run by this harness, or (``sdk``) by the SDK's
    own ``StarModelTester``, its mock core given ``storage`` (``setter`` as for
    :meth:`LocalStorage.patch`). ``storage`` holds each node's folder, named by its id; the SDK's
    tester names nodes at random, so there all nodes share ``node_0``'s."""
    from asyncflow.flame.analysis import ZipAggregator, nnUNetAnalyzer

    if not sdk:
        run = run_star(
            nnUNetAnalyzer,
            ZipAggregator,
            data_splits,
            output_type="bytes",
            analyzer_kwargs=analyzer_kwargs,
            storage=storage,
        )
        return run.final_result
    from flame.star.star_model_tester import StarModelTester
    from flame.utils.mock_flame_core import MockFlameCoreSDK

    LocalStorage(storage / "node_0" if storage is not None else None).patch(MockFlameCoreSDK, setter)
    submitted: list[bytes] = []  # the tester keeps whichever node's result ends first
    submit = MockFlameCoreSDK.submit_final_result

    def record(core: Any, result: Any, *args: Any, **more: Any) -> Any:
        submitted.append(result)
        return submit(core, result, *args, **more)

    setter(MockFlameCoreSDK, "submit_final_result", record)
    StarModelTester(
        data_splits=list(data_splits),
        analyzer=nnUNetAnalyzer,
        aggregator=ZipAggregator,
        data_type="s3",
        query=[],
        output_type="bytes",
        analyzer_kwargs=analyzer_kwargs,
    )
    return submitted[0]

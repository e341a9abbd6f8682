"""Run as a FLAME analysis: the analyzer, three aggregators and the StarModel entry point.

A thin shell over :func:`asyncflow.pipeline.run.run_request`, the code path the CLI
uses. Facts about the SDK (PrivateAIM/python-sdk-patterns, ``flame.star``) that
shape it:

- ``StarModel`` checks ``issubclass`` against ``flame.star.StarAnalyzer`` and
  ``StarAggregator``, so the classes below subclass the real ones when the SDK
  is installed and :mod:`asyncflow.flame.standin` otherwise.
- With ``data_type="s3"`` the analyzer's ``data`` is a list with one
  ``{object_key: bytes}`` dict per data source; ``query=[]`` fetches every
  object, ``query=None`` none. The SDK reads every object whole into memory
  before ``analysis_method`` runs, and logs the first bytes of the data to the Hub,
  so :func:`run_star_model` starts StarModel with ``query=None`` and the analyzer
  lists and fetches the objects itself (:mod:`asyncflow.flame.gateway`), each
  streamed to disk as the pipeline is ready for it. ``inputs="sdk"`` keeps the
  SDK's way.
- The analyzer's result travels to the aggregator pickled; the aggregator's
  result goes through ``bytes(result)`` with ``output_type="bytes"`` (the SDK
  falls back to pickle when that fails).
- In FLAME's local test mode each node is a thread of one process:
  ``analysis_method`` runs the pipeline with :func:`anyio.run` in the calling thread and
  installs a signal handler only in the main thread (one node per process, as
  ``asyncflow flame`` runs it: SIGTERM then stops the request in two steps).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import anyio

from asyncflow.backends.plan import ModelPlan
from asyncflow.errors import LabelError, ModelError, RequestError, SettingsError
from asyncflow.flame.bundle import pack_node_results
from asyncflow.flame.gateway import GatewayStore, gateway_url
from asyncflow.flame.hub import HubReporter
from asyncflow.flame.redact import redact_report
from asyncflow.flame.storage import NodeStorage
from asyncflow.log import take_over_logging
from asyncflow.machine import gpu_problem
from asyncflow.pipeline.model import build_plan, locate_model
from asyncflow.pipeline.run import run_request, run_request_sync
from asyncflow.pipeline.stopping import Stop, can_watch_signals
from asyncflow.reading.request import RemoteObject
from asyncflow.result import Result
from asyncflow.settings import Settings
from asyncflow.stats.aggregate import merge_nodes, node_aggregates, parse_bounds
from asyncflow.stats.privacy import LaplaceNoise
from asyncflow.writing.registry import result_keys

try:
    from flame.star import StarAggregator, StarAnalyzer

    FLAME_SDK = True
except ImportError:  # tests, local CLI: the SDK is not on PyPI
    from asyncflow.flame.standin import StarAggregator, StarAnalyzer

    FLAME_SDK = False

__all__ = [
    "FLAME_SDK",
    "PassThroughAggregator",
    "StatisticsAggregator",
    "ZipAggregator",
    "nnUNetAnalyzer",
    "run_star_model",
]

AggregatorKind = Literal["zip", "passthrough", "statistics"]
ResultKind = Literal["segmentations", "statistics"]
InputsKind = Literal["stream", "sdk"]


class nnUNetAnalyzer(StarAnalyzer):  # the reference's name, which users know
    """Segments the node's S3 objects (TARs of DICOM/NIfTI, single files).

    ``kwargs`` are :class:`~asyncflow.settings.Settings` fields (``model_dir``,
    ``task_name``, ``multi_modal``, ``folds``, ``device`` ...); unset fields
    come from the reference image's environment variables (``RESULTS_FOLDER``
    or ``nnUNet_results``, ``TASK_NAME``, ``MULTI_MODAL``). The model is loaded
    on the first call and kept for later iterations. Four more say what the node
    sends: ``result`` (``segmentations``, the default, or ``statistics``) and, for
    statistics, ``min_cases`` (5), ``epsilon`` (none: no noise) and
    ``statistics_bounds`` (``{"figure" or "label.figure": [low, high, bins]}``). Two say
    where the objects come from when StarModel fetched none (``data`` is None):
    ``keys`` (the object keys to segment; default every object of every data source) and
    ``data_gateway`` (default ``http://nginx-$DEPLOYMENT_NAME/kong``, the SDK's own). And
    ``node_storage`` (default True): each finished case is kept in the node's local storage, and
    a restarted analysis gives it back instead of segmenting it again
    (:mod:`asyncflow.flame.storage`).
    """

    def __init__(self, flame: Any, **kwargs: Any) -> None:
        super().__init__(flame)
        self.hub = HubReporter(flame)
        take_over_logging()  # the SDK has just set up its own: one scrubbed line per event
        try:
            self.result_kind, self.statistics_options = _result_options(kwargs)
            self.keys, self.gateway = _input_options(kwargs)
            # Each finished case kept in the node's storage: a restarted analysis skips it.
            self.storage = NodeStorage.of(flame) if kwargs.pop("node_storage", True) else None
            # What leaves the node leaves the hospital: SEGs are de-identified unless asked otherwise.
            self.settings = Settings.from_env(
                **{
                    **kwargs,
                    "deidentify": kwargs.get("deidentify") or "basic",
                    "opaque_names": True if kwargs.get("opaque_names") is None else kwargs["opaque_names"],
                }
            )
            locate_model(self.settings)
        except SettingsError as exc:
            self.hub.failed(exc)
            raise
        self._plan: ModelPlan | None = None  # built at the first analysis, loaded once
        if self.settings.device == "auto" and (problem := gpu_problem()) is not None:
            self.hub.log(f"GPU not used, the model runs on the CPU: {problem}", "warn")

    def analysis_method(self, data: list[Any] | None, aggregator_results: Any) -> dict[str, Any]:
        """The result contract (``status``, ``dicom_seg_bytes``, ``nifti_seg_bytes``) plus
        ``report`` and ``node``. A node whose data holds no usable case returns status
        ``failed`` with ``error`` so the other nodes' results still reach the analyst;
        a model or settings error fails the analysis. With ``result="statistics"`` the byte
        maps are empty and ``statistics`` holds the node's aggregate (:mod:`asyncflow.stats.aggregate`):
        no image, SEG, label file, report or per-case row leaves the node."""
        take_over_logging()  # another node's SDK core may have set up its logging since
        ended: list[Result] = []
        try:
            self._plan = self._plan or build_plan(self.settings)
            if data is None:  # StarModel fetched nothing: the objects stream to disk as needed
                result = anyio.run(self._fetch_and_run, self._plan, ended.append)
            else:
                self.hub.started(sum(len(d) if isinstance(d, dict) else 1 for d in data))
                result = run_request_sync(
                    data,
                    self.settings,
                    backend=self._plan,
                    on_progress=self.hub,
                    on_finish=ended.append,
                    sink=self.storage,
                )
        except RequestError as exc:  # the report says why each file became no case
            report = (
                redact_report(ended[0].report()) if ended and self.result_kind == "segmentations" else None
            )
            return self._no_usable_case(exc, report)
        except Exception as exc:
            # Our own errors say what to fix; anything else may quote data, so only its type goes out.
            self.hub.failed(exc, detail=isinstance(exc, ModelError | SettingsError | LabelError))
            raise
        self.hub.finished(result)
        if self.result_kind == "statistics":  # numbers only: no image, SEG, label file or case row
            report = result.report()
            aggregate = node_aggregates(report["cases"], **self.statistics_options)
            return {
                "status": str(result.status),
                **_no_files(),
                "statistics": aggregate,
                "node": self.id,
            }
        contract = result.as_dict()
        contract["report"] = redact_report(contract["report"])  # no name from the data leaves the node
        return {**contract, "node": self.id}

    async def _fetch_and_run(self, plan: ModelPlan, on_finish: Callable[[Result], None]) -> Result:
        """List the node's objects through its data gateway and run the request over them."""
        sources = [str(source["name"]) for source in self.flame.get_data_sources() or []]
        if not sources:
            raise RequestError("this node lists no data source for the analysis (get_data_sources)")
        gateway = self.gateway or gateway_url()
        if gateway is None:
            raise RequestError(
                "no data gateway: DEPLOYMENT_NAME is not set; pass data_gateway in analyzer_kwargs, "
                "or inputs='sdk' to run_star_model"
            )
        settings = self.settings
        store = GatewayStore(
            gateway,
            os.environ.get("DATA_SOURCE_TOKEN"),
            tries=settings.fetch_tries,
            backoff_s=settings.fetch_backoff_s,
        )
        async with store:
            objects = await store.list_objects(sources, self.keys)
            # A key the analyst named that no source lists is asked for all the same: the
            # store's 404 makes it a lost input ("object not found") in the report.
            listed = {o.key for o in objects}
            objects += [
                RemoteObject(key, 0, sources[0], store)
                for key in sorted(self.keys or ())
                if key not in listed
            ]
            if not objects:
                raise RequestError(f"the node's {len(sources)} data source(s) hold no object")
            self.hub.started(len(objects), sum(o.size for o in objects))
            stop = Stop(settings.grace_s) if can_watch_signals() else None  # as run_request_sync's
            return await run_request(
                objects,
                settings,
                backend=plan,
                on_progress=self.hub,
                on_finish=on_finish,
                stop=stop,
                sink=self.storage,
            )

    def _no_usable_case(self, error: RequestError, report: dict[str, Any] | None = None) -> dict[str, Any]:
        self.hub.no_usable_case(error)
        return {
            "status": "failed",
            "error": str(error),
            **_no_files(),
            "report": report,
            "node": self.id,
        }


def _no_files() -> dict[str, dict[str, bytes]]:
    """Every map of output files of the result contract, empty."""
    return {key: {} for key in result_keys()}


class _OneRound(StarAggregator):
    """An aggregator of one round (segmentation needs no iterations) that reports to the Hub."""

    def __init__(self, flame: Any) -> None:
        super().__init__(flame)
        self.hub = HubReporter(flame)

    def has_converged(self, result: Any, last_result: Any, num_iterations: int = 0) -> bool:
        return True


class ZipAggregator(_OneRound):
    """Packs every node's result into one ZIP (bytes) with a manifest: see :mod:`asyncflow.flame.bundle`."""

    def aggregation_method(self, analysis_results: list[Any]) -> bytes:
        bundle = pack_node_results(analysis_results)
        self.hub.log(f"bundled the results of {len(analysis_results)} node(s): {len(bundle)} bytes")
        return bundle


class PassThroughAggregator(_OneRound):
    """The reference's aggregator: the list of node results, unchanged (the analyst gets a pickle)."""

    def aggregation_method(self, analysis_results: list[Any]) -> list[Any]:
        return analysis_results


class StatisticsAggregator(_OneRound):
    """Merges the nodes' statistics (``analyzer_kwargs={"result": "statistics"}``) into per-label
    figures per node and overall, as JSON text: see :mod:`asyncflow.stats.aggregate`. A node that sent
    no statistics (no usable case, another result kind) is listed with its status and error."""

    def aggregation_method(self, analysis_results: list[Any]) -> str:
        nodes, without = {}, []
        for number, result in enumerate(analysis_results):
            node = (
                str((result or {}).get("node", f"node-{number}"))
                if isinstance(result, dict)
                else f"node-{number}"
            )
            if isinstance(result, dict) and isinstance(result.get("statistics"), dict):
                nodes[node] = result["statistics"]
            else:
                status = result.get("status") if isinstance(result, dict) else None
                error = result.get("error") if isinstance(result, dict) else None
                without.append({"node": node, "status": status or "no result", "error": error})
        merged = {**merge_nodes(nodes), "nodes_without_statistics": without}
        self.hub.log(f"merged the statistics of {len(nodes)} node(s); {len(without)} sent none")
        return json.dumps(merged, indent=2)


AGGREGATORS: dict[str, tuple[type[StarAggregator], str]] = {
    "zip": (ZipAggregator, "bytes"),
    "passthrough": (PassThroughAggregator, "pickle"),
    "statistics": (StatisticsAggregator, "str"),
}


def _result_options(kwargs: dict[str, Any]) -> tuple[ResultKind, dict[str, Any]]:
    """Take the analyzer's own options out of ``kwargs`` (the rest are Settings fields): what the
    node sends (``result``), and for statistics ``min_cases``, ``epsilon``, ``statistics_bounds``."""
    kind = kwargs.pop("result", None) or "segmentations"
    if kind not in ("segmentations", "statistics"):
        raise SettingsError(f"result must be 'segmentations' or 'statistics', not {kind!r}")
    options = {
        "min_cases": int(kwargs.pop("min_cases", 5)),
        "epsilon": kwargs.pop("epsilon", None),
        "bounds": parse_bounds(kwargs.pop("statistics_bounds", None)),
    }
    if kind == "segmentations" and options["epsilon"] is not None:
        raise SettingsError("epsilon applies to result='statistics' only: segmentations cannot carry noise")
    if options["epsilon"] is not None:
        options["epsilon"] = float(options["epsilon"])
        LaplaceNoise(options["epsilon"], 1)  # OpenDP present and epsilon valid: fail now, not after the run
    if options["min_cases"] < 1:
        raise SettingsError(f"min_cases must be at least 1, not {options['min_cases']}")
    return cast(ResultKind, kind), options


def _input_options(kwargs: dict[str, Any]) -> tuple[frozenset[str] | None, str | None]:
    """Take ``keys`` and ``data_gateway`` out of ``kwargs``: which objects, and from where (and
    refuse ``send``: a node's network lets nothing out but the platform's own traffic; and
    ``cluster``: a node is one container)."""
    if kwargs.get("send") is not None:
        raise SettingsError(
            "send is not available in FLAME: a node's network lets no traffic out but the platform's "
            "own, and what leaves a node goes to the aggregator; send from a local asyncflow run instead"
        )
    if kwargs.get("cluster") is not None:
        raise SettingsError(
            "cluster is not available in FLAME: a node is one container; use it in local runs"
        )
    keys, gateway = kwargs.pop("keys", None), kwargs.pop("data_gateway", None)
    if keys is not None and (isinstance(keys, str) or not all(isinstance(k, str) for k in keys)):
        raise SettingsError("keys must be a list of object keys")
    if gateway is not None and not str(gateway).startswith(("http://", "https://")):
        raise SettingsError(f"data_gateway must be an http(s) URL, not {gateway!r}")
    return (frozenset(keys) if keys else None), (str(gateway) if gateway else None)


def run_star_model(
    *,
    query: Sequence[str] = (),
    aggregator: AggregatorKind | None = None,
    analyzer_kwargs: dict[str, Any] | None = None,
    result: ResultKind = "segmentations",
    epsilon: float | None = None,
    inputs: InputsKind = "stream",
) -> Any:
    """Start the analysis on this node, as the reference's ``start_nnunet.py`` did.

    ``query`` lists S3 object keys to segment; empty (the default) means every
    object. With ``inputs="stream"`` (the default) StarModel fetches nothing and the
    analyzer streams each object to disk as the pipeline needs it
    (:mod:`asyncflow.flame.gateway`); ``inputs="sdk"`` lets the SDK read them all into
    memory first. ``result="statistics"`` sends per-label aggregates
    instead of segmentations (aggregator ``statistics``), with Laplace noise
    added on each node when ``epsilon`` is given. Needs the FLAME SDK.
    """
    aggregator = aggregator or ("statistics" if result == "statistics" else "zip")
    if (result == "statistics") != (aggregator == "statistics"):
        raise SettingsError(
            f"result={result!r} needs aggregator='statistics' and only it, not {aggregator!r}"
        )
    analyzer_kwargs = dict(analyzer_kwargs or {})
    if result == "statistics":
        analyzer_kwargs["result"] = "statistics"
    if epsilon is not None:
        analyzer_kwargs["epsilon"] = epsilon
    if inputs not in ("stream", "sdk"):
        raise SettingsError(f"inputs must be 'stream' or 'sdk', not {inputs!r}")
    if inputs == "stream" and query:
        analyzer_kwargs["keys"] = list(query)
    _result_options(dict(analyzer_kwargs))  # a bad option fails here, before the SDK starts
    _input_options(dict(analyzer_kwargs))
    if not FLAME_SDK:
        raise SettingsError(
            "the FLAME SDK is not installed: pip install "
            "'git+https://github.com/PrivateAIM/python-sdk-patterns.git@0.6.4'"
        )
    from flame.star import StarModel

    aggregator_class, output_type = AGGREGATORS[aggregator]
    return StarModel(
        analyzer=nnUNetAnalyzer,
        aggregator=aggregator_class,
        data_type="s3",
        query=list(query) if inputs == "sdk" else None,  # None: the SDK fetches (and logs) nothing
        simple_analysis=True,
        output_type=output_type,
        analyzer_kwargs=analyzer_kwargs or None,
    )

"""Follow asyncflow's JSON logs: live progress, then per-stage percentiles, GPU use and failures.

Reads the events of ``ops/events.schema.json`` from any number of interleaved
requests (a file, or ``kubectl logs -f pod | asyncflow monitor -``); other lines
are counted and ignored. All times come from the events' timestamps, so a saved
log replays with its true rates.

- Stage durations: ``unpack`` from ``archive.extracted`` / ``file.received``;
  ``prepare``, ``predict``, ``export`` from ``case.finished`` (every case, done or
  failed), which equal the report's ``stage_s``.
- GPU busy share: the union of prediction intervals (``case.predicted`` and
  failed predictions) over the span from the first prediction's start to the
  last one's end, per request; the total weighs requests by their span.
- Failures: ``case.failed`` grouped by stage, error type and reason; requests that
  ended in error (``request.finished``) by error type and reason.
- The prediction workers' devices (``model.loaded``): "GPU busy" where one is a
  GPU, "predict busy" on CPU-only runs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

__all__ = ["STAGES", "Monitor", "render_live", "render_summary"]

STAGES = ("unpack", "prepare", "predict", "export")
# A case's state after its latest event, and the stage it is in or waits for. A cascade's case
# is "staging" between its two networks: CPU work that makes its next model input.
_WAITING_FOR = {"assembled": "prepare", "staging": "prepare", "prepared": "predict", "predicted": "export"}


def _seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _busy(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds covered by the union of intervals, span from first start to last end)."""
    covered, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            covered += stop - max(start, end)
            end = stop
    return covered, (max(s for _, s in intervals) - min(s for s, _ in intervals)) if intervals else 0.0


@dataclass
class _Request:
    started_s: float | None = None
    status: str | None = None  # from request.finished
    total: int | None = None  # from request.assembled
    cases: dict[str, str] = field(default_factory=dict)  # case_id -> assembled/prepared/predicted/done/failed
    predictions: list[tuple[float, float]] = field(default_factory=list)
    withdrawn: set[str] = field(default_factory=set)
    last_s: float = 0.0


class Monitor:
    """Feed it log lines; ask for a live snapshot or the summary at any time."""

    def __init__(self) -> None:
        self.requests: dict[str, _Request] = {}
        self.durations: dict[str, list[float]] = {stage: [] for stage in STAGES}
        self.failures: Counter[tuple[str, str, str]] = Counter()
        self.request_errors: Counter[tuple[str, str]] = Counter()
        self.devices: set[str] = set()
        self.events = 0
        self.ignored = 0
        self.first_s: float | None = None
        self.last_s: float | None = None

    def feed_all(self, lines: Iterable[str]) -> Monitor:
        for line in lines:
            self.feed(line)
        return self

    def feed(self, line: str) -> None:
        try:
            event = json.loads(line)
            name, at = event["event"], _seconds(event["timestamp"])
        except (ValueError, TypeError, KeyError):
            self.ignored += int(bool(line.strip()))
            return
        self.events += 1
        self.first_s = at if self.first_s is None else min(self.first_s, at)
        self.last_s = at if self.last_s is None else max(self.last_s, at)
        request_id = event.get("request_id")
        if request_id is None:
            return
        request = self.requests.setdefault(request_id, _Request())
        request.last_s = max(request.last_s, at)
        self._apply(request, name, event, at)

    def _apply(self, request: _Request, name: str, event: dict[str, Any], at: float) -> None:
        case_id = event.get("case_id")
        if name == "request.started":
            request.started_s = at
        elif name == "request.assembled":
            request.total = event["cases"]
        elif name == "request.finished":
            request.status = event["status"]
            if event["status"] == "error":
                cause = (event.get("error_type", "unknown"), event.get("reason", "no reason logged"))
                self.request_errors[cause] += 1
        elif name == "model.loaded":
            self.devices.add(str(event.get("device", "unknown")))
        elif name in ("archive.extracted", "file.received"):
            self.durations["unpack"].append(event["duration_s"])
        elif case_id is None:
            return
        elif name == "case.withdrawn":  # replaced by a case of the grown series: not counted
            request.cases.pop(case_id, None)
            request.withdrawn.add(case_id)
        elif case_id in request.withdrawn:
            if name == "case.predicted":  # the GPU did the work all the same
                request.predictions.append((at - event["duration_s"], at))
        elif name in ("case.assembled", "case.prepared", "case.predicted", "case.staged"):
            state = "prepared" if name == "case.staged" else name.split(".")[1]
            request.cases[case_id] = "staging" if event.get("stage") == 1 else state
            if name == "case.predicted":
                request.predictions.append((at - event["duration_s"], at))
        elif name == "case.failed":
            self.failures[(event["stage"], event["error_type"], event["reason"])] += 1
            if event["stage"] == "predict":
                request.cases[case_id] = "predict-failed"
        elif name == "case.finished":
            if request.cases.get(case_id) == "predict-failed" and "predict_s" in event:
                request.predictions.append((at - event["predict_s"], at))
            request.cases[case_id] = event["status"]
            for stage in STAGES[1:]:
                if f"{stage}_s" in event:
                    self.durations[stage].append(event[f"{stage}_s"])

    # -- views ---------------------------------------------------------------------

    def _case_counts(self) -> Counter[str]:
        return Counter(state for r in self.requests.values() for state in r.cases.values())

    def gpu_busy_share(self) -> float | None:
        covered = span = 0.0
        for request in self.requests.values():
            c, s = _busy(request.predictions)
            covered, span = covered + c, span + s
        return covered / span if span > 0 else None

    def busy_label(self) -> str:
        """What the busy share is of: a GPU, or (every known worker on the CPU) the predict worker."""
        if self.devices and all(d == "cpu" for d in self.devices):
            return "predict busy"
        return "GPU busy"

    def snapshot(self) -> dict[str, Any]:
        """Where things stand now: for the live line."""
        counts = self._case_counts()
        ended = counts["done"] + counts["failed"] + counts["resumed"]
        known = sum(r.total if r.total is not None else len(r.cases) for r in self.requests.values())
        elapsed_min = ((self.last_s or 0) - (self.first_s or 0)) / 60
        rate = ended / elapsed_min if elapsed_min > 0 else None
        all_assembled = all(r.total is not None for r in self.requests.values())
        eta_s = (known - ended) / rate * 60 if rate and all_assembled else None
        return {
            "requests_running": sum(r.status is None for r in self.requests.values()),
            "cases_known": known,
            "cases_done": counts["done"] + counts["resumed"],
            "cases_failed": counts["failed"],
            "in_stage": {
                stage: sum(counts[s] for s, waits in _WAITING_FOR.items() if waits == stage)
                for stage in dict.fromkeys(_WAITING_FOR.values())
            },
            "cases_per_min": rate,
            "eta_s": eta_s,
            "gpu_busy_share": self.gpu_busy_share(),
            "busy_label": self.busy_label(),
        }

    def summary(self) -> dict[str, Any]:
        counts = self._case_counts()
        stages = {}
        for stage, values in self.durations.items():
            if values:
                p50, p95 = np.percentile(values, [50, 95])
                stages[stage] = {
                    "n": len(values),
                    "p50_s": round(float(p50), 4),
                    "p95_s": round(float(p95), 4),
                    "max_s": round(max(values), 4),
                }
        snapshot = self.snapshot()
        return {
            "requests": {
                "total": len(self.requests),
                "by_status": dict(Counter(r.status or "running" for r in self.requests.values())),
            },
            "cases": {
                "total": sum(counts.values()),
                "done": counts["done"],
                "failed": counts["failed"],
                "resumed": counts["resumed"],
            },
            "cases_per_min": snapshot["cases_per_min"],
            "gpu_busy_share": snapshot["gpu_busy_share"],
            "busy_label": snapshot["busy_label"],
            "stages": stages,
            "failures": [
                {"stage": stage, "error_type": kind, "reason": reason, "cases": n}
                for (stage, kind, reason), n in self.failures.most_common()
            ],
            "request_errors": [
                {"error_type": kind, "reason": reason, "requests": n}
                for (kind, reason), n in self.request_errors.most_common()
            ],
            "lines": {"events": self.events, "ignored": self.ignored},
        }


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def render_live(snapshot: dict[str, Any]) -> str:
    stages = " ".join(f"{stage} {n}" for stage, n in snapshot["in_stage"].items())
    rate = snapshot["cases_per_min"]
    eta = snapshot["eta_s"]
    return (
        f"running {snapshot['requests_running']} | cases {snapshot['cases_done'] + snapshot['cases_failed']}"
        f"/{snapshot['cases_known']} (failed {snapshot['cases_failed']}) | waiting/in {stages} | "
        f"{'-' if rate is None else f'{rate:.1f}'} cases/min | ETA {'-' if eta is None else f'{eta:.0f} s'} | "
        f"{snapshot['busy_label']} {_share(snapshot['gpu_busy_share'])}"
    )


def render_summary(summary: dict[str, Any]) -> str:
    requests, cases = summary["requests"], summary["cases"]
    by_status = ", ".join(f"{k} {v}" for k, v in sorted(requests["by_status"].items()))
    rate = summary["cases_per_min"]
    lines = [
        f"requests: {requests['total']} ({by_status or 'none'})",
        f"cases: {cases['total']} (done {cases['done']}, failed {cases['failed']}, resumed {cases['resumed']}); "
        f"{'-' if rate is None else f'{rate:.1f}'} cases/min; "
        f"{summary['busy_label']} {_share(summary['gpu_busy_share'])} between first and last prediction",
        "",
        f"{'stage':<8} {'n':>5} {'p50 s':>9} {'p95 s':>9} {'max s':>9}",
    ]
    for stage, row in summary["stages"].items():
        lines.append(
            f"{stage:<8} {row['n']:>5} {row['p50_s']:>9.3f} {row['p95_s']:>9.3f} {row['max_s']:>9.3f}"
        )
    lines.append("")
    if summary["failures"]:
        lines.append("failures by reason:")
        for failure in summary["failures"]:
            lines.append(
                f"{failure['cases']:>5}  {failure['stage']}: {failure['error_type']}: {failure['reason']}"
            )
    else:
        lines.append("no failures")
    for error in summary["request_errors"]:
        lines.append(
            f"{error['requests']:>5}  request ended in error: {error['error_type']}: {error['reason']}"
        )
    if summary["lines"]["ignored"]:
        lines.append(f"({summary['lines']['ignored']} line(s) that are not asyncflow events ignored)")
    return "\n".join(lines)

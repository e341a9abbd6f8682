"""Statistics across cases: what one node (or one run) sends, and how several merge.

A node turns its cases' label statistics (:mod:`asyncflow.stats.measure`) into
per-label *cells*, one per figure (``volume_ml``, ``intensity_mean``,
``components``), each holding only sums: the number of cases, the sum and the
sum of squares of the values clipped to the figure's bounds, the clipped
minimum and maximum, and a histogram on fixed bins. No case's row, name or
image is in it. A node with fewer than ``min_cases`` done cases sends only
that count; so does a cell with fewer values (an ``intensity_mean`` exists
only for the cases where the label is not empty).

:func:`merge_nodes` adds the cells of every node and derives count, mean,
sample sd, min, max and the 5/25/50/75/95th percentiles (linear within the
merged histogram's bins), per node and overall. The FLAME
``StatisticsAggregator`` and ``asyncflow stats`` both call it: one code path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncflow.errors import SettingsError
from asyncflow.stats.privacy import LaplaceNoise

__all__ = ["DEFAULT_BOUNDS", "FORMAT", "Bounds", "merge_nodes", "node_aggregates", "parse_bounds"]

FORMAT = "asyncflow.statistics/1"
QUANTILES = (5, 25, 50, 75, 95)


@dataclass(frozen=True)
class Bounds:
    """Where a figure's values are clipped, and the histogram's equal bins between."""

    low: float
    high: float
    bins: int

    def as_list(self) -> list[float]:
        return [self.low, self.high, self.bins]


# Defaults for abdominal CT: organ volumes up to 4 l in 50 ml bins, mean HU of soft tissue
# in 5 HU bins, lesion counts up to 50. Set others per figure or per label and figure.
DEFAULT_BOUNDS: dict[str, Bounds] = {
    "volume_ml": Bounds(0.0, 4000.0, 80),
    "intensity_mean": Bounds(-200.0, 300.0, 100),
    "components": Bounds(0.0, 50.0, 50),
}


def parse_bounds(overrides: Mapping[str, Any] | None) -> dict[str, Bounds]:
    """``DEFAULT_BOUNDS`` with ``{"figure" or "label.figure": [low, high, bins]}`` applied."""
    bounds = dict(DEFAULT_BOUNDS)
    for key, value in (overrides or {}).items():
        figure = str(key).rsplit(".", 1)[-1]
        if figure not in DEFAULT_BOUNDS:
            raise SettingsError(
                f"statistics bounds: unknown figure {figure!r}; known: {', '.join(DEFAULT_BOUNDS)}"
            )
        try:
            low, high, bins = value
            parsed = Bounds(float(low), float(high), int(bins))
        except (TypeError, ValueError):
            raise SettingsError(f"statistics bounds {key}: expected [low, high, bins]") from None
        if not (parsed.low < parsed.high and parsed.bins >= 1):
            raise SettingsError(f"statistics bounds {key}: needs low < high and at least one bin")
        bounds[str(key)] = parsed
    return bounds


def _bounds_for(bounds: Mapping[str, Bounds], label: str, figure: str) -> Bounds:
    return bounds.get(f"{label}.{figure}") or bounds[figure]


def _cell(values: list[float], bounds: Bounds) -> dict[str, Any]:
    clipped = np.clip(np.asarray(values, dtype=np.float64), bounds.low, bounds.high)
    histogram, _ = np.histogram(clipped, bins=bounds.bins, range=(bounds.low, bounds.high))
    return {
        "count": len(values),
        "sum": float(clipped.sum()),
        "sum_sq": float(np.square(clipped).sum()),
        "min": float(clipped.min()) if len(values) else None,
        "max": float(clipped.max()) if len(values) else None,
        "histogram": [int(n) for n in histogram],
        "bounds": bounds.as_list(),
    }


def _noisy(cell: dict[str, Any], noise: LaplaceNoise) -> dict[str, Any]:
    """The cell with Laplace noise on count, sums and histogram; min and max withheld
    (sensitivities in :mod:`asyncflow.stats.privacy`)."""
    low, high, _ = cell["bounds"]
    largest = max(abs(low), abs(high))
    return {
        "count": noise.number(cell["count"], 1),
        "sum": noise.number(cell["sum"], largest),
        "sum_sq": noise.number(cell["sum_sq"], largest**2),
        "histogram": noise.vector(cell["histogram"], 1),
        "bounds": cell["bounds"],
    }


def node_aggregates(
    cases: Iterable[Mapping[str, Any]],
    *,
    min_cases: int = 5,
    bounds: Mapping[str, Bounds] | None = None,
    epsilon: float | None = None,
) -> dict[str, Any]:
    """A node's cells from report case entries (``Result.report()["cases"]``): the done cases
    with statistics count (a case of several models: each model's labels, as ``<model>.<label>``);
    no value of a single case is in the result. With ``epsilon``, every
    released number carries Laplace noise (:mod:`asyncflow.stats.privacy`), and the minimum cell size
    is applied to the noisy counts."""
    if min_cases < 1:
        raise SettingsError(f"min_cases must be at least 1, not {min_cases}")
    bounds = {**DEFAULT_BOUNDS, **(bounds or {})}
    # A resumed case keeps the statistics its first run measured: it counts as done.
    measured = [
        c for c in cases if c.get("status") in ("done", "resumed") and c.get("statistics") is not None
    ]
    values: dict[str, dict[str, list[float]]] = {}
    names: dict[str, str] = {}  # label -> the label's own name (bounds may name either)
    for case in measured:
        for section in case.get("models") or [case]:  # several models: each one's labels
            model = section.get("model")
            for row in section.get("statistics") or []:
                label = f"{model}.{row['name']}" if model else str(row["name"])
                names[label] = str(row["name"])
                figures = values.setdefault(label, {figure: [] for figure in DEFAULT_BOUNDS})
                for figure, found in figures.items():
                    if row.get(figure) is not None:
                        found.append(float(row[figure]))
    cells = {
        label: {
            figure: _cell(found, bounds.get(f"{label}.{figure}") or _bounds_for(bounds, names[label], figure))
            for figure, found in figures.items()
        }
        for label, figures in sorted(values.items())
    }
    aggregate: dict[str, Any] = {"format": FORMAT, "cases": len(measured), "min_cases": min_cases}
    if epsilon is not None:
        noise = LaplaceNoise(epsilon, releases=1 + 4 * sum(len(figures) for figures in cells.values()))
        aggregate["cases"] = noise.number(len(measured), 1)
        cells = {
            label: {f: _noisy(cell, noise) for f, cell in figures.items()} for label, figures in cells.items()
        }
        aggregate.update(
            epsilon=noise.epsilon, epsilon_per_release=noise.epsilon_each, releases=noise.releases
        )
    if aggregate["cases"] < min_cases:
        return {**aggregate, "suppressed": True, "labels": {}}
    aggregate["labels"] = {
        label: {
            figure: cell if cell["count"] >= min_cases else {"count": cell["count"], "suppressed": True}
            for figure, cell in figures.items()
        }
        for label, figures in cells.items()
    }
    return aggregate


def _quantiles(histogram: np.ndarray, bounds: Bounds) -> dict[str, float | None]:
    total = float(histogram.sum())
    if total <= 0:
        return {f"p{q}": None for q in QUANTILES}
    edges = np.linspace(bounds.low, bounds.high, bounds.bins + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(histogram)]) / total
    # linear within each bin: the inverse of the piecewise-linear cumulative distribution
    return {f"p{q}": float(np.interp(q / 100, cumulative, edges)) for q in QUANTILES}


def _summary(cells: list[Mapping[str, Any]]) -> dict[str, Any]:
    """count, mean, sd, min, max and percentiles of the cells added together. Min and max exist
    where every node sent them (none does under differential privacy); percentiles, from the
    histogram, are kept within them."""
    full = [c for c in cells if not c.get("suppressed")]
    suppressed = sum(max(c["count"], 0) for c in cells if c.get("suppressed"))  # noisy: >= 0
    summary: dict[str, Any] = {"count": 0, "suppressed_count": suppressed}
    if not full:
        return summary
    shapes = {tuple(c["bounds"]) for c in full}
    if len(shapes) > 1:
        return {**summary, "error": f"the nodes binned this figure differently: {sorted(shapes)}"}
    low, high, bins = next(iter(shapes))
    count = sum(c["count"] for c in full)
    total, squares = sum(float(c["sum"]) for c in full), sum(float(c["sum_sq"]) for c in full)
    histogram = np.sum([np.asarray(c["histogram"], dtype=np.float64) for c in full], axis=0)
    mean = total / count if count > 0 else None
    variance = (squares - count * mean**2) / (count - 1) if mean is not None and count > 1 else None
    known = all(c.get("min") is not None for c in full)
    smallest = min(c["min"] for c in full) if known else None
    largest = max(c["max"] for c in full) if known else None
    quantiles = _quantiles(np.clip(histogram, 0, None), Bounds(float(low), float(high), int(bins)))
    if smallest is not None and largest is not None:
        quantiles = {q: None if v is None else min(max(v, smallest), largest) for q, v in quantiles.items()}
    summary.update(
        count=count,
        mean=mean,
        sd=math.sqrt(max(variance, 0.0)) if variance is not None else None,
        min=smallest,
        max=largest,
        **quantiles,
        bounds=[low, high, bins],
    )
    return summary


def merge_nodes(nodes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per node and overall: each label's figures summarised from the nodes' cells."""
    for node, aggregate in nodes.items():
        if aggregate.get("format") != FORMAT:
            raise ValueError(
                f"node {node}: not an asyncflow statistics aggregate ({aggregate.get('format')!r})"
            )
    labels = sorted({label for aggregate in nodes.values() for label in aggregate.get("labels", {})})
    figures = list(DEFAULT_BOUNDS)

    def summarise(members: list[Mapping[str, Any]]) -> dict[str, Any]:
        return {
            label: {
                figure: _summary(
                    [m["labels"][label][figure] for m in members if label in m.get("labels", {})]
                )
                for figure in figures
            }
            for label in labels
        }

    return {
        "format": FORMAT,
        "nodes": {
            node: {
                "cases": aggregate["cases"],
                "suppressed": bool(aggregate.get("suppressed")),
                **({"epsilon": aggregate["epsilon"]} if "epsilon" in aggregate else {}),
                "labels": {} if aggregate.get("suppressed") else summarise([aggregate]),
            }
            for node, aggregate in sorted(nodes.items())
        },
        "overall": {
            "nodes": len(nodes),
            "cases": sum(a["cases"] for a in nodes.values() if not a.get("suppressed")),
            "suppressed_cases": sum(max(a["cases"], 0) for a in nodes.values() if a.get("suppressed")),
            "labels": summarise(list(nodes.values())),
        },
    }

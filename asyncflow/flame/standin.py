"""Stand-ins for ``flame.star.StarAnalyzer`` / ``StarAggregator`` when the FLAME SDK is absent.

The SDK (``flame`` from PrivateAIM/python-sdk-patterns) is not on PyPI. Without
it, :mod:`asyncflow.flame.analysis` subclasses these instead, so it imports and its
tests run anywhere. They mirror the SDK's ``flame/star/node_base_client.py``,
``analyzer_client.py`` and ``aggregator_client.py``: the same
constructor, attributes and ``analyze`` / ``aggregate`` driving methods, and
nothing else. With the SDK installed they are not used: ``StarModel`` checks
``issubclass`` against its own classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

__all__ = ["StarAggregator", "StarAnalyzer"]


class _Node:
    """``flame.star.node_base_client.Node``: identity, role and iteration state of one node."""

    def __init__(self, flame: Any) -> None:
        self.flame = flame
        self.id = flame.get_id()
        self.role = flame.get_role()
        self.finished = False
        self.latest_result: Any = None
        self.partner_node_ids = flame.get_participant_ids()
        self.num_iterations = 0

    def node_finished(self) -> None:
        self.finished = True

    def set_num_iterations(self, num_iterations: int) -> None:
        self.num_iterations = num_iterations

    def set_latest_result(self, latest_result: Any) -> None:
        self.latest_result = latest_result


class StarAnalyzer(_Node, ABC):
    """``flame.star.StarAnalyzer``: a node with data; ``analyze`` calls ``analysis_method``."""

    def __init__(self, flame: Any) -> None:
        super().__init__(flame)
        if self.role != "default":
            raise ValueError(f"analyzer node needs role 'default', this node has {self.role!r}")

    def analyze(self, data: list[Any]) -> Any:
        try:
            result = self.analysis_method(data, self.latest_result)
        except Exception:
            # As the SDK: a short line to the Hub, the details stay on the node.
            self.flame.flame_log(
                "An Error occured during execution of the given 'analysis_method' function "
                "(details available at the executing node)",
                log_type="error",
            )
            raise
        self.latest_result = result
        self.num_iterations += 1
        return result

    @abstractmethod
    def analysis_method(self, data: list[Any], aggregator_results: Any) -> Any: ...


class StarAggregator(_Node, ABC):
    """``flame.star.StarAggregator``: the node that combines the analyzers' results."""

    def __init__(self, flame: Any) -> None:
        super().__init__(flame)
        if self.role != "aggregator":
            raise ValueError(f"aggregator node needs role 'aggregator', this node has {self.role!r}")

    def aggregate(self, node_results: list[Any], simple_analysis: bool = True) -> tuple[Any, bool]:
        result = self.aggregation_method(node_results)
        if simple_analysis:
            converged = True
        elif not self.latest_result:
            converged = False
        else:
            converged = self.has_converged(result, self.latest_result, self.num_iterations)
        self.latest_result = result
        self.num_iterations += 1
        return result, converged

    @abstractmethod
    def aggregation_method(self, analysis_results: list[Any]) -> Any: ...

    @abstractmethod
    def has_converged(self, result: Any, last_result: Any, num_iterations: int = 0) -> bool: ...

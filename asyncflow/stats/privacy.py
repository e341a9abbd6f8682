"""Differential privacy for a node's statistics: Laplace noise from OpenDP, added on the node.

The unit of privacy is one case: two requests that differ by one case must give
nearly the same released numbers. A case adds at most one value to each cell,
clipped to the cell's bounds ``[low, high]``, so each released number moves by
at most its *sensitivity* when one case is added or removed:

=================  ===========================
released number    sensitivity
=================  ===========================
node case count    1
cell count         1
cell sum           max(|low|, |high|)
cell sum_sq        max(low², high²)
cell histogram     1 (L1: one bin moves by one)
=================  ===========================

The node's ``epsilon`` is split evenly over all of them (sequential composition):
with L labels and F figures that is ``1 + 4·L·F`` releases, each with
``epsilon / (1 + 4·L·F)`` and Laplace scale ``sensitivity / that``. Min and max
are one case's value each and are not released under differential privacy;
the minimum cell size is applied to the noisy counts.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from asyncflow.errors import SettingsError

__all__ = ["LaplaceNoise"]


@functools.cache
def _laplace(vector: bool, scale: float) -> Any:
    """OpenDP's Laplace mechanism of ``scale`` on a float or a vector of floats."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    try:  # OpenDP >= 0.13 asks whether NaN is allowed; 0.12 (FLAME's SDK pins it) does not
        atom = dp.atom_domain(T=float, nan=False)  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        atom = dp.atom_domain(T=float)
    if vector:
        return dp.m.make_laplace(dp.vector_domain(atom), dp.l1_distance(T=float), scale=scale)
    return dp.m.make_laplace(atom, dp.absolute_distance(T=float), scale=scale)


class LaplaceNoise:
    """OpenDP's Laplace mechanism at ``epsilon / releases`` per released number."""

    def __init__(self, epsilon: float, releases: int) -> None:
        if not epsilon > 0:
            raise SettingsError(f"epsilon must be positive, not {epsilon}")
        try:
            import opendp.prelude  # noqa: F401
        except ImportError:
            raise SettingsError(
                "epsilon needs OpenDP: pip install 'asyncflow[dp]' (FLAME's SDK installs it)"
            ) from None
        self.epsilon = float(epsilon)
        self.releases = releases
        self.epsilon_each = self.epsilon / releases

    def scale(self, sensitivity: float) -> float:
        return sensitivity / self.epsilon_each

    def _measurement(self, vector: bool, sensitivity: float) -> Any:
        measurement = _laplace(vector, self.scale(sensitivity))
        spent = measurement.map(d_in=float(sensitivity))  # OpenDP's own account of the privacy spent
        if spent > self.epsilon_each * (1 + 1e-9):
            raise RuntimeError(f"OpenDP's Laplace mechanism spends {spent}, more than {self.epsilon_each}")
        return measurement

    def number(self, value: float, sensitivity: float) -> float:
        return float(self._measurement(False, float(sensitivity))(float(value)))

    def vector(self, values: Sequence[float], sensitivity: float) -> list[float]:
        return [float(v) for v in self._measurement(True, float(sensitivity))([float(v) for v in values])]

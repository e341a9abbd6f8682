"""asyncflow as a FLAME analysis: the analyzer, the aggregators and ``run_star_model``.

A FLAME analysis script is two lines::

    from asyncflow.flame import run_star_model

    run_star_model()
"""

from asyncflow.flame.analysis import (
    FLAME_SDK,
    PassThroughAggregator,
    StatisticsAggregator,
    ZipAggregator,
    nnUNetAnalyzer,
    run_star_model,
)

__all__ = [
    "FLAME_SDK",
    "PassThroughAggregator",
    "StatisticsAggregator",
    "ZipAggregator",
    "nnUNetAnalyzer",
    "run_star_model",
]

"""asyncflow as a FLAME analysis: the analyzer, the aggregators and ``run_star_model``.

A FLAME analysis script is two lines::

    from asyncflow.flame import run_star_model

    run_star_model()

- :mod:`~asyncflow.flame.analysis`: the analyzer, the aggregators, ``run_star_model``
- :mod:`~asyncflow.flame.gateway`: the node's S3 data through its Kong gateway, streamed to disk
- :mod:`~asyncflow.flame.hub`: what reaches the FLAME Hub (progress, a few lines, no patient data)
- :mod:`~asyncflow.flame.redact`: what of a report may leave a node
- :mod:`~asyncflow.flame.bundle`: the ZIP and manifest the analyst downloads
- :mod:`~asyncflow.flame.storage`: each finished case in the node's storage, for a restart
- :mod:`~asyncflow.flame.standin`: the SDK's base classes, where the SDK is not installed
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

"""What the segmentations measure, per case and across FLAME nodes.

- :mod:`~asyncflow.stats.measure`: a case's label volumes, intensities, components, extent
- :mod:`~asyncflow.stats.aggregate`: a node's aggregates of its cases, and their merge across nodes
- :mod:`~asyncflow.stats.privacy`: Laplace noise on a node's numbers (OpenDP, optional)
"""

__all__: list[str] = []

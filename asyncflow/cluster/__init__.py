"""A request's steps on a Ray cluster, the driver keeping the books (``--cluster``).

- :mod:`~asyncflow.cluster.session`: the cluster joined, checked (every node reaches the shared
  folders) and watched; the workers per node; the request's actors ended
- :mod:`~asyncflow.cluster.tasks`: the stages' CPU steps as Ray tasks, tried again when a node is
  lost; the events a node logged, back in the driver's log
- :mod:`~asyncflow.cluster.predictor`: one prediction actor per GPU, loading the model plan once
"""

__all__: list[str] = []

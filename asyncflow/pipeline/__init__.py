"""The async runtime: one request through bounded streams, from inputs to the result.

- :mod:`~asyncflow.pipeline.run`: ``run_request``: the streams, the task group, the request's end
- :mod:`~asyncflow.pipeline.model`: the request's model plan, built from its settings
- :mod:`~asyncflow.pipeline.intake`: unpack workers and the assembly of cases
- :mod:`~asyncflow.pipeline.fetching`: the feed of inputs; a store's objects fetched within a window
- :mod:`~asyncflow.pipeline.preparing`: prepare workers, admitted by the memory budget
- :mod:`~asyncflow.pipeline.prediction`: one prediction worker per device
- :mod:`~asyncflow.pipeline.exporting`: export workers: the label map, the writers, the sender, the sink
- :mod:`~asyncflow.pipeline.flow`: what every stage does with a case (enter, step, fail, end)
- :mod:`~asyncflow.pipeline.ledger`: the request's books: reports, outputs, progress, the Result
- :mod:`~asyncflow.pipeline.workspace`: the request's temporary folder
- :mod:`~asyncflow.pipeline.budget`: the memory budget of the cases in flight
- :mod:`~asyncflow.pipeline.keys`: what names a case and a model (resume, SEG UIDs)
- :mod:`~asyncflow.pipeline.journal`: the output folder and its journal (``--resume``)
- :mod:`~asyncflow.pipeline.stopping`: stopping in two steps on SIGINT, SIGTERM, SIGHUP
"""

__all__: list[str] = []

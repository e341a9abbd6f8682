"""The hospital loop: a DICOM receiver that runs the pipeline as series arrive (``asyncflow listen``).

- :mod:`~asyncflow.listen.spool`: every instance on disk before it is acknowledged; series
  arriving, complete, done
- :mod:`~asyncflow.listen.receiver`: the C-STORE SCP (pynetdicom) that fills the spool
- :mod:`~asyncflow.listen.listener`: complete series -> requests, one after another; signals,
  restarts, retries
"""

__all__: list[str] = []

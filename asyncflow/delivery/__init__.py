"""A PACS both ways: each case's DICOM objects sent to it, and series pulled from it.

- :mod:`~asyncflow.delivery.pacs`: a destination (DICOMweb STOW-RS or DIMSE C-STORE), its
  authentication and TLS, and :class:`~asyncflow.delivery.pacs.Sender`, which sends a case's
  DICOM objects there, with retries, and says what became of them
- :mod:`~asyncflow.delivery.query`: series a QIDO-RS or C-FIND query finds, retrieved by
  WADO-RS or C-GET as a request's inputs

Plain synchronous functions (the store's fetch excepted: the pipeline awaits it); the pipeline
runs them in worker threads. Never inside FLAME, whose network lets no traffic out of a node
but the platform's own.
"""

__all__: list[str] = []

"""Outputs -> where a hospital looks: a PACS.

- :mod:`~asyncflow.delivery.pacs`: a destination (DICOMweb STOW-RS or DIMSE C-STORE) and
  :class:`~asyncflow.delivery.pacs.Sender`, which sends a case's DICOM objects there, with
  retries, and says what became of them

Plain synchronous functions; the pipeline runs them in worker threads. Never inside FLAME,
whose network lets no traffic out of a node but the platform's own.
"""

__all__: list[str] = []

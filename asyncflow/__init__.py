"""asyncflow: nnU-Net segmentation of DICOM and NIfTI requests through one async pipeline.

The public face::

    from asyncflow import run_request, run_request_sync, Settings, Result, Progress
    from asyncflow import OutputFolder, build_backends
    from asyncflow import RequestError, ModelError, SettingsError, LabelError

The package's folders follow the data flow: ``reading`` (inputs -> cases),
``backends`` (the model), ``writing`` (a case's outputs), ``labels`` and ``stats``
(what the outputs say), ``pipeline`` (the async runtime that joins them), and the
two shells over it, ``cli`` and ``flame``. See docs/explanation/pipeline.md.
"""

import sys

# tarfile's extraction filters (PEP 706), on which reading.archives relies, came with 3.11.4.
if sys.version_info < (3, 11, 4):
    raise ImportError(
        f"asyncflow needs Python 3.11.4 or newer (tarfile's extraction filters); this is Python "
        f"{sys.version.split()[0]} at {sys.executable}"
    )

from asyncflow._version import __version__
from asyncflow.errors import LabelError, ModelError, RequestError, SettingsError
from asyncflow.pipeline.journal import CaseSink, OutputFolder
from asyncflow.pipeline.model import build_backend, build_backends
from asyncflow.pipeline.run import run_request, run_request_sync
from asyncflow.result import Progress, Result
from asyncflow.settings import Settings

__all__ = [
    "CaseSink",
    "LabelError",
    "ModelError",
    "OutputFolder",
    "Progress",
    "RequestError",
    "Result",
    "Settings",
    "SettingsError",
    "__version__",
    "build_backend",
    "build_backends",
    "run_request",
    "run_request_sync",
]

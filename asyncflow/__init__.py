"""asyncflow: nnU-Net segmentation of DICOM and NIfTI requests through one async pipeline."""

from __future__ import annotations

__version__ = "0.1.0"

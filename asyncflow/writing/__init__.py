"""A case's label map -> its outputs (artifacts).

- :mod:`~asyncflow.writing.registry`: every kind of output, in order; a case's outputs written
- :mod:`~asyncflow.writing.base`: the writer interface, the label map writers get, encoding options
- :mod:`~asyncflow.writing.seg`: DICOM SEG (highdicom), read back and checked voxel for voxel
- :mod:`~asyncflow.writing.labelfile`: the MITK label JSON beside each SEG
- :mod:`~asyncflow.writing.statistics`: each label's measurements, as report data
- :mod:`~asyncflow.writing.rtstruct`: the label map as a DICOM RT Structure Set (contours per slice)
- :mod:`~asyncflow.writing.sr`: the measurements as DICOM SR (a TID 1500 Measurement Report)
- :mod:`~asyncflow.writing.planes`: a SEG on the prediction's own grid (a 4D image's volume, a mosaic)
- :mod:`~asyncflow.writing.nifti`: NIfTI label maps on the source's grid
- :mod:`~asyncflow.writing.deidentify`: DICOM PS3.15's Basic Profile for what leaves a node

Each kind of output is one :class:`~asyncflow.writing.base.Writer`, listed once in the registry.
Plain synchronous functions; the pipeline runs them in worker threads.
"""

__all__: list[str] = []

"""A predicted case -> its outputs.

- :mod:`~asyncflow.writing.export`: one case's export: label map, SEG or NIfTI, label files,
  statistics
- :mod:`~asyncflow.writing.seg`: DICOM SEG (highdicom), read back and checked voxel for voxel
- :mod:`~asyncflow.writing.rtstruct`: the label map as a DICOM RT Structure Set (contours per slice)
- :mod:`~asyncflow.writing.sr`: the measurements as DICOM SR (a TID 1500 Measurement Report)
- :mod:`~asyncflow.writing.planes`: a SEG on the prediction's own grid (a 4D image's volume, a mosaic)
- :mod:`~asyncflow.writing.nifti`: NIfTI label maps on the source's grid
- :mod:`~asyncflow.writing.deidentify`: DICOM PS3.15's Basic Profile for what leaves a node

Plain synchronous functions; the pipeline runs them in worker threads.
"""

__all__: list[str] = []

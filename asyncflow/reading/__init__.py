"""Inputs -> cases: everything that reads what a request holds, before the model sees it.

- :mod:`~asyncflow.reading.request`: a request's entries as numbered inputs
- :mod:`~asyncflow.reading.archives`: one input unpacked safely (TARs by content, limits, no links)
- :mod:`~asyncflow.reading.names`: names from the data made safe for paths and outputs
- :mod:`~asyncflow.reading.scan`: what each file is, by content (DICOM, NIfTI, MITK labels)
- :mod:`~asyncflow.reading.dicom`: DICOM headers, and a series ordered in space
- :mod:`~asyncflow.reading.series`: the volumes in one DICOM series
- :mod:`~asyncflow.reading.volumes`: a 4D series' volumes told apart, and which become cases
- :mod:`~asyncflow.reading.tilt`: a gantry-tilted series on an untilted grid, and labels back
- :mod:`~asyncflow.reading.select`: series selection rules (which series a model is for)
- :mod:`~asyncflow.reading.assemble`: scanned files -> cases (series across inputs)
- :mod:`~asyncflow.reading.prepare`: a case's volume in memory (and as nnU-Net input files)

Plain synchronous functions; the pipeline runs them in worker threads.
"""

__all__: list[str] = []

"""What a segment is called: names, standard codes, colours, and where they come from.

- :mod:`~asyncflow.labels.segment`: a segment's label, and the labels a model declares
- :mod:`~asyncflow.labels.vocabulary`: label names to DICOM's standard codes
- :mod:`~asyncflow.labels.config`: a user's label configuration, merged field by field
- :mod:`~asyncflow.labels.mitk`: MITK label stack JSON, read and written
"""

__all__: list[str] = []

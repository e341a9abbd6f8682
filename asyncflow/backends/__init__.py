"""The model: one interface for the prediction worker, one implementation per nnU-Net generation.

- :mod:`~asyncflow.backends.base`: the ``Backend``, ``ModelSteps`` and ``NextStage`` protocols,
  ``ModelInfo``
- :mod:`~asyncflow.backends.nnunet_v2`: nnU-Net v2 in process, split where the hardware changes
- :mod:`~asyncflow.backends.imports`: nnU-Net's modules imported by one thread, before they are used
- :mod:`~asyncflow.backends.resampling`: nnU-Net's resampling one class at a time, or its torch one
- :mod:`~asyncflow.backends.slices`: thick slices picked before they are resized, nnU-Net's values
- :mod:`~asyncflow.backends.ensemble`: configurations of one dataset, probabilities averaged
- :mod:`~asyncflow.backends.cascade`: ``3d_lowres``, then ``3d_cascade_fullres`` reading its labels
- :mod:`~asyncflow.backends.models`: several different models, every case through each
- :mod:`~asyncflow.backends.postprocessing`: nnU-Net's postprocessing, read safely and applied
- :mod:`~asyncflow.backends.nnunet_v1`: nnU-Net v1 through ``nnUNet_predict``, a batch per run
- :mod:`~asyncflow.backends.locate`: where a model is (a folder, a task under a results folder, a
  best configuration)
- :mod:`~asyncflow.backends.build`: what a model folder declares, and the backend it needs
- :mod:`~asyncflow.backends.plan`: the model plan a request runs (model, ensemble, workers, steps,
  postprocessing, labels)
"""

from asyncflow.backends.base import Backend, ModelInfo, ModelSteps
from asyncflow.backends.build import create_backend
from asyncflow.backends.plan import ModelPlan

__all__ = ["Backend", "ModelInfo", "ModelPlan", "ModelSteps", "create_backend"]

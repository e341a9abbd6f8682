"""The model: one interface for the prediction worker, one implementation per nnU-Net generation.

- :mod:`~asyncflow.backends.base`: the ``Backend`` and ``ModelSteps`` protocols, ``ModelInfo``
- :mod:`~asyncflow.backends.nnunet_v2`: nnU-Net v2 in process, split where the hardware changes
- :mod:`~asyncflow.backends.resampling`: nnU-Net's resampling one class at a time, or its torch one
- :mod:`~asyncflow.backends.nnunet_v1`: nnU-Net v1 through ``nnUNet_predict``, a batch per run
- :mod:`~asyncflow.backends.build`: the backend a model needs, built from the settings
"""

from asyncflow.backends.base import Backend, ModelInfo, ModelSteps
from asyncflow.backends.build import build_backend, build_backends, create_backend

__all__ = ["Backend", "ModelInfo", "ModelSteps", "build_backend", "build_backends", "create_backend"]

"""nnU-Net v2 in-process: one ``nnUNetPredictor``, loaded once, reused for every case."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import SimpleITK as sitk

from ..case import PreparedCase
from ..log import get_logger
from .base import ModelError, ModelInfo

__all__ = ["NnUNetV2Backend"]

log = get_logger("asyncflow.backends.nnunet_v2")


class NnUNetV2Backend:
    max_batch = 1  # in process: no start-up to share, one case at a time
    needs_files = False  # images from memory: no NIfTI written and read back

    def __init__(
        self,
        info: ModelInfo,
        *,
        tile_step_size: float = 0.5,
        use_mirroring: bool = True,
        device: str = "auto",
        torch_threads: int | None = None,
    ) -> None:
        self.info = info
        self.tile_step_size = tile_step_size
        self.use_mirroring = use_mirroring
        self.device = device
        self.torch_threads = torch_threads
        self._predictor: Any = None

    def load(self) -> None:
        if self._predictor is not None:
            return
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        name = self.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"device {name} was asked for, but torch sees no CUDA device")
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        elif name == "cpu":
            # Prepare and export threads run beside prediction: leave them half the cores.
            # (Measured here: 2 torch threads on a busy 2-core machine run up to 20x slower.)
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        device = torch.device(name)
        # nnU-Net prints notices to stdout, which belongs to the caller (the CLI's summary).
        notices = io.StringIO()
        with contextlib.redirect_stdout(notices):
            predictor = self._initialise(nnUNetPredictor, device)
        for line in filter(None, (line.strip() for line in notices.getvalue().splitlines())):
            log.debug("model.notice", text=line[:300])
        self._predictor = predictor
        self.device = name

    def _initialise(self, predictor_class: Any, device: Any) -> Any:
        predictor = predictor_class(
            tile_step_size=self.tile_step_size,
            use_gaussian=True,
            use_mirroring=self.use_mirroring,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        try:
            predictor.initialize_from_trained_model_folder(
                str(self.info.folder), use_folds=self.info.folds, checkpoint_name=self.info.checkpoint
            )
        except Exception as exc:  # nnU-Net raises anything from KeyError to RuntimeError here
            raise ModelError(f"nnU-Net v2 could not load the model: {type(exc).__name__}: {exc}") from exc
        return predictor

    async def predict(self, cases: Sequence[PreparedCase]) -> list[np.ndarray | Exception]:
        return [await anyio.to_thread.run_sync(self.predict_case, case) for case in cases]

    def predict_case(self, prepared: PreparedCase) -> np.ndarray:
        """One case's label map (blocking: call it from a worker thread)."""
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

        if self._predictor is None:
            raise ModelError("predict() before load()")
        if len(prepared.images) != self.info.num_channels:
            raise ValueError(
                f"case has {len(prepared.images)} channel(s), the model expects {self.info.num_channels}"
            )
        reader = self._predictor.plans_manager.image_reader_writer_class()
        if type(reader) is SimpleITKIO:  # what SimpleITKIO.read_images returns, without a file
            data, properties = _as_simpleitkio_read(prepared.images)
            return np.asarray(self._predictor.predict_single_npy_array(data, properties, None, None, False))
        # Another reader (and axis order): files in, the map written and read back as SimpleITK does.
        files = prepared.channel_files or [
            _write(image, prepared.workdir / f"{prepared.case.case_id}_{n:04d}.nii.gz")
            for n, image in enumerate(prepared.images)
        ]
        data, properties = reader.read_images([str(f) for f in files])
        labels = self._predictor.predict_single_npy_array(data, properties, None, None, False)
        written = prepared.workdir / "prediction.nii.gz"
        reader.write_seg(labels, str(written), properties)
        return sitk.GetArrayFromImage(sitk.ReadImage(str(written)))


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def _as_simpleitkio_read(images: Sequence[sitk.Image]) -> tuple[np.ndarray, dict[str, Any]]:
    """nnU-Net v2's ``SimpleITKIO.read_images`` for images already in memory (3D, same grid)."""
    first = images[0]
    for image in images[1:]:
        if image.GetSize() != first.GetSize() or image.GetSpacing() != first.GetSpacing():
            raise ValueError("the case's channels differ in size or spacing")
    data = np.vstack(
        [sitk.GetArrayViewFromImage(i)[None] for i in images], dtype=np.float32, casting="unsafe"
    )
    properties = {
        "sitk_stuff": {
            "spacing": first.GetSpacing(),
            "origin": first.GetOrigin(),
            "direction": first.GetDirection(),
        },
        "spacing": [abs(s) for s in first.GetSpacing()[::-1]],
    }
    return data, properties

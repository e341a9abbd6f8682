"""nnU-Net v1 through the stock ``nnUNet_predict`` command, one process per batch of cases.

A v1 process pays its start-up (Python, torch, the model) before its first case,
so the pipeline hands this backend every prepared case that is waiting, up to
``max_batch``, and one process predicts them all. The process runs from an
argument list (never a shell) in its own session, so a timeout or a cancelled
request kills it with every worker process it started.

The environment is set for the user:

- ``RESULTS_FOLDER`` from the model folder, and the task by its name on disk,
  so a ``Task029_LITS`` folder serves ``Task029_LiTS`` without being renamed;
- ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``: torch >= 2.6 loads checkpoints
  weights-only by default, and real v1 checkpoints (their loss curves hold
  numpy scalars) then fail with ``_pickle.UnpicklingError: Weights only load
  failed``. The model folder is trusted configuration, as v1 unpickles
  ``plans.pkl`` anyway;
- thread counts for torch, and ``CUDA_VISIBLE_DEVICES``: empty for ``device=cpu``,
  ``N`` for ``cuda:N``
  (``--all_in_gpu`` is never passed: ``True`` fails without a GPU).

``nnUNet_predict`` writes a ``training_log_*.txt`` into each fold folder as it
loads the checkpoint, which fails on a model folder mounted read-only (as an
image ships one). ``RESULTS_FOLDER`` therefore points at a writable overlay made
at :meth:`NnUNetV1Backend.load`: the model's folder layout, its files as symlinks,
its fold folders real, temporary directories. The model folder is never written.

A cascade (``3d_cascade_fullres``) runs its first stage inside ``nnUNet_predict``, from
``nnUNet/3d_lowres/<task>/<trainer>__<plans>`` (found before any case by
:func:`asyncflow.backends.cascade.previous_stage`): the overlay holds both stages, ``-tr``
names the first stage's trainer and ``-ctr`` the cascade's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import weakref
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import anyio
import numpy as np
import SimpleITK as sitk
from anyio.abc import ByteReceiveStream, Process

from asyncflow.backends.base import ModelInfo
from asyncflow.case import Geometry, PreparedCase
from asyncflow.enums import Resampling
from asyncflow.errors import ModelError, V1RunError
from asyncflow.log import Stopwatch, get_logger, scrub
from asyncflow.machine import half_the_cores

__all__ = ["NnUNetV1Backend"]

log = get_logger(__name__)

_STDERR_TAIL_LINES = 15


class NnUNetV1Backend:
    def __init__(
        self,
        info: ModelInfo,
        *,
        tile_step_size: float = 0.5,
        use_mirroring: bool = True,
        device: str = "auto",
        torch_threads: int | None = None,
        resampling: Resampling = Resampling.MODEL,
        v1_command: str = "nnUNet_predict",
        v1_batch_size: int = 8,
        v1_case_timeout_s: float = 1800.0,
        v1_preprocess_threads: int = 2,
        v1_export_threads: int = 2,
        v1_first_stage: ModelInfo | None = None,
    ) -> None:
        if Resampling(resampling) is not Resampling.MODEL:
            raise ModelError(
                f"resampling '{resampling}' needs an nnU-Net v2 model: nnUNet_predict (v1) "
                "resamples in its own process, as its plans say (resampling model)"
            )
        self.info = info
        self.max_batch = v1_batch_size
        self.needs_files = True  # nnUNet_predict reads <case>_0000.nii.gz
        self.steps = None  # nnUNet_predict preprocesses, predicts and resamples in its own process
        self.tile_step_size = tile_step_size
        self.use_mirroring = use_mirroring
        self.device = device
        self.torch_threads = torch_threads
        self.command = v1_command
        self.command_name = Path(v1_command).name  # in messages
        self.case_timeout_s = v1_case_timeout_s
        self.preprocess_threads = v1_preprocess_threads
        self.export_threads = v1_export_threads
        self.first_stage = v1_first_stage  # a cascade's 3d_lowres, which nnUNet_predict runs first
        self._executable: str | None = None
        self._overlay: Path | None = None  # RESULTS_FOLDER for nnUNet_predict (see the module doc)

    def load(self) -> None:
        """Find the command and build the model's writable overlay; the model itself loads in
        every run."""
        if self._executable is not None:
            return
        if os.sep in self.command:  # a path: used as it is
            found = self.command if os.access(self.command, os.X_OK) else None
        else:  # a name: on PATH, or in the running Python's bin/ (a virtualenv not activated)
            beside_python = Path(sys.executable).with_name(self.command)
            found = shutil.which(self.command) or (str(beside_python) if beside_python.is_file() else None)
        if found is None:
            raise ModelError(
                f"{self.command} not found on PATH or beside {sys.executable}: "
                "install nnU-Net v1 with pip install 'asyncflow[v1]'"
            )
        stages = [self.info.folder] + ([self.first_stage.folder] if self.first_stage else [])
        self._overlay = _writable_overlay(*stages)
        weakref.finalize(self, shutil.rmtree, self._overlay, True)  # with the backend, or at exit
        self._executable = found

    def arguments(self, inputs: Path, outputs: Path, cases: int) -> list[str]:
        """The ``nnUNet_predict`` command line for one run of ``cases`` cases."""
        assert self._executable is not None
        info = self.info
        command = [
            self._executable,
            *("-i", str(inputs), "-o", str(outputs)),
            *("-t", info.name, "-m", info.configuration, "-p", info.plans),
            # a cascade: -tr names its first stage's trainer, -ctr its own
            *(
                ("-tr", self.first_stage.trainer, "-ctr", info.trainer)
                if self.first_stage
                else ("-tr", info.trainer)
            ),
            *("-f", *(str(f) for f in info.folds)),
            *("-chk", info.checkpoint),
            *("--step_size", str(self.tile_step_size)),
            *("--num_threads_preprocessing", str(min(self.preprocess_threads, cases))),
            *("--num_threads_nifti_save", str(min(self.export_threads, cases))),
        ]
        if not self.use_mirroring:
            command.append("--disable_tta")
        return command

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_WEIGHTS_ONLY_LOAD"}
        # v1's preprocessing workers print a case's error ("error in <file>", then the message)
        # and may end without flushing: unbuffered, their lines reach the pipe (block-buffered,
        # the message was lost).
        env["PYTHONUNBUFFERED"] = "1"
        env["RESULTS_FOLDER"] = str(self._overlay or self.info.folder.parents[3])
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        threads = str(self.torch_threads or half_the_cores())
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif self.device.startswith("cuda:"):  # v1 uses the first GPU it sees
            env["CUDA_VISIBLE_DEVICES"] = self.device.removeprefix("cuda:")
        return env

    async def predict(self, cases: Sequence[PreparedCase]) -> list[np.ndarray | Exception]:
        if self._executable is None:
            raise ModelError("predict() before load()")
        # Beside the case folders, inside the request's folder, so its cleanup covers a crash here.
        root = Path(tempfile.mkdtemp(prefix="nnunet-v1-", dir=cases[0].workdir.parent))
        try:
            inputs, outputs = root / "in", root / "out"
            inputs.mkdir()
            results: list[np.ndarray | Exception | None] = []
            for number, case in enumerate(cases):
                channels = case.channel_files
                if len(channels) != self.info.num_channels:
                    results.append(
                        ValueError(
                            f"case has {len(channels)} channel(s), the model expects {self.info.num_channels}"
                        )
                    )
                    continue
                results.append(None)
                for channel, source in enumerate(channels):
                    (inputs / f"{_name(number)}_{channel:04d}.nii.gz").symlink_to(Path(source).resolve())
            todo = sum(r is None for r in results)
            if todo:
                stdout = await self._run(self.arguments(inputs, outputs, todo), todo)
                for number, result in enumerate(results):
                    if result is None:
                        results[number] = await anyio.to_thread.run_sync(
                            _read_prediction, outputs, number, cases[number].geometry, stdout
                        )
            return [r for r in results if r is not None]
        finally:
            await anyio.to_thread.run_sync(shutil.rmtree, root, True)

    async def _run(self, command: list[str], cases: int) -> list[str]:
        """Run one ``nnUNet_predict``; its stdout lines, or :class:`V1RunError`."""
        limit = self.case_timeout_s * cases
        stdout: deque[str] = deque(maxlen=400)
        stderr: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        watch = Stopwatch()
        try:
            process = await anyio.open_process(command, env=self.environment(), start_new_session=True)
        except OSError as exc:
            raise V1RunError(f"{self.command_name} could not start: {exc}") from exc
        returncode: int | None = None
        try:
            with anyio.move_on_after(limit):
                async with anyio.create_task_group() as tg:
                    assert process.stdout is not None and process.stderr is not None
                    tg.start_soon(_collect, process.stdout, stdout)
                    tg.start_soon(_collect, process.stderr, stderr)
                returncode = await process.wait()
        finally:  # on timeout, error or cancellation alike: no process outlives its run
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    _kill_session(process)
                    await process.wait()
                await process.aclose()
        log.info(
            "nnunet_v1.finished",
            cases=cases,
            returncode=returncode,
            timed_out=returncode is None,
            duration_s=watch.duration_s,
        )
        for line in stdout:
            log.debug("model.notice", text=scrub(line[:300]))
        if returncode is None:
            raise V1RunError(
                f"{self.command_name} stopped after {limit:g} s ({cases} case(s) x v1_case_timeout_s)"
            )
        if returncode != 0:
            tail = " | ".join(line.strip() for line in stderr if line.strip()) or "no stderr"
            raise V1RunError(f"{self.command_name} exited with code {returncode}: {tail}")
        return list(stdout)


def _writable_overlay(*models: Path) -> Path:
    """A RESULTS_FOLDER whose ``nnUNet/<configuration>/<task>/<trainer>__<plans>`` are ``models``
    as symlinks, with fold folders of their own that nnUNet_predict may write its logs into."""
    root = Path(tempfile.mkdtemp(prefix="asyncflow-v1-model-"))
    for model in models:
        target = root / model.relative_to(model.parents[3])
        target.mkdir(parents=True)
        for entry in model.iterdir():
            if entry.is_dir() and entry.name.startswith("fold_"):
                (target / entry.name).mkdir()
                for file in entry.iterdir():
                    (target / entry.name / file.name).symlink_to(file.resolve())
            else:
                (target / entry.name).symlink_to(entry.resolve())
    return root


def _name(number: int) -> str:
    """Case names inside one run: by position, so nothing of the case's origin reaches nnU-Net."""
    return f"b{number:04d}"


async def _collect(stream: ByteReceiveStream, lines: deque[str]) -> None:
    pending = b""
    async for chunk in stream:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        lines.extend(line.decode(errors="replace") for line in complete)
    if pending:
        lines.append(pending.decode(errors="replace"))


def _kill_session(process: Process) -> None:
    """The run and every worker process it started (they share its session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _read_prediction(
    outputs: Path, number: int, geometry: Geometry, stdout: list[str]
) -> np.ndarray | Exception:
    """One case's label map as ``nnUNet_predict`` wrote it, checked against its input."""
    written = outputs / f"{_name(number)}.nii.gz"
    if not written.is_file():
        # v1 prints a case's preprocessing error, skips the case and still exits 0.
        marker = f"{_name(number)}_0000"
        # The message is the next line; another worker's line may come between (one process
        # per case prints on the same pipe), so the next line that is not an "error in" one.
        printed = [
            next((later.strip() for later in stdout[k + 1 : k + 4] if not later.startswith("error in")), "")
            for k, line in enumerate(stdout[:-1])
            if line.startswith("error in") and marker in line
        ]
        printed = [line for line in printed if line]
        detail = f": {printed[0]}" if printed else ""
        return RuntimeError(f"nnUNet_predict wrote no prediction for the case{detail}")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(written)))
    if not np.issubdtype(labels.dtype, np.integer):
        return TypeError(f"nnUNet_predict wrote a {labels.dtype} map; an integer label map is needed")
    expected = tuple(reversed(geometry.size))
    if labels.shape != expected:
        return ValueError(f"nnUNet_predict wrote a {labels.shape} map for a {expected} input")
    return labels

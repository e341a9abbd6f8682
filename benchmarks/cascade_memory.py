"""A cascade's memory estimate against what its steps allocate, on CT-sized cases.

For each series of ``network_hold.py``'s request (``--tars`` TARs of ``--series`` synthetic CT
series, 512 x 512, 0.7-0.9 mm pixels, 1-5 mm slices), read as NIfTI, against ``ensemble.py``'s
cascade (``3d_lowres`` at 2.0 x 1.6 x 1.6 mm, then ``3d_cascade_fullres`` at 1.0 x 0.8 x
0.8 mm): ``CascadeSteps.memory_phases`` beside the peak tracemalloc saw in each step, as the
pipeline holds a case (the first stage's preprocessing; its model input and logits; the step
between the stages; the second stage's model input and logits; the way back), and, within the
step between the stages, the resampling of the first stage's label map alone against
``seg_resampling_bytes``. The logits are
random float16 of the network's shape (the network itself allocates outside numpy). numpy's
arrays are what tracemalloc sees; the channels (SimpleITK's) are added by their size. One
process, one case at a time, one thread.

Usage: ``python benchmarks/cascade_memory.py [--tars 4 --series 2] [--out
benchmarks/results-cascade-memory]``. Writes ``results.json``. Not a test: it prints what it
measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ensemble import three_configurations  # noqa: E402
from network_hold import add_request_arguments, write_nifti_copies, write_request  # noqa: E402

_peak = [0]  # tracemalloc's peak of the step being traced, across the resets below
_seg_calls: list[tuple[int, tuple[Any, ...]]] = []  # each resampling of the previous stage's
# labels: what it allocated, and its grids (spacing, new spacing, shape, new shape)


def _traced(step: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    gc.collect()
    tracemalloc.start()
    _peak[0] = 0
    try:
        result = step(*args)
        return result, max(_peak[0], tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


def _trace_seg_resampling() -> None:
    """Record what each call of asyncflow's scipy resampling with ``is_seg`` allocates (its
    result included), keeping the step's own peak."""
    from asyncflow.backends import resampling

    plain = resampling.scipy_by_channel

    def traced(data: Any, new_shape: Any, spacing: Any, new_spacing: Any, *, kwargs: dict[str, Any]) -> Any:
        if not kwargs.get("is_seg") or not tracemalloc.is_tracing():
            return plain(data, new_shape, spacing, new_spacing, kwargs=kwargs)
        _peak[0] = max(_peak[0], tracemalloc.get_traced_memory()[1])
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = plain(data, new_shape, spacing, new_spacing, kwargs=kwargs)
        peak = tracemalloc.get_traced_memory()[1]
        _peak[0] = max(_peak[0], peak)
        _seg_calls.append((peak - before, (spacing, new_spacing, data.shape[1:], new_shape)))
        return result

    resampling.scipy_by_channel = traced


def measure(path: Path, models: dict[str, Path]) -> dict[str, Any]:
    import SimpleITK as sitk

    from asyncflow.backends.base import ModelInfo
    from asyncflow.backends.cascade import CascadeSteps, PreviousStage
    from asyncflow.backends.nnunet_v2 import Logits, NnUNetV2Steps
    from asyncflow.backends.resampling import seg_resampling_bytes
    from asyncflow.case import Case, Geometry, PreparedCase
    from asyncflow.enums import SourceKind

    first, second = (
        NnUNetV2Steps(ModelInfo.from_folder(models[c])) for c in ("3d_lowres", "3d_cascade_fullres")
    )
    steps = CascadeSteps(first, second)

    def logits(stage: NnUNetV2Steps, shape: tuple[int, ...], properties: dict[str, Any]) -> Logits:
        classes = stage.label_manager.num_segmentation_heads
        array = np.random.default_rng(1).normal(size=(classes, *shape)).astype(np.float16)
        return Logits(array, properties, 0.0)

    _seg_calls.clear()
    image = sitk.ReadImage(str(path))
    case = Case("case-0001", SourceKind.NIFTI, path.name, path.name, [])
    prepared = PreparedCase(case, path.parent, [image], Geometry.of(image), [], [])
    phases = steps.memory_phases(prepared)
    staged, preprocess = _traced(steps.preprocess, prepared)
    prepared.images = []
    first_output = logits(first, staged.model_input.data.shape[1:], staged.model_input.properties)
    first_held = staged.model_input.nbytes + first_output.array.nbytes
    previous = PreviousStage(first_output, staged.images, steps, 0.0)
    del staged, first_output
    second_input, between = _traced(previous.next_input, prepared)
    del previous
    model_input = second_input.model_input
    second_output = logits(second, model_input.data.shape[1:], model_input.properties)
    second_held = second_input.nbytes + second_output.array.nbytes
    del second_input, model_input
    _, to_labels = _traced(steps.to_labels, prepared, second_output)
    measured = {
        "preprocess": preprocess,
        "first_held": first_held,
        "between": between,
        "second_held": second_held,
        "to_labels": to_labels + second_output.array.nbytes,
    }
    channels = image.GetNumberOfPixels() * image.GetSizeOfPixelComponent()
    (seg_bytes, grids), labels = _seg_calls[0], len(second.label_manager.foreground_labels) + 1
    peak = max(measured.values()) + channels
    return {
        "case": path.name,
        "size": list(image.GetSize()),
        "spacing": [round(s, 3) for s in image.GetSpacing()],
        "estimate_bytes": int(phases.peak),
        "estimate_phases": {
            "base": phases.base,
            "preprocess": phases.preprocess,
            "held": phases.model_input + phases.logits,
            "to_labels": phases.to_labels,
        },
        "measured_bytes": measured,
        "seg_resampling": {
            "measured_bytes": int(seg_bytes),
            "estimate_bytes": int(seg_resampling_bytes(second.configuration_manager, *grids, labels)),
        },
        "channels_bytes": channels,
        "measured_peak_bytes": peak,
        "estimate_over_measured": round(phases.peak / peak, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_request_arguments(parser)
    parser.add_argument("--out", type=Path, default=HERE / "results-cascade-memory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="asyncflow-cascade-memory-"))
    cases: list[dict[str, Any]] = []
    _trace_seg_resampling()
    try:
        models = three_configurations(scratch / "Dataset999_AsyncflowTiny")
        rng = np.random.default_rng(16)  # ensemble.py's request
        tars = write_request(scratch / "request", args.tars, args.series, args.matrix, rng)
        for path in write_nifti_copies(tars, scratch / "nifti"):
            cases.append(measure(path, models))
            print(json.dumps(cases[-1]), flush=True)
            results = {"cases": cases}
            (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ratios = [c["estimate_over_measured"] for c in cases]
    print(f"estimate / measured: {min(ratios)}-{max(ratios)}; wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

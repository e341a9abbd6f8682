"""Which CPU steps hold the GIL: each step alone, then two of it at once in threads.

    python benchmarks/gil.py [--slices 150] [--matrix 512] [--model-spacing 1.0,0.8,0.8]

For one synthetic CT series (``--matrix``^2 x ``--slices`` at 0.8 x 0.8 x 2.0 mm)
and the tiny model replanned to ``--model-spacing`` (z, y, x mm: a model that must
resample, as real CT models do), every step of a case runs once alone and then
twice at once in two threads, and twice at once in two (forked) processes.
``thread_ratio`` = two-in-threads wall / one-alone wall: about 1 on two free cores
means the step releases the GIL (threads scale), about 2 that it holds it; where
``process_ratio`` is also well above 1, the step is bound by something else
(memory bandwidth) and processes would not help either. Run on an otherwise idle
machine with at least two cores. Not a test: it prints what it measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixed_service import block_logits

from asyncflow.backends.base import ModelInfo
from asyncflow.backends.nnunet_v2 import Logits, NnUNetV2Steps
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom, replanned_model
from asyncflow.reading.archives import unpack
from asyncflow.reading.assemble import CaseBuilder
from asyncflow.reading.prepare import prepare_case
from asyncflow.reading.request import request_items
from asyncflow.reading.scan import scan
from asyncflow.settings import Settings
from asyncflow.writing.base import Algorithm, LabelMap, OutputOptions
from asyncflow.writing.registry import write_outputs


def _twice(step: Callable[[], Any]) -> tuple[float, float, float]:
    """Seconds for one call alone (after a warm-up call), for two calls at once in threads, and
    for two at once in forked processes (what the cores and memory allow without the GIL)."""
    step()
    started = time.perf_counter()
    step()
    alone = time.perf_counter() - started
    timings = []
    for kind in (threading.Thread, multiprocessing.get_context("fork").Process):
        workers = [kind(target=step) for _ in range(2)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        timings.append(time.perf_counter() - started)
    return alone, timings[0], timings[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--model-spacing", default="1.0,0.8,0.8", help="z,y,x mm of the replanned model")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="asyncflow-gil-"))
    try:
        model = replanned_model(scratch / "model", [float(s) for s in args.model_spacing.split(",")])
        info = ModelInfo.from_folder(model)
        steps = NnUNetV2Steps(info)
        phantom = make_phantom(
            np.random.default_rng(0), (args.slices, args.matrix, args.matrix), spacing=(0.8, 0.8, 2.0)
        )
        tar = scratch / "series.tar"
        tar.write_bytes(dicom_series_tar([dicom_series_datasets(phantom)], compression=""))
        (item,) = request_items([tar])
        limits = Settings(model_dir=model).archive_limits()
        unpacked = unpack(item, scratch / "unpacked", limits)
        builder = CaseBuilder()
        (case,) = [*builder.add(scan(unpacked)), *builder.finish()]
        prepared = prepare_case(case, scratch / "case", write_files=False)
        model_input = steps.preprocess(prepared)
        prepared.model_input = model_input
        logits = Logits(
            block_logits(len(info.labels) + 1, model_input.data.shape[1:]), model_input.properties, 0.0
        )
        labels = steps.to_labels(prepared, logits)
        algorithm = Algorithm("nnU-Net GIL", info.framework, info.parameters)
        measured = {
            "scan (pydicom headers)": lambda: scan(unpacked),
            "read (SimpleITK/GDCM)": lambda: prepare_case(case, scratch / "case", write_files=False),
            "preprocess (nnU-Net)": lambda: steps.preprocess(prepared),
            "to_labels (nnU-Net)": lambda: steps.to_labels(prepared, logits),
            "outputs (highdicom SEG, statistics)": lambda: write_outputs(
                LabelMap.of(prepared, labels, info.labels, {}, algorithm, OutputOptions())
            ),
        }
        print(
            f"{args.matrix}^2 x {args.slices} slices at 0.8 x 0.8 x 2.0 mm, model at {args.model_spacing} mm "
            f"(z,y,x); model input {model_input.data.shape}; {os.cpu_count()} cores"
        )
        rows = {}
        for name, step in measured.items():
            alone, threads, processes = _twice(step)
            rows[name] = {
                "alone_s": round(alone, 2),
                "two_threads_s": round(threads, 2),
                "two_processes_s": round(processes, 2),
                "thread_ratio": round(threads / alone, 2),
                "process_ratio": round(processes / alone, 2),
            }
            print(json.dumps({"step": name, **rows[name]}), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

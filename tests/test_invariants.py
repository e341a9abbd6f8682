"""Nothing lost: random mixtures of good, bad and hostile inputs through the real pipeline (the
model is asyncflow.testing's FakeBackend: what is checked is the accounting, not the network).

For every request: each input appears in the report exactly once; each case once,
as done (with its output) or failed (with a reason); no temporary file remains
and nothing is written outside the work folder, whatever the request held.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncflow import RequestError, Result, run_request
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom, nifti_bytes
from asyncflow.settings import Settings
from asyncflow.testing import FakeBackend


def _tar(members: dict[str, bytes], links: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if links:
            link = tarfile.TarInfo("escape")
            link.type, link.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
            tar.addfile(link)
    return buffer.getvalue()


def _pool() -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    phantom = make_phantom(rng, (16, 16, 16))
    good = nifti_bytes(phantom.image, phantom.spacing, phantom.origin)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "flat.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(path))
        flat = path.read_bytes()
    series = dicom_series_tar([dicom_series_datasets(make_phantom(rng, (8, 16, 16)))])
    raw = gzip.decompress(good)
    return {
        "nifti": good,
        "dicom_tar": series,
        "nested": _tar({"inner.tar": _tar({"vol.nii.gz": good})}),
        "flat_nifti": flat,
        "truncated_nifti": gzip.compress(raw[: len(raw) // 2]),
        "truncated_gz": good[: len(good) // 3],
        "hostile_tar": _tar({"../../outside.txt": b"x", "/abs.txt": b"y", "notes.txt": b"z"}, links=True),
        "empty": b"",
    }


POOL = _pool()

entry = st.tuples(
    st.one_of(st.sampled_from(sorted(POOL)), st.binary(min_size=1, max_size=64)),
    st.sampled_from(["bytes", "mapping", "sneaky_key"]),
)


def _entries(drawn: list[tuple[Any, str]]) -> list[Any]:
    entries: list[Any] = []
    for n, (what, wrap) in enumerate(drawn):
        data = POOL[what] if isinstance(what, str) else what
        if wrap == "bytes":
            entries.append(data)
        elif wrap == "mapping":
            entries.append({f"site/{n}/{what if isinstance(what, str) else 'junk'}": data})
        else:
            entries.append({f"../../{n}/../Patient^Name\u00e9.tar": data})
    return entries


def _check(result: Result, inputs: int) -> None:
    assert sorted(i["index"] for i in result.inputs) == list(range(inputs))
    ids = Counter(c.case_id for c in result.cases)
    assert all(n == 1 for n in ids.values())
    outputs = {**result.dicom_seg_bytes, **result.nifti_seg_bytes}
    for case in result.cases:
        assert case.status in ("done", "failed"), case
        if case.status == "done":
            assert outputs.get(case.output)
        else:
            assert case.error and case.error_stage
    assert sorted(outputs) == sorted(c.output for c in result.cases if c.status == "done")
    assert all(s.reason for s in result.skipped)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same 200 mixtures on every CI run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=st.lists(entry, min_size=1, max_size=4))
def test_every_input_and_case_is_accounted_for(drawn: list[tuple[Any, str]], tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("request")
    work = root / "work"
    entries = _entries(drawn)
    ended: list[Result] = []
    try:
        result = anyio.run(
            lambda: run_request(
                entries,
                Settings(work_dir=work, unpack_workers=2, prepare_workers=2, export_workers=2),
                backend=FakeBackend(),
                on_finish=ended.append,
            )
        )
        _check(result, len(entries))
    except RequestError as exc:
        assert str(exc).startswith("no usable case in the request")
        (partial,) = ended
        assert partial.status == "error" and partial.cases == []
        assert sorted(i["index"] for i in partial.inputs) == list(range(len(entries)))
    # No temporary file left, nothing written beside the work folder.
    assert [p.name for p in root.iterdir()] == ["work"] and not any(work.iterdir())

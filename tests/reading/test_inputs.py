from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import io
import lzma
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import dicom_bytes, make_tar

from asyncflow import RequestError
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom, nifti_bytes
from asyncflow.reading.archives import UnpackedInput, Withhold, restore_files, unpack
from asyncflow.reading.names import sanitise_relpath
from asyncflow.reading.request import InputItem, request_items
from asyncflow.reading.scan import classify, scan


def test_request_items_accepts_bytes_mappings_and_paths(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.bin").write_bytes(b"a")
    (folder / "b.bin").write_bytes(b"b")
    single = tmp_path / "single.bin"
    single.write_bytes(b"s")
    items = request_items([b"raw", {"proj/x/key.tar": b"k1", "other": b"k2"}, folder, str(single)])
    assert [i.name for i in items] == [
        "input-0",
        "proj/x/key.tar",
        "other",
        "study/b.bin",
        "study/sub/a.bin",
        "single.bin",
    ]
    assert [i.index for i in items] == list(range(6))
    assert items[1].data == b"k1" and items[3].path == folder / "b.bin"


@pytest.mark.parametrize("bad", [b"just bytes", {"k": b"v"}])
def test_a_single_entry_must_be_wrapped_in_a_list(bad: object) -> None:
    with pytest.raises(RequestError, match="list of entries"):
        request_items(bad)  # type: ignore[arg-type]


def test_wrong_entry_types_are_named(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="entry 0 is int"):
        request_items([3])  # type: ignore[list-item]
    with pytest.raises(RequestError, match="expected bytes"):
        request_items([{"k": "text"}])  # type: ignore[dict-item]
    with pytest.raises(RequestError, match="does not exist"):
        request_items([tmp_path / "missing"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "etc/passwd"),
        ("/abs/path/file.dcm", "abs/path/file.dcm"),
        ("C:\\Users\\x\\scan.nii.gz", "C_/Users/x/scan.nii.gz"),
        ("a/./b//c", "a/b/c"),
        ("..", "input"),
        ("we?rd*na:me", "we_rd_na_me"),
        (".hidden", "hidden"),
    ],
)
def test_sanitise_relpath(name: str, expected: str) -> None:
    assert sanitise_relpath(name).as_posix() == expected


def _compressions(data: bytes) -> dict[str, bytes]:
    plain = make_tar({"dir/file.txt": data}, mode="w")
    gz = make_tar({"dir/file.txt": data}, mode="w:gz")
    return {"plain": plain, "gz": gz, "bz2": bz2.compress(plain), "xz": lzma.compress(plain)}


@pytest.mark.parametrize("kind", ["plain", "gz", "bz2", "xz"])
def test_tar_is_recognised_by_content_not_name(tmp_path: Path, kind: str) -> None:
    data = _compressions(b"hello")[kind]
    result = unpack(InputItem(0, "misleading-name.dcm", data=data), tmp_path / "in")
    assert result.kind == "archive" and result.error is None
    assert [p.relative_to(tmp_path / "in").as_posix() for p in result.files] == ["dir/file.txt"]
    assert result.files[0].read_bytes() == b"hello"


def test_deleted_files_are_restored_from_their_input_and_nothing_else_is_touched(tmp_path: Path) -> None:
    inner = make_tar({"deep/c.dcm": b"C"}, mode="w")
    item = InputItem(0, "x.tar.gz", data=make_tar({"a/one.dcm": b"1", "a/two.dcm": b"2", "in.tar": inner}))
    dest = tmp_path / "in"
    files = {p.relative_to(dest).as_posix(): p for p in unpack(item, dest).files}
    assert sorted(files) == ["a/one.dcm", "a/two.dcm", "in.tar.d/deep/c.dcm"]
    files["a/two.dcm"].write_bytes(b"being read by another case")
    for name in ("a/one.dcm", "in.tar.d/deep/c.dcm"):
        files[name].unlink()
    restore_files(item, dest, [files["a/one.dcm"], files["in.tar.d/deep/c.dcm"]], tmp_path / "scratch")
    assert files["a/one.dcm"].read_bytes() == b"1" and files["in.tar.d/deep/c.dcm"].read_bytes() == b"C"
    assert files["a/two.dcm"].read_bytes() == b"being read by another case"
    assert not (tmp_path / "scratch").exists()
    with pytest.raises(FileNotFoundError, match="no longer holds"):
        restore_files(item, dest, [dest / "a" / "three.dcm"], tmp_path / "scratch")
    assert not (tmp_path / "scratch").exists()


def test_non_archive_bytes_are_written_under_a_sanitised_name(tmp_path: Path) -> None:
    result = unpack(InputItem(0, "../../up/scan.nii.gz", data=b"not a tar"), tmp_path / "in")
    assert result.kind == "file"
    assert result.files == [tmp_path / "in" / "up" / "scan.nii.gz"]
    assert result.files[0].read_bytes() == b"not a tar"


def test_local_files_are_used_in_place(tmp_path: Path) -> None:
    source = tmp_path / "scan.bin"
    source.write_bytes(b"payload")
    result = unpack(InputItem(0, "scan.bin", path=source), tmp_path / "in")
    assert result.files == [source]
    assert not (tmp_path / "in").exists()


def _tar_with(members: list[tarfile.TarInfo]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buffer.getvalue()


def test_nothing_is_written_outside_the_input_folder(tmp_path: Path) -> None:
    traversal = tarfile.TarInfo("../../escaped.txt")
    traversal.size = 1
    absolute = tarfile.TarInfo(str(tmp_path / "absolute.txt"))
    absolute.size = 1
    link = tarfile.TarInfo("link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    fine = tarfile.TarInfo("ok/fine.txt")
    fine.size = 1
    dest = tmp_path / "work" / "in"
    result = unpack(InputItem(0, "evil.tar", data=_tar_with([traversal, absolute, link, fine])), dest)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    # The data filter strips the leading '/' of absolute names and keeps them inside.
    assert written == ["work/in/ok/fine.txt", f"work/in/{str(tmp_path).lstrip('/')}/absolute.txt"]
    reasons = {s.path: s.reason for s in result.skipped}
    assert "refused by the tar data filter" in reasons["../../escaped.txt"]
    assert reasons["link"].startswith(("refused", "links and special files"))


def test_a_truncated_archive_fails_and_leaves_nothing(tmp_path: Path) -> None:
    data = make_tar({f"f{i}.bin": bytes(range(256)) * 64 for i in range(8)}, mode="w:gz")
    dest = tmp_path / "in"
    result = unpack(InputItem(0, "cut.tar.gz", data=data[: len(data) // 2]), dest)
    assert result.error is not None and "archive could not be read" in result.error
    assert not dest.exists()


def test_empty_input_is_an_error(tmp_path: Path) -> None:
    result = unpack(InputItem(0, "empty", data=b""), tmp_path / "in")
    assert result.error == "empty input (0 bytes)"


def test_a_truncated_compressed_file_is_an_input_error(tmp_path: Path) -> None:
    import gzip
    import random

    payload = random.Random(0).randbytes(10_000)
    result = unpack(InputItem(0, "scan.nii.gz", data=gzip.compress(payload)[:5_000]), tmp_path / "in")
    assert result.error is not None and result.error.startswith("compressed input is truncated or corrupt")
    intact = unpack(InputItem(1, "scan.nii.gz", data=gzip.compress(payload)), tmp_path / "in2")
    assert intact.error is None and intact.kind == "file"


@pytest.mark.parametrize("head", [b"\x1f\x8b", b"\x1f\x8b\x08", b"BZh", b"\xfd7zXZ"])
def test_a_compressed_stub_is_an_input_error_not_an_exception(tmp_path: Path, head: bytes) -> None:
    """tarfile raises EOFError (not ReadError) on a gzip of two bytes: the input fails, the request goes on."""
    unpacked = unpack(InputItem(0, "stub", data=head), tmp_path / "in")
    assert unpacked.error == "compressed input is truncated or corrupt: EOFError"
    assert unpacked.files == []


def test_a_name_that_says_tar_on_bytes_that_are_none_is_an_input_error(tmp_path: Path) -> None:
    unpacked = unpack(InputItem(0, "study.tar", data=b"plain text, not an archive"), tmp_path / "in")
    assert unpacked.error == "not a TAR archive, though its name says so: it cannot be read"
    assert unpack(InputItem(1, "notes.txt", data=b"plain text"), tmp_path / "in2").error is None


def _tar_of(members: list[tuple[str, bytes]]) -> bytes:
    """A plain TAR of (name, bytes) members, in order; a name may repeat."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_withheld_members_are_not_written_yet_scan_and_restore_as_written_ones(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    phantom = make_phantom(rng, (4, 16, 16))
    slices = [dicom_bytes(ds) for ds in dicom_series_datasets(phantom)]
    volume = nifti_bytes(phantom.image, phantom.spacing, phantom.origin)
    limit = max(len(volume), *map(len, slices))
    members = [
        ("s/0.dcm", slices[0]),
        ("s/1.dcm", slices[1]),
        ("v.nii.gz", volume),
        ("cut.nii", gzip.decompress(volume)[:400]),  # truncated: skipped with its reason
        ("notes.txt", b"neither"),
        ("s/2.dcm", slices[2]),  # not known: written
        ("big.bin", b"x" * (limit + 1)),  # known, but over max_bytes: written
    ]
    item = InputItem(0, "study.tar", data=_tar_of(members))
    known = frozenset(hashlib.sha256(data).hexdigest() for name, data in members if name != "s/2.dcm")
    withhold = Withhold(known, functools.partial(classify, max_file_bytes=1 << 30), max_bytes=limit)

    plain = unpack(item, tmp_path / "plain")
    held = unpack(item, tmp_path / "held", withhold=withhold)
    relative = {p.relative_to(tmp_path / "held").as_posix() for p in held.withheld}
    assert relative == {"s/0.dcm", "s/1.dcm", "v.nii.gz", "cut.nii", "notes.txt"}
    on_disk = sorted(
        p.relative_to(tmp_path / "held").as_posix() for p in (tmp_path / "held").rglob("*") if p.is_file()
    )
    assert on_disk == ["big.bin", "s/2.dcm"]
    assert held.bytes_written == len(slices[2]) + limit + 1
    assert held.bytes_withheld == sum(len(d) for name, d in members) - held.bytes_written
    # What scan finds is the same, file for file, whether a member was written or withheld.
    assert [p.relative_to(tmp_path / "held") for p in held.files] == [
        p.relative_to(tmp_path / "plain") for p in plain.files
    ]
    assert {p.relative_to(tmp_path / "held"): h for p, h in held.hashes.items()} == {
        p.relative_to(tmp_path / "plain"): h for p, h in plain.hashes.items()
    }

    def summary(result: UnpackedInput) -> tuple:
        found = scan(result)
        rel = lambda p: p.relative_to(result.root).as_posix()  # noqa: E731
        return (
            sorted((rel(i.path), replace(i, path=Path())) for i in found.dicom),
            sorted(map(rel, found.nifti)),
            sorted((s.path, s.reason) for s in found.skipped),
        )

    assert summary(held) == summary(plain)
    assert "NIfTI is truncated" in dict(summary(held)[2])["cut.nii"]
    # A case that needs a withheld file gets it back, byte for byte.
    restore_files(item, tmp_path / "held", list(held.withheld), tmp_path / "scratch")
    for path in held.withheld:
        assert path.read_bytes() == (tmp_path / "plain" / path.relative_to(tmp_path / "held")).read_bytes()


def test_withholding_follows_the_last_member_of_a_repeated_name_and_keeps_a_broken_archives_series(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    datasets = dicom_series_datasets(make_phantom(rng, (2, 16, 16)))
    known, other = dicom_bytes(datasets[0]), dicom_bytes(datasets[1])
    withhold = Withhold(frozenset({hashlib.sha256(known).hexdigest()}), functools.partial(classify))

    written_last = unpack(
        InputItem(0, "a.tar", data=_tar_of([("x.dcm", known), ("x.dcm", other)])),
        tmp_path / "a",
        withhold=withhold,
    )
    assert not written_last.withheld and (tmp_path / "a" / "x.dcm").read_bytes() == other
    withheld_last = unpack(
        InputItem(1, "b.tar", data=_tar_of([("x.dcm", other), ("x.dcm", known)])),
        tmp_path / "b",
        withhold=withhold,
    )
    assert (
        list(withheld_last.withheld) == [tmp_path / "b" / "x.dcm"] and not (tmp_path / "b" / "x.dcm").exists()
    )
    assert withheld_last.files == [tmp_path / "b" / "x.dcm"]
    assert withheld_last.hashes[tmp_path / "b" / "x.dcm"] == hashlib.sha256(known).hexdigest()

    # An archive that breaks after a withheld member: its series is still named as broken.
    whole = make_tar({"first.dcm": known, "filler.bin": rng.bytes(200_000)}, mode="w:gz")
    broken = unpack(
        InputItem(2, "cut.tar.gz", data=whole[: len(whole) // 2]), tmp_path / "c", withhold=withhold
    )
    assert broken.error is not None and broken.broken_series == {str(datasets[0].SeriesInstanceUID)}

    # A single file held in memory is withheld too.
    single = unpack(InputItem(3, "one.dcm", data=known), tmp_path / "d", withhold=withhold)
    assert single.files == [tmp_path / "d" / "one.dcm"] and not single.files[0].exists()
    assert single.withheld[single.files[0]].kind == "dicom" and single.bytes_written == 0


def test_a_member_that_opens_as_a_tar_with_no_members_is_kept_and_accounted_for(tmp_path: Path) -> None:
    empty_tar = io.BytesIO()
    tarfile.open(fileobj=empty_tar, mode="w").close()
    members = {
        "zeros.bin": bytes(4096),
        "empty.tar": empty_tar.getvalue(),
        "inner.tar": make_tar({"a.txt": b"a"}),
    }
    result = unpack(InputItem(0, "x.tar", data=make_tar(members, mode="w")), tmp_path / "in")
    assert sorted(result.relative(p) for p in result.files) == ["empty.tar", "inner.tar.d/a.txt", "zeros.bin"]
    reasons = {s.path: s.reason for s in scan(result).skipped}
    assert reasons == dict.fromkeys(
        ["empty.tar", "inner.tar.d/a.txt", "zeros.bin"], "neither DICOM nor NIfTI"
    )

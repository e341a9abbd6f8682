from __future__ import annotations

import bz2
import io
import lzma
import tarfile
from pathlib import Path

import pytest
from helpers import make_tar

from asyncflow.inputs import InputItem, RequestError, request_items, restore_files, sanitise_relpath, unpack


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

"""Hostile and messy input: every input accounted for, nothing written where it must not be."""

from __future__ import annotations

import gzip
import io
import logging
import struct
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import dicom_bytes, make_tar
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from asyncflow import run_request
from asyncflow.case import Case
from asyncflow.cli.synthetic import dicom_series_datasets, dicom_series_tar, make_phantom, nifti_bytes
from asyncflow.enums import SourceKind
from asyncflow.log import configure_logging
from asyncflow.reading.archives import ArchiveLimits, unpack
from asyncflow.reading.assemble import CaseBuilder
from asyncflow.reading.prepare import prepare_case
from asyncflow.reading.request import InputItem, request_items
from asyncflow.reading.scan import scan


def _member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def _tar(*members: tuple, mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_links_devices_and_fifos_are_not_extracted(tmp_path: Path) -> None:
    data = _tar(
        _member("ok/a.bin", b"a"),
        _member("sym-out", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        _member("sym-in", kind=tarfile.SYMTYPE, link="ok/a.bin"),
        _member("hard", kind=tarfile.LNKTYPE, link="ok/a.bin"),
        _member("device", kind=tarfile.CHRTYPE),
        _member("fifo", kind=tarfile.FIFOTYPE),
    )
    result = unpack(InputItem(0, "links.tar", data=data), tmp_path / "work" / "in")
    assert _files_under(tmp_path) == ["work/in/ok/a.bin"]
    reasons = {s.path: s.reason for s in result.skipped}
    assert set(reasons) == {"sym-out", "sym-in", "hard", "device", "fifo"}
    assert all(
        r.startswith(("refused by the tar data filter", "links and special files")) for r in reasons.values()
    )


@pytest.mark.parametrize(
    ("members", "limits", "reason"),
    [
        ([("zeros", bytes(2_000_000))], ArchiveLimits(max_ratio=10, ratio_floor_bytes=0), "an archive bomb"),
        ([("big", bytes(5_000))], ArchiveLimits(max_bytes=4_000), "expands to more than"),
        ([("big", bytes(5_000))], ArchiveLimits(max_file_bytes=1_000), "member of"),
        ([(f"m{i}", b"x") for i in range(20)], ArchiveLimits(max_members=10), "more than 10 members"),
    ],
    ids=["ratio", "total", "one-member", "members"],
)
def test_archive_limits_refuse_the_whole_input(
    tmp_path: Path, members, limits: ArchiveLimits, reason: str
) -> None:
    data = _tar(*(_member(name, payload) for name, payload in members), mode="w:gz")
    dest = tmp_path / "in"
    result = unpack(InputItem(0, "bomb.tar.gz", data=data), dest, limits)
    assert result.error is not None and result.error.startswith("archive refused") and reason in result.error
    assert not dest.exists()


def test_nested_archives_are_unpacked_to_the_configured_depth(tmp_path: Path) -> None:
    innermost = _tar(_member("deep/c.bin", b"c"))
    inner = _tar(_member("b.bin", b"b"), _member("level3.tar", innermost), mode="w:gz")
    outer = _tar(_member("a.bin", b"a"), _member("sub/level2.tar.gz", inner))
    result = unpack(InputItem(0, "outer.tar", data=outer), tmp_path / "in")
    assert result.error is None
    assert _files_under(tmp_path / "in") == ["a.bin", "sub/level2.tar.gz.d/b.bin"]
    assert [(s.path, s.reason) for s in result.skipped] == [
        ("sub/level2.tar.gz/level3.tar", "archive nested deeper than 2 levels")
    ]
    deeper = unpack(InputItem(0, "outer.tar", data=outer), tmp_path / "in3", ArchiveLimits(max_depth=3))
    assert "sub/level2.tar.gz.d/level3.tar.d/deep/c.bin" in _files_under(tmp_path / "in3")
    assert deeper.skipped == []


def test_odd_member_names_are_tamed(tmp_path: Path) -> None:
    long_name = "x" * 300 + ".dcm"
    undecodable = b"caf\xe9/\xff\xfe.bin".decode("utf-8", "surrogateescape")
    data = _tar(
        _member(long_name, b"1"), _member(undecodable, b"2"), _member("same", b"old"), _member("same", b"new")
    )
    result = unpack(InputItem(0, "odd.tar", data=data), tmp_path / "in")
    assert result.error is None
    files = _files_under(tmp_path / "in")
    assert all(len(part) <= 120 for f in files for part in f.split("/"))
    assert len(files) == 3 and (tmp_path / "in" / "same").read_bytes() == b"new"


def test_the_same_file_name_in_several_archives_stays_apart(tmp_path: Path, rng: np.random.Generator) -> None:
    phantoms = [make_phantom(rng, (4, 8, 8)) for _ in range(2)]
    archives = [
        make_tar({"DICOM/IM1": dicom_bytes(dicom_series_datasets(p, series_number=n)[0])})
        for n, p in enumerate(phantoms)
    ]
    builder = CaseBuilder()
    for item in request_items([{"a.tar": archives[0]}, {"b.tar": archives[1]}]):
        builder.add(scan(unpack(item, tmp_path / str(item.index))))
    assert builder.finish() == []  # two series of one slice each: skipped, but both seen
    assert sorted(s.origin.name for s in builder.skipped) == ["a.tar", "b.tar"]


def _nifti_header(dims: tuple[int, ...]) -> bytes:
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", header, 70, 4, 16)  # int16
    struct.pack_into("<f", header, 108, 352)
    header[344:348] = b"n+1\0"
    return bytes(header)


def test_a_nifti_declaring_a_huge_volume_is_not_read(tmp_path: Path) -> None:
    bomb = gzip.compress(_nifti_header((30000, 30000, 30000)) + bytes(1000))
    unpacked = unpack(InputItem(0, "bomb.nii.gz", data=bomb), tmp_path / "in")
    scanned = scan(unpacked)
    assert scanned.nifti == []
    assert scanned.skipped[0].reason == "NIfTI declares 50291.4 GiB of voxels, over the 16.0 GiB limit"


NON_IMAGES = {
    "DICOMDIR": "1.2.840.10008.1.3.10",
    "SR": "1.2.840.10008.5.1.4.1.1.88.33",
    "presentation state": "1.2.840.10008.5.1.4.1.1.11.1",
    "RTSTRUCT": "1.2.840.10008.5.1.4.1.1.481.3",
    "SEG": "1.2.840.10008.5.1.4.1.1.66.4",
}


@pytest.mark.parametrize("kind", list(NON_IMAGES))
def test_non_image_dicom_objects_are_skipped_with_their_class(tmp_path: Path, kind: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = NON_IMAGES[kind]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    name = "DICOMDIR" if kind == "DICOMDIR" else "obj"
    unpacked = unpack(InputItem(0, name, data=dicom_bytes(ds)), tmp_path / "in")
    (skipped,) = scan(unpacked).skipped
    assert skipped.reason.startswith("not an image storage class (")
    assert pydicom.uid.UID(NON_IMAGES[kind]).name in skipped.reason


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_compressed_series_are_read_exactly(tmp_path: Path, rng: np.random.Generator, syntax) -> None:
    phantom = make_phantom(rng, (6, 40, 40))
    folder = tmp_path / "series"
    folder.mkdir()
    for k, ds in enumerate(dicom_series_datasets(phantom)):
        ds.compress(syntax)
        (folder / f"f{k}").write_bytes(dicom_bytes(ds))
    builder = CaseBuilder()
    for item in request_items([folder]):
        builder.add(scan(unpack(item, tmp_path / "u")))
    (case,) = builder.finish()
    prepared = prepare_case(case, tmp_path / "work")
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(prepared.channel_files[0])))
    np.testing.assert_array_equal(image, phantom.image)


def test_nifti_that_is_not_a_3d_volume_fails_with_a_reason(tmp_path: Path, rng: np.random.Generator) -> None:
    four_d = tmp_path / "4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))] * 2), str(four_d))
    unreadable = tmp_path / "unreadable.nii"
    header = bytearray(_nifti_header((5, 4, 3)))
    struct.pack_into("<hh", header, 70, 0, 16)  # datatype 0: unknown
    unreadable.write_bytes(bytes(header) + bytes(120))
    for path, message in [(four_d, "is 4D; a 3D volume is needed"), (unreadable, "cannot be read")]:
        case = Case("case-0001", SourceKind.NIFTI, "x", path.name, [path])
        with pytest.raises(ValueError, match=message):
            prepare_case(case, tmp_path / "work" / path.stem)


def test_a_truncated_nifti_is_skipped_not_read_as_a_volume(tmp_path: Path, rng: np.random.Generator) -> None:
    # A valid gzip of a cut NIfTI: SimpleITK would read it, with made-up voxels.
    phantom = make_phantom(rng, (4, 8, 8))
    whole = gzip.decompress(nifti_bytes(phantom.image, (1, 1, 1), (0, 0, 0)))
    for name, data in [("cut.nii.gz", gzip.compress(whole[:400])), ("cut.nii", whole[:400])]:
        scanned = scan(unpack(InputItem(0, name, data=data), tmp_path / name))
        assert scanned.nifti == []
        assert scanned.skipped[0].reason == f"NIfTI is truncated: 400 bytes, its header declares {len(whole)}"
    intact = scan(unpack(InputItem(0, "whole.nii.gz", data=gzip.compress(whole)), tmp_path / "whole"))
    assert len(intact.nifti) == 1 and intact.skipped == []


@pytest.mark.anyio
@pytest.mark.parametrize("json_logs", [True, False], ids=["json", "console"])
async def test_no_patient_data_or_file_names_in_the_logs(
    tmp_path: Path, settings_factory, loaded_backend, rng: np.random.Generator, json_logs: bool
) -> None:
    name, patient_id, birth = "Zzyzx^Quentin", "PHI-777123", "19121231"
    good = dicom_series_datasets(make_phantom(rng, (16, 24, 24)), patient_name=name, patient_id=patient_id)
    tilted = dicom_series_datasets(
        make_phantom(rng, (16, 24, 24)), patient_name=name, patient_id=patient_id, slice_shift=(0, 0.8, 0)
    )
    other = dicom_series_datasets(make_phantom(rng, (4, 24, 24)), patient_name=name, patient_id=patient_id)
    for ds in good + tilted + other:
        ds.PatientBirthDate = birth
    phi_file = "Zzyzx_Quentin_19121231"
    entries = [
        {f"exports/{phi_file}.tar": dicom_series_tar([good, tilted])},
        {f"exports/{phi_file}_broken.tar.gz": dicom_series_tar([other])[:3000]},
        {f"exports/{phi_file}.txt": b"referral letter"},
    ]
    logs = io.StringIO()
    configure_logging(json=json_logs, stream=logs)
    logging.getLogger("highdicom").warning(f"cannot read /data/{phi_file}/1.dcm")  # a library's message
    result = await run_request(entries, settings_factory(tmp_path / "work"), backend=loaded_backend)
    assert [c.status for c in result.cases] == ["done", "failed"]
    assert any(i["error"] for i in result.inputs) and result.skipped
    text = logs.getvalue()
    assert "case.failed" in text and "input.failed" in text and "library.logged" in text
    for secret in ("Zzyzx", "Quentin", patient_id, birth, "exports"):
        assert secret not in text


def test_a_series_split_over_two_archives_is_merged_or_refused_never_partial(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    series = dicom_series_datasets(make_phantom(rng, (20, 16, 16)))
    first = make_tar({f"a/{k}": dicom_bytes(ds) for k, ds in enumerate(series[:10])}, mode="w")
    second = make_tar({f"b/{k}": dicom_bytes(ds) for k, ds in enumerate(series[10:])}, mode="w:gz")

    def assemble(archives: list[bytes]) -> tuple[CaseBuilder, list]:
        builder, cases = CaseBuilder(), []
        for n, data in enumerate(archives):
            unpacked = unpack(
                InputItem(n, f"part{n}.tar", data=data), tmp_path / f"{len(archives)}-{n}-{data[:2].hex()}"
            )
            if unpacked.error:
                builder.broken(unpacked)
            else:
                cases += builder.add(scan(unpacked))
        cases += builder.finish()
        return builder, [c for c in cases if c not in builder.withdrawn]

    _, whole = assemble([first, second])
    assert [len(case.instances) for case in whole] == [20]
    cut, kept = assemble([first, second[: int(len(second) * 0.7)]])  # the second archive breaks midway
    assert kept == [] and len(cut.withdrawn) == 1  # the first half's case is withdrawn, not returned
    assert len(cut.skipped) == 10
    assert {s.reason for s in cut.skipped} == {
        "part of this series was in input 1, which could not be read: not segmented as a partial volume"
    }

"""Real DICOM and NIfTI that installed packages ship, not data this project wrote.

pydicom's test files hold real CT, MR and CR exports of three patients with
their DICOMDIR files: an axial CT series beside its two scouts (LOCALIZER), a CT
series with a gap, multi-plane MR localizers, radial MIPs, single images.
nibabel's test data holds real NIfTI-1 volumes whose qform/sform codes say
"aligned" (2), one big-endian. Every request here must end with its report, a
reason for every file that became no case, and exit codes as docs/reference/exit-codes.md says.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import DCIODVFY_MISSING, dciodvfy_lines, make_tar

from asyncflow.cli import main

FAST = ["--no-mirroring", "--threads", "1", "--device", "cpu"]
PYDICOM_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
DICOMDIR_TESTS = PYDICOM_FILES / "dicomdirtests"
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
# One patient's CT study as a PACS exports it: two scouts, an axial series, the DICOMDIR.
STUDY = DICOMDIR_TESTS / "98892001"
AXIAL_UID = pydicom.dcmread(STUDY / "CT5N" / "2062").SeriesInstanceUID


def _archive(members: dict[str, Path | bytes]) -> bytes:
    """An uncompressed TAR of files on disk and bytes."""
    return make_tar({n: m.read_bytes() if isinstance(m, Path) else m for n, m in members.items()}, mode="w")


def _tree(folder: Path, prefix: str) -> dict[str, Path | bytes]:
    return {
        f"{prefix}/{p.relative_to(folder).as_posix()}": p for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _run(tmp_path: Path, model_dir: Path, inputs: dict[str, bytes]) -> tuple[int, dict, Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in inputs.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "out"
    code = main(["run", *(str(folder / n) for n in inputs), "-o", str(out), "--model", str(model_dir), *FAST])
    return code, json.loads((out / "report.json").read_text()), out


@pytest.mark.skipif(DCIODVFY_MISSING, reason="dicom3tools (dciodvfy) is not installed")
def test_a_whole_study_export_gives_a_seg_per_volume_and_a_reason_for_everything_else(
    tmp_path: Path, model_dir: Path
) -> None:
    members = _tree(STUDY, "export/98892001") | {
        "export/DICOMDIR": DICOMDIR_TESTS / "DICOMDIR",
        "export/SR/1": PYDICOM_FILES / "test-SR.dcm",
    }
    code, report, out = _run(tmp_path, model_dir, {"study.tar": _archive(members)})
    assert code == 0 and report["status"] == "done" and report["error"] is None
    (case,) = report["cases"]
    assert case["status"] == "done"
    # The case names its series without patient data, and where it lies in the archive.
    assert case["series_instance_uid"] == AXIAL_UID
    assert (case["series_number"], case["modality"], case["files"]) == (5, "CT", 5)
    assert case["location"] == "export/98892001/CT5N" and case["origin"] == "study.tar"
    reasons = {s["path"]: s["reason"] for s in report["skipped_files"]}
    assert reasons == {
        "export/98892001/CT2N/6293": "localizer (ImageType LOCALIZER)",
        "export/98892001/CT2N/6924": "localizer (ImageType LOCALIZER)",
        "export/DICOMDIR": "not an image storage class (no SOPClassUID)",
        "export/SR/1": "not an image storage class (Comprehensive SR Storage)",
    }
    seg_path = out / "dicom_seg" / case["output"]
    seg = hd.seg.segread(seg_path)
    sources = {pydicom.dcmread(p).SOPInstanceUID: p for p in (STUDY / "CT5N").iterdir()}
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced <= set(sources) and referenced
    assert (
        seg.SeriesInstanceUID != AXIAL_UID
        and seg.StudyInstanceUID == pydicom.dcmread(STUDY / "CT5N" / "2062").StudyInstanceUID
    )
    # Old real headers carry their own findings; the SEG may add none.
    source_findings = set().union(*(set(dciodvfy_lines(p)) for p in sources.values()))
    assert any("Laterality" in line for line in source_findings)  # the validator does report
    assert set(dciodvfy_lines(seg_path)) - source_findings == set()


def test_every_file_of_the_pydicom_corpus_is_a_case_or_a_reason(tmp_path: Path, model_dir: Path) -> None:
    """Three patients, DICOMDIRs, CR, multi-plane MR localizers, MIPs, a CT series with a gap,
    single files of many encodings: nothing crashes, nothing is lost, every failure is its own."""
    corpus = _tree(DICOMDIR_TESTS, "dicomdirtests") | {
        f"single/{p.name}": p for p in sorted(PYDICOM_FILES.glob("*.dcm"))
    }
    code, report, _ = _run(tmp_path, model_dir, {"corpus.tar": _archive(corpus)})
    assert code == 1 and report["status"] == "partial"
    by_location = {c["location"]: c for c in report["cases"]}
    assert by_location["dicomdirtests/98892001/CT5N"]["status"] == "done"
    gap = by_location["dicomdirtests/77654033/CT2"]
    assert gap["status"] == "failed" and "non-uniform slice spacing" in gap["error"]
    assert "gaps from 1.25 to 202 mm" in gap["error"]
    # Every member is accounted for exactly once: in a case or skipped with its reason.
    reasons = {s["path"]: s["reason"] for s in report["skipped_files"]}
    assert len(reasons) == len(report["skipped_files"])
    in_cases: dict[str, int] = {}
    for case in report["cases"]:  # a series names its folder, a multi-frame image its file
        in_cases[case["location"]] = in_cases.get(case["location"], 0) + case["files"]
    for where, files in in_cases.items():
        assert files == sum(1 for m in corpus if where in (m, m.rsplit("/", 1)[0]) and m not in reasons)
    assert set(reasons) <= set(corpus)
    assert sum(in_cases.values()) + len(reasons) == len(corpus)
    assert all(reasons.values())
    multi_plane = [p for p in reasons if p.startswith("dicomdirtests/98892003/MR2/")]
    assert len(multi_plane) == 7 and all("not a volume" in reasons[p] for p in multi_plane)
    assert all("projection image" in reasons[p] for p in reasons if "/MR700/" in p)


def test_a_series_of_scouts_alone_ends_with_the_report_and_exit_2(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, out = _run(tmp_path, model_dir, {"scouts.tar": _archive(_tree(STUDY / "CT2N", "CT2N"))})
    assert code == 2
    assert report["status"] == "error" and "no usable case" in report["error"]
    assert report["cases"] == []
    assert {s["reason"] for s in report["skipped_files"]} == {"localizer (ImageType LOCALIZER)"}
    assert "Traceback" not in capsys.readouterr().err
    assert not (out / "dicom_seg").exists()


def test_unreadable_and_refused_inputs_make_the_request_partial(tmp_path: Path, model_dir: Path) -> None:
    good = _archive(_tree(STUDY / "CT5N", "CT5N"))
    traversal = io.BytesIO()
    with tarfile.open(fileobj=traversal, mode="w") as tar:
        info = tarfile.TarInfo("../../etc/evil")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    inputs = {
        "good.tar": good,
        "garbage.tar": b"this is not an archive at all" * 10,
        "truncated.tar": (lambda t: t[: len(t) // 2])(
            _archive(_tree(DICOMDIR_TESTS / "77654033" / "CT2", "CT2"))
        ),
        "traversal.tar": traversal.getvalue(),
    }
    code, report, _ = _run(tmp_path, model_dir, inputs)
    assert code == 1 and report["status"] == "partial"
    assert [c["status"] for c in report["cases"]] == ["done"]
    errors = {Path(i["name"]).name: i["error"] for i in report["inputs"]}
    assert errors["garbage.tar"] == "not a TAR archive, though its name says so: it cannot be read"
    assert errors["truncated.tar"].startswith("archive could not be read")
    assert errors["good.tar"] is None and errors["traversal.tar"] is None
    (refused,) = [s for s in report["skipped_files"] if s["refused"]]
    assert refused["path"] == "../../etc/evil"


def test_the_same_image_twice_is_one_slice_and_the_copy_is_named(tmp_path: Path, model_dir: Path) -> None:
    members = _tree(STUDY / "CT5N", "a") | {"b/copy": STUDY / "CT5N" / "2392"}
    code, report, _ = _run(tmp_path, model_dir, {"twice.tar": _archive(members)})
    assert code == 0 and report["cases"][0]["files"] == 5
    (duplicate,) = report["skipped_files"]
    assert duplicate == {
        "origin": "twice.tar",
        "input": 0,
        "path": "b/copy",
        "reason": "same SOPInstanceUID as another file, which was kept (see kept)",
        "refused": False,
        "kept": {"origin": "twice.tar", "input": 0, "path": "a/2392"},
    }


def _nifti2(source: Path) -> bytes:
    image = nibabel.load(source)
    return nibabel.Nifti2Image.from_image(image).to_bytes()


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("anatomical.nii", lambda p: p.read_bytes()),  # big-endian, codes 2/2
        ("standard.nii.gz", lambda p: p.read_bytes()),  # qform_code 0, sform_code 2
        ("anatomical_nifti2.nii", lambda p: _nifti2(NIBABEL_DATA / "anatomical.nii")),
    ],
)
def test_real_nifti_keeps_its_grid_and_its_xform_codes(
    tmp_path: Path, model_dir: Path, name: str, make: object
) -> None:
    source = NIBABEL_DATA / name
    data = make(source)  # type: ignore[operator]
    code, report, out = _run(tmp_path, model_dir, {name: data})
    assert code == 0, report
    (case,) = report["cases"]
    assert case["location"] == name and case["files"] == 1
    output = nibabel.load(out / "nifti_seg" / case["output"])
    original = nibabel.load(tmp_path / "in" / name)
    assert output.shape == original.shape[:3]
    for code_name in ("qform_code", "sform_code"):
        assert int(output.header[code_name]) == int(original.header[code_name])
    np.testing.assert_allclose(output.affine, original.affine, atol=1e-4)
    # SimpleITK, which nnU-Net reads with, sees the output on the source's grid.
    read = sitk.ReadImage(str(out / "nifti_seg" / case["output"]))
    assert read.GetSize() == original.shape[:3]


def test_a_4d_nifti2_fails_alone_with_a_reason_and_its_path(tmp_path: Path, model_dir: Path) -> None:
    nifti = (NIBABEL_DATA / "anatomical.nii").read_bytes()
    tar = _archive(
        {"vols/a.nii": nifti, "vols/example_nifti2.nii.gz": NIBABEL_DATA / "example_nifti2.nii.gz"}
    )
    code, report, _ = _run(tmp_path, model_dir, {"mixed.tar": tar})
    assert code == 1
    failed = next(c for c in report["cases"] if c["status"] == "failed")
    assert failed["location"] == "vols/example_nifti2.nii.gz"
    assert "NIfTI channel 0 is 4D; a 3D volume is needed" in failed["error"]

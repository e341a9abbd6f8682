"""Every scanner's series shape: 4D series split into volumes, enhanced multi-frame 4D images,
Siemens mosaics and gantry-tilted CT.

Built from real files that installed packages ship (pydicom's CT series, nibabel's Philips
enhanced MR and Siemens DWI mosaics), their headers changed where a shape is made; dcm2niix
(Debian) is the reference for each volume's grid and voxels; the SEGs are read back by
highdicom and dcmqi and validated by dciodvfy.
"""

from __future__ import annotations

import copy
import gzip
import io
import os
import shutil
import subprocess
from pathlib import Path

import anyio
import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import dciodvfy_findings, dcmqi_meta, dice, dicom_bytes, make_tar
from pydicom.dataset import Dataset, FileDataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from asyncflow import Result, run_request
from asyncflow.case import Geometry
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.errors import SettingsError
from asyncflow.reading.archives import unpack
from asyncflow.reading.assemble import CaseBuilder
from asyncflow.reading.prepare import prepare_case
from asyncflow.reading.request import InputItem
from asyncflow.reading.scan import scan
from asyncflow.settings import Settings
from asyncflow.testing import FakeBackend, image_array
from asyncflow.writing.planes import decode_on_grid
from asyncflow.writing.seg import read_dicom_seg

PYDICOM_CT = Path(pydicom.data.get_testdata_file("DICOMDIR")).parent / "98892001" / "CT5N"  # type: ignore[arg-type]
NICOM = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
DCM2NIIX = shutil.which("dcm2niix")
# CI installs it (.ci/run): there, a missing dcm2niix fails these tests.
needs_dcm2niix = pytest.mark.skipif(
    DCM2NIIX is None and not os.environ.get("CI"), reason="dcm2niix (Debian) is not installed"
)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ct_slices() -> list[FileDataset]:
    """pydicom's real CT series: 5 axial 16x16 slices, 2.5 mm apart, AcquisitionNumber 1, 1, 1, 2, 2."""
    return [pydicom.dcmread(path) for path in sorted(PYDICOM_CT.iterdir())]


def _copy(ds: FileDataset, offset: int = 0) -> FileDataset:
    """Another image of the same series: a new SOPInstanceUID, its pixels raised by ``offset``."""
    again = copy.deepcopy(ds)
    again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    again.PixelData = (ds.pixel_array + offset).astype(ds.pixel_array.dtype).tobytes()
    return again


def _four_d(
    attributes: list[dict[str, object]], per_position: dict[str, float] | None = None
) -> list[FileDataset]:
    """The real CT series k times in one series, volume v's images with ``attributes[v]`` (and,
    for times, ``per_position[keyword]`` more at each next position), pixels raised by 100 * v."""
    images = []
    for volume, values in enumerate(attributes):
        for position, ds in enumerate(_ct_slices()):
            image = _copy(ds, 100 * volume)
            image.InstanceNumber = volume * 5 + position + 1
            for keyword, value in values.items():
                step = (per_position or {}).get(keyword, 0.0)
                setattr(image, keyword, f"{float(value) + step * position:.3f}" if step else value)
            images.append(image)
    return images


def _cases(tmp_path: Path, datasets: list[FileDataset], volumes: str = "all"):
    from asyncflow.reading.volumes import parse_choice

    tar = make_tar({f"s/{k:03d}": dicom_bytes(ds) for k, ds in enumerate(datasets)})
    builder = CaseBuilder(volumes=parse_choice(volumes))
    cases = builder.add(scan(unpack(InputItem(0, "study.tar", data=tar), tmp_path / "in")))
    cases += builder.finish()
    return [c for c in cases if c not in builder.withdrawn], builder


def _dcm2niix(datasets: list[FileDataset], folder: Path) -> nibabel.Nifti1Image:
    """dcm2niix's one NIfTI of ``datasets`` (the tilt-corrected one, where it writes two)."""
    (folder / "in").mkdir(parents=True)
    (folder / "out").mkdir()
    for k, ds in enumerate(datasets):
        ds.save_as(folder / "in" / f"{k:04d}.dcm")
    subprocess.run(
        ["dcm2niix", "-z", "n", "-f", "v", "-o", folder / "out", folder / "in"],
        check=True,
        capture_output=True,
    )
    written = sorted((folder / "out").glob("*.nii"))
    return nibabel.load(next((p for p in written if "Tilt" in p.name), written[0]))  # type: ignore[return-value]


def _on_dcm2niix_grid(image: sitk.Image, reference: nibabel.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Every voxel of ``image`` must be a voxel of ``reference``'s grid (the same place, whatever
    the axis order and flips): its voxels and ``reference``'s at the same places."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    ours = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (x, y, z), as nibabel indexes
    indices = np.indices(ours.shape).reshape(3, -1)
    places = LPS_TO_RAS @ affine @ np.vstack([indices, np.ones(indices.shape[1])])
    theirs = np.linalg.inv(reference.affine) @ places
    np.testing.assert_allclose(theirs[:3], np.rint(theirs[:3]), atol=1e-3)  # on their grid's voxels
    at = np.rint(theirs[:3]).astype(int)
    assert (at >= 0).all() and (at < np.asarray(reference.shape[:3])[:, None]).all()
    data = np.asanyarray(reference.get_fdata())
    values = data[tuple(at)] if data.ndim == 3 else data[(*at, slice(None))]
    return ours.reshape(-1), values


def _run(tmp_path: Path, members: dict[str, bytes], backend: FakeBackend, **settings: object) -> Result:
    values: dict = {"work_dir": tmp_path / "work", "use_mirroring": False, "device": "cpu", **settings}
    return anyio.run(lambda: run_request([make_tar(members)], Settings(**values), backend=backend))


def _above_median() -> FakeBackend:
    """A backend that calls every voxel above its case's median label 1: no model, but a SEG
    whose frames land in the wrong place shows."""
    return FakeBackend({"tissue": 1}, predict=lambda case: image_array(case) > np.median(image_array(case)))


# -- 4D series of single-frame images ------------------------------------------------------------

SPLITS = {
    "dynamic (TemporalPositionIdentifier)": ([{"TemporalPositionIdentifier": t} for t in (1, 2, 3)], None),
    "cardiac (TriggerTime)": ([{"TriggerTime": t} for t in (0, 350, 700)], {"TriggerTime": 0.5}),
    "diffusion (b-value, gradient)": (
        [
            {"DiffusionBValue": 0},
            {"DiffusionBValue": 1000, "DiffusionGradientOrientation": [0, 1, 0]},  # by value: b, then
            {"DiffusionBValue": 1000, "DiffusionGradientOrientation": [1, 0, 0]},  # the gradient
        ],
        None,
    ),
    "multi-echo (EchoNumbers)": ([{"EchoNumbers": e} for e in (1, 2)], None),
    "multi-phase CT (AcquisitionTime)": (
        [{"AcquisitionTime": t} for t in (101500.0, 102000.0)],
        {"AcquisitionTime": 0.4},
    ),
}


@pytest.mark.parametrize("shape", list(SPLITS))
def test_a_4d_series_splits_into_its_volumes_by_the_attribute_that_tells_them_apart(
    tmp_path: Path, shape: str
) -> None:
    attributes, per_position = SPLITS[shape]
    datasets = _four_d(attributes, per_position)
    cases, builder = _cases(tmp_path, datasets)
    assert builder.skipped == []
    count = len(attributes)
    assert [c.source.part.split(" (")[0] for c in cases] == [
        f"volume {v} of {count}" for v in range(1, count + 1)
    ]
    keyword = next(iter(attributes[1]))
    assert all(f"({keyword} " in c.source.part for c in cases)
    assert sorted(str(i.path) for c in cases for i in c.instances) == sorted(
        str(p) for p in (tmp_path / "in" / "s").iterdir()
    )  # every file in one case, once
    for volume, case in enumerate(cases):
        prepared = prepare_case(case, tmp_path / case.case_id, write_files=False)
        assert prepared.geometry.size == (16, 16, 5)
        slices = _ct_slices()[::-1]  # in slice order, along the normal
        slope, intercept = float(slices[0].RescaleSlope), float(slices[0].RescaleIntercept)
        expected = (
            np.stack([ds.pixel_array for ds in slices]).astype(np.int32) + 100 * volume
        ) * slope + intercept
        np.testing.assert_array_equal(sitk.GetArrayFromImage(prepared.images[0]), expected)


@needs_dcm2niix
def test_each_volume_of_a_4d_series_is_the_volume_dcm2niix_writes(tmp_path: Path) -> None:
    datasets = _four_d([{"TemporalPositionIdentifier": t} for t in (1, 2, 3)])
    reference = _dcm2niix(datasets, tmp_path / "dcm2niix")
    assert reference.shape == (16, 16, 5, 3)
    cases, _ = _cases(tmp_path, datasets)
    for volume, case in enumerate(cases):
        ours, theirs = _on_dcm2niix_grid(
            prepare_case(case, tmp_path / case.case_id, False).images[0], reference
        )
        np.testing.assert_allclose(ours, theirs[:, volume], atol=1e-3)


def test_a_4d_series_that_no_attribute_tells_apart_is_refused_naming_its_shape(tmp_path: Path) -> None:
    datasets = [_copy(ds) for _ in range(3) for ds in _ct_slices()]  # three images at each place, alike
    (case,), _ = _cases(tmp_path, datasets)
    with pytest.raises(ValueError) as refused:
        prepare_case(case, tmp_path / "work", write_files=False)
    assert str(refused.value).startswith(
        "series has 15 images at 5 positions, 3 at each: a 4D series of 3 volumes that no attribute "
        "tells apart (AcquisitionNumber, TemporalPositionIdentifier, TriggerTime"
    )
    assert str(refused.value).endswith("export each volume as a series of its own")


@pytest.mark.parametrize(
    ("volumes", "kept"),
    [("all", [1, 2, 3]), ("first", [1]), ("last", [3]), ("2", [2]), ("TemporalPositionIdentifier=3", [3])],
)
def test_the_volumes_setting_chooses_which_volumes_become_cases_and_lists_the_others(
    tmp_path: Path, volumes: str, kept: list[int]
) -> None:
    datasets = _four_d([{"TemporalPositionIdentifier": t} for t in (1, 2, 3)])
    cases, builder = _cases(tmp_path, datasets, volumes)
    assert [c.source.part for c in cases] == [
        f"volume {v} of 3 (TemporalPositionIdentifier {v})" for v in kept
    ]
    assert [c.output_name for c in cases] == [f"study_p{v}" for v in kept]  # names keep the volume's place
    assert len(builder.skipped) == 5 * (3 - len(kept))
    for skipped in builder.skipped:
        assert skipped.reason.endswith(f": not chosen (volumes={volumes})")
    assert sum(len(c.instances) for c in cases) + len(builder.skipped) == len(datasets)


def test_a_volumes_rule_that_matches_nothing_says_what_tells_the_volumes_apart(tmp_path: Path) -> None:
    datasets = _four_d([{"EchoNumbers": e} for e in (1, 2)])
    cases, builder = _cases(tmp_path, datasets, "DiffusionBValue=0")
    assert cases == []
    assert {s.reason for s in builder.skipped} == {
        f"volume {v} of 2 (EchoNumbers {v}): not chosen (volumes=DiffusionBValue=0): no volume of this "
        "series has DiffusionBValue 0 (told apart by EchoNumbers)"
        for v in (1, 2)
    }


@pytest.mark.parametrize("text", ["some", "0", "=3", "Trigger Time=3"])
def test_a_volumes_setting_that_means_nothing_is_refused_with_what_is_accepted(text: str) -> None:
    with pytest.raises(SettingsError, match="volumes must be all, first, last, a volume's number"):
        Settings(volumes=text)


# -- an enhanced multi-frame 4D image --------------------------------------------------------------


def _enhanced_4d(rng: np.random.Generator, volumes: int = 2, positions: int = 12) -> FileDataset:
    """nibabel's real Philips enhanced MR (176 sagittal frames; its pixels were blanked for
    sharing), cut to ``positions`` middle frames filled with a phantom, and repeated as ``volumes``
    temporal positions: a third dimension (TemporalPositionIndex) in its DimensionIndexSequence,
    each frame's FrameContentSequence saying where it belongs."""
    ds = pydicom.dcmread(io.BytesIO(gzip.decompress((NICOM / "philips_mprage.dcm.gz").read_bytes())))
    items = list(ds.PerFrameFunctionalGroupsSequence)[88 - positions // 2 :][:positions]  # mid-head
    pixels = np.clip(make_phantom(rng, (positions, 256, 256)).image + 1024, 0, 4095).astype(np.uint16)
    frames, planes = [], []
    for volume in range(volumes):
        for k in range(positions):
            item = copy.deepcopy(items[k])
            item.FrameContentSequence[0].TemporalPositionIndex = volume + 1
            item.FrameContentSequence[0].InStackPositionNumber = k + 1
            item.FrameContentSequence[0].DimensionIndexValues = [1, k + 1, volume + 1]
            frames.append(item)
            planes.append(pixels[k] // (volume + 1))  # the volumes differ
    dimension = Dataset()
    dimension.DimensionOrganizationUID = ds.DimensionIndexSequence[0].DimensionOrganizationUID
    dimension.DimensionIndexPointer = Tag("TemporalPositionIndex")
    dimension.FunctionalGroupPointer = Tag("FrameContentSequence")
    ds.DimensionIndexSequence.append(dimension)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.NumberOfFrames = len(frames)
    ds.PixelData = np.stack(planes).tobytes()
    ds[0x2001, 0x1018].value = positions  # Philips' own count of slices, which dcm2niix reads
    return ds


@needs_dcm2niix
def test_an_enhanced_4d_image_gives_a_case_per_volume_on_dcm2niix_grid_with_a_valid_seg(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    enhanced = _enhanced_4d(rng)
    reference = _dcm2niix([enhanced], tmp_path / "dcm2niix")
    assert reference.shape[2:] == (12, 2)
    result = _run(tmp_path, {"mr/enhanced": dicom_bytes(enhanced)}, _above_median())
    report = result.report()
    assert [(c["status"], c["part"], c["files"], c["frames"]) for c in report["cases"]] == [
        ("done", f"volume {v} of 2 (DimensionIndexValues TemporalPositionIndex={v})", 1, 12) for v in (1, 2)
    ]
    assert report["skipped_files"] == []
    builder = CaseBuilder()
    cases = builder.add(
        scan(unpack(InputItem(0, "mr", data=make_tar({"e": dicom_bytes(enhanced)})), tmp_path / "in"))
    )
    for volume, (case, name) in enumerate(zip(cases, ["input-0_p1.dcm", "input-0_p2.dcm"], strict=True)):
        assert case.frames == tuple(range(12 * volume, 12 * volume + 12))
        image = prepare_case(case, tmp_path / case.case_id, write_files=False).images[0]
        ours, theirs = _on_dcm2niix_grid(image, reference)
        np.testing.assert_allclose(
            ours, theirs[:, volume] * (ours.max() / theirs[:, volume].max()), rtol=1e-3
        )
        _check_seg_on_grid(result.dicom_seg_bytes[name], image, tmp_path / name)
        seg = hd.seg.segread(io.BytesIO(result.dicom_seg_bytes[name]))
        source_frames = {
            tuple(
                round(float(v), 3)
                for v in enhanced.PerFrameFunctionalGroupsSequence[k]
                .PlanePositionSequence[0]
                .ImagePositionPatient
            )
            for k in case.frames
        }
        for frame in seg.PerFrameFunctionalGroupsSequence:  # each SEG frame lies on a frame of its volume
            assert (
                tuple(round(float(v), 3) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
                in source_frames
            )
    _validate_segs(
        [(result.dicom_seg_bytes[name], tmp_path / name) for name in ("input-0_p1.dcm", "input-0_p2.dcm")]
    )


def test_a_philips_enhanced_image_with_per_frame_pixel_measures_gets_a_seg_on_its_frames(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    enhanced = _enhanced_4d(rng, volumes=1, positions=16)  # 3D: Philips' per-frame groups, as it writes them
    assert "PixelMeasuresSequence" not in enhanced.SharedFunctionalGroupsSequence[0]
    result = _run(tmp_path, {"mr/enhanced": dicom_bytes(enhanced)}, _above_median())
    (case,) = result.report()["cases"]
    assert (case["status"], case["output"], case["fallback"], case["part"]) == (
        "done",
        "input-0.dcm",
        None,
        None,
    )
    numbers, _ = read_dicom_seg(result.dicom_seg_bytes["input-0.dcm"], [str(enhanced.SOPInstanceUID)], 16)
    stored = enhanced.pixel_array.astype(float)
    np.testing.assert_array_equal(numbers > 0, stored > np.median(stored))  # on each frame, its own pixels


def _check_seg_on_grid(data: bytes, image: sitk.Image, folder: Path) -> None:
    """A SEG of a volume on its own grid: read back by highdicom onto that grid it holds the
    prediction (``image`` above its median)."""
    folder.mkdir()
    seg = hd.seg.segread(io.BytesIO(data))
    decoded = decode_on_grid(seg, Geometry.of(image))
    volume = sitk.GetArrayFromImage(image)
    np.testing.assert_array_equal(decoded, (volume > np.median(volume)).astype(np.uint16))


def _validate_segs(segs: list[tuple[bytes, Path]]) -> None:
    """The tools' checks, after a test's own (each skips the test, with its reason, where its tool
    is missing): dciodvfy finds nothing but warnings on the Patient module a SEG copies from its
    source (Philips' person names; the Patient ID nibabel's mosaics were blanked of), dcmqi reads
    each SEG."""
    copied = ("Retired Person Name form", "needed to build DICOMDIR - Patient ID")
    for data, folder in segs:
        assert [f for f in dciodvfy_findings(data, folder) if not any(c in f for c in copied)] == []
    for data, folder in segs:
        (folder / "seg.dcm").write_bytes(data)
        meta = dcmqi_meta(folder / "seg.dcm", folder / "dcmqi")
        assert [s["SegmentLabel"] for group in meta["segmentAttributes"] for s in group] == ["tissue"]


# -- Siemens mosaics ------------------------------------------------------------------------------


def _mosaics(rng: np.random.Generator) -> tuple[list[FileDataset], list[np.ndarray]]:
    """nibabel's two real Siemens DWI mosaics (b=0 and b=1000, one series, 48 tiles of 128x128 in
    896x896; their pixels were blanked for sharing): each filled with a phantom, tile k = slice k."""
    mosaics, volumes = [], []
    for b in (0, 1000):
        ds = pydicom.dcmread(io.BytesIO(gzip.decompress((NICOM / f"siemens_dwi_{b}.dcm.gz").read_bytes())))
        volume = np.clip(make_phantom(rng, (48, 128, 128)).image + 1024, 0, 4095).astype(np.uint16)
        tiled = np.zeros((896, 896), np.uint16)
        for k in range(48):
            row, column = divmod(k, 7)
            tiled[row * 128 : (row + 1) * 128, column * 128 : (column + 1) * 128] = volume[k]
        ds.PixelData = tiled.tobytes()
        mosaics.append(ds)
        volumes.append(volume)
    return mosaics, volumes


@needs_dcm2niix
def test_siemens_mosaics_are_volumes_placed_as_dcm2niix_places_them_with_a_valid_seg(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    mosaics, volumes = _mosaics(rng)
    reference = _dcm2niix(mosaics, tmp_path / "dcm2niix")
    assert reference.shape == (128, 128, 48, 2)
    members = {f"dwi/{k}": dicom_bytes(ds) for k, ds in enumerate(mosaics)}
    result = _run(tmp_path, members, _above_median())
    report = result.report()
    assert [(c["status"], c["part"], c["files"]) for c in report["cases"]] == [
        ("done", f"volume {v} of 2 (AcquisitionNumber {v})", 1) for v in (1, 2)
    ]
    builder = CaseBuilder()
    cases = [*builder.add(scan(unpack(InputItem(0, "dwi", data=make_tar(members)), tmp_path / "in")))]
    cases += builder.finish()
    assert len(cases) == 2  # the two mosaics: each volume's checks below run
    for number, case in enumerate(cases):
        image = prepare_case(case, tmp_path / case.case_id, write_files=False).images[0]
        assert image.GetSize() == (128, 128, 48)
        ours, theirs = _on_dcm2niix_grid(image, reference)
        np.testing.assert_array_equal(ours, theirs[:, number])
        assert sorted(np.unique(sitk.GetArrayFromImage(image))) == sorted(np.unique(volumes[number]))
        _check_seg_on_grid(
            result.dicom_seg_bytes[f"input-0_p{number + 1}.dcm"], image, tmp_path / str(number)
        )
    _validate_segs([(result.dicom_seg_bytes[f"input-0_p{n + 1}.dcm"], tmp_path / str(n)) for n in range(2)])


def test_a_mosaic_that_cannot_be_untiled_fails_alone_naming_the_mosaic(tmp_path: Path) -> None:
    broken = (NICOM / "0.dcm").read_bytes()  # nibabel's: a 256x256 mosaic whose header says 48 tiles of 36x36
    result = _run(tmp_path, {"m/0.dcm": broken}, _above_median())
    (case,) = result.report()["cases"]
    assert case["status"] == "failed"
    assert case["error"].startswith("prepare: ValueError: Siemens mosaic of 48 slices cannot be untiled (")
    assert case["error"].endswith("convert the series with dcm2niix and send the NIfTI")
    assert "overlapping" not in case["error"]


# -- gantry tilt ----------------------------------------------------------------------------------


def _tilted_ct(shift_mm: float) -> list[FileDataset]:
    """pydicom's real CT series, each slice moved sideways (along its columns) by ``shift_mm``
    more than the one before, as a tilted gantry writes it."""
    datasets = _ct_slices()[::-1]  # in slice order along the normal
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * shift_mm, z]
        ds.GantryDetectorTilt = -float(np.degrees(np.arctan(shift_mm / 2.5)))
        ds.InstanceNumber = k + 1
    return datasets


def _tilted_phantom(rng: np.random.Generator, shift_mm: float) -> list[FileDataset]:
    """A CT phantom written by asyncflow's synthetic series, tilted as :func:`_tilted_ct` is
    (InstanceNumber counting up: dcm2niix 1.0.20220720 misplaces a tilted series whose
    InstanceNumber counts down, by the whole sideways shift)."""
    phantom = make_phantom(rng, (14, 20, 24), spacing=(0.8, 0.8, 2.0))
    datasets = dicom_series_datasets(phantom, slice_shift=(0.0, shift_mm, 0.0))
    for k, ds in enumerate(datasets):
        ds.InstanceNumber = k + 1
    return datasets


@needs_dcm2niix
@pytest.mark.parametrize(
    ("source", "shift_mm"), [("real CT", 0.75), ("real CT", -1.4), ("phantom", 0.6), ("phantom", -0.6)]
)
def test_a_tilted_ct_is_untilted_onto_dcm2niix_grid(
    tmp_path: Path, rng: np.random.Generator, source: str, shift_mm: float
) -> None:
    datasets = (
        _tilted_ct(shift_mm) if source == "real CT" else _tilted_phantom(rng, shift_mm)
    )  # 16.7 to 29.2 degrees
    reference = _dcm2niix(datasets, tmp_path / "dcm2niix")
    (case,), _ = _cases(tmp_path, datasets)
    prepared = prepare_case(case, tmp_path / "work", write_files=False)
    assert prepared.shear is not None
    ours, theirs = _on_dcm2niix_grid(prepared.images[0], reference)
    assert ours.size == np.prod(reference.shape)  # the same grid, every voxel of it
    inside = (ours > ours.min()) & (theirs > theirs.min())  # where both interpolate from the source
    assert inside.mean() > 0.5
    if source == "phantom" and shift_mm < 0:
        np.testing.assert_allclose(ours[inside], theirs[inside], atol=1.0)  # both round to whole HU
    else:  # dcm2niix's voxels differ a little here; ours stay in place (the test below)
        assert np.corrcoef(ours[inside], theirs[inside])[0, 1] > 0.98


@pytest.mark.parametrize("shift_mm", [0.6, -0.6, 0.45])
def test_untilting_keeps_every_voxel_where_its_source_image_puts_it(
    tmp_path: Path, rng: np.random.Generator, shift_mm: float
) -> None:
    phantom = make_phantom(rng, (14, 20, 24), spacing=(0.8, 0.8, 2.0))
    phantom.image[:] = -1000
    phantom.image[:, 5, 10] = 1000  # one bright pixel in each source image, at row 5, column 10
    datasets = dicom_series_datasets(phantom, slice_shift=(0.0, shift_mm, 0.0))
    (case,), _ = _cases(tmp_path, datasets)
    image = prepare_case(case, tmp_path / "work", write_files=False).images[0]
    volume = sitk.GetArrayFromImage(image).astype(float) + 1000
    rows, columns = np.indices(volume.shape[1:])
    for k, ds in enumerate(datasets):  # the untilted slice's bright spot (its centroid) lies where it was
        weight = volume[k] / volume[k].sum()
        found = image.TransformContinuousIndexToPhysicalPoint(
            ((weight * columns).sum(), (weight * rows).sum(), float(k))
        )
        spacing = float(ds.PixelSpacing[0])
        where = np.asarray(ds.ImagePositionPatient, dtype=float) + spacing * np.asarray([10.0, 5.0, 0.0])
        np.testing.assert_allclose(found, where, atol=1e-6)


def test_a_tilted_ct_gives_a_seg_whose_frames_lie_on_its_source_images(tmp_path: Path) -> None:
    datasets = _tilted_ct(0.75)
    members = {f"ct/{k}": dicom_bytes(ds) for k, ds in enumerate(datasets)}
    result = _run(tmp_path, members, _above_median())
    data = result.dicom_seg_bytes["input-0.dcm"]
    seg = hd.seg.segread(io.BytesIO(data))
    position = {str(ds.SOPInstanceUID): [float(v) for v in ds.ImagePositionPatient] for ds in datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (source,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == position[
            str(source.ReferencedSOPInstanceUID)
        ]
    numbers, _ = read_dicom_seg(data, [str(ds.SOPInstanceUID) for ds in datasets])
    # On each source image, the SEG holds that image's own pixels above the median, within the
    # half-pixel moves that the way there (linear) and back (nearest) can make at edges.
    slope, intercept = float(datasets[0].RescaleSlope), float(datasets[0].RescaleIntercept)
    source = np.stack([ds.pixel_array for ds in datasets]).astype(np.int32) * slope + intercept
    case_image = prepare_case(
        _cases(tmp_path / "again", datasets)[0][0], tmp_path / "again" / "work", write_files=False
    ).images[0]
    truth = source > np.median(sitk.GetArrayFromImage(case_image))
    assert dice(numbers > 0, truth) >= 0.9
    _validate_segs([(data, tmp_path)])


def test_a_tilted_phantom_through_the_real_model_is_segmented_on_its_own_slices(
    tmp_path: Path, settings_factory, loaded_backend, rng: np.random.Generator
) -> None:
    phantom = make_phantom(rng, (24, 40, 40), spacing=(1.0, 1.0, 2.0))
    datasets = dicom_series_datasets(phantom, slice_shift=(0.0, 0.6, 0.0))  # 16.7 degrees
    members = {f"ct/{k}": dicom_bytes(ds) for k, ds in enumerate(datasets)}
    result = anyio.run(
        lambda: run_request([make_tar(members)], settings_factory(tmp_path / "work"), backend=loaded_backend)
    )
    numbers, names = read_dicom_seg(
        result.dicom_seg_bytes["input-0.dcm"], [str(ds.SOPInstanceUID) for ds in datasets]
    )
    liver = next(n for n, name in names.items() if name == "liver")
    # Each source slice holds the phantom's own slice: the labels came back onto it.
    assert dice(numbers == liver, phantom.labels == 1) >= 0.9

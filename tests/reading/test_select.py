"""Series selection rules (``--select``): on a CT study as a scanner sends it (a localizer, a
scout, a dose report, an arterial and a portal venous phase, a thick reconstruction), the
rules choose the right series; every other series' files are in the report with each rule's
first failed condition; "newest" waits for the study's last input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from helpers import dicom_bytes, make_tar, phantom_backend

from asyncflow.cli import main
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.errors import SettingsError
from asyncflow.settings import Settings

FAST = ["--no-mirroring", "--threads", "1", "--device", "cpu"]
PORTAL_VENOUS = """
[[rule]]
name = "portal venous CT"
modality = ["CT"]
series_description = "venous|portal"
not_image_type = ["LOCALIZER", "DERIVED"]
slice_thickness_mm = [0.5, 3.0]
min_slices = 10
contrast = true
"""
NEWEST_ABDOMEN = """
[[rule]]
name = "newest contrast CT"
modality = ["CT"]
body_part = "abdomen"
image_type = ["ORIGINAL", "PRIMARY", "AXIAL"]
slice_thickness_mm = [0.5, 3.0]
contrast = true
newest = true
"""


def _series(
    rng: np.random.Generator,
    study: str,
    number: int,
    description: str,
    *,
    slices: int = 12,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    thickness: float = 1.0,
    contrast: str | None = "Iomeprol",
    time: str = "120000",
) -> list[pydicom.Dataset]:
    datasets = dicom_series_datasets(
        make_phantom(rng, (slices, 24, 24), spacing=(1.0, 1.0, thickness)),
        series_number=number,
        study_uid=study,
    )
    for ds in datasets:
        ds.SeriesDescription, ds.ImageType, ds.SeriesTime = description, list(image_type), time
        if contrast is not None:
            ds.ContrastBolusAgent = contrast
    return datasets


def _study(rng: np.random.Generator) -> dict[str, list[pydicom.Dataset]]:
    """A CT study as a scanner sends it, by folder name."""
    study = pydicom.uid.generate_uid()
    return {
        "localizer": _series(
            rng,
            study,
            1,
            "Topogram 0.6 T20f",
            slices=2,
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            contrast=None,
            time="115500",
        ),
        "scout": _series(
            rng,
            study,
            2,
            "Scout venous",
            slices=1,
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            time="115600",
        ),
        "arterial": _series(rng, study, 3, "Abdomen arterial 1.0", time="120500"),
        "venous": _series(rng, study, 4, "Abdomen portal venous 1.0", time="120600"),
        "venous_5mm": _series(
            rng, study, 5, "Abdomen portal venous 5.0", slices=4, thickness=5.0, time="120601"
        ),
        "dose": _series(
            rng,
            study,
            501,
            "Dose Report",
            slices=1,
            image_type=("DERIVED", "SECONDARY", "OTHER"),
            time="121000",
        ),
    }


def _write(folder: Path, series: dict[str, list[pydicom.Dataset]]) -> Path:
    for name, datasets in series.items():
        (folder / name).mkdir(parents=True)
        for k, ds in enumerate(datasets):
            (folder / name / f"{k:03d}.dcm").write_bytes(dicom_bytes(ds))
    return folder


def _run(inputs: list[Path], out: Path, rules: Path) -> tuple[int, dict[str, Any]]:
    code = main(
        ["run", *map(str, inputs), "-o", str(out), "--select", str(rules), *FAST], backend=phantom_backend()
    )
    return code, json.loads((out / "report.json").read_text(encoding="utf-8"))


def _reasons(report: dict[str, Any]) -> dict[str, set[str]]:
    """Folder -> the reasons its skipped files were given."""
    found: dict[str, set[str]] = {}
    for skipped in report["skipped_files"]:  # a folder's files are inputs of their own; a TAR's, members
        folder = Path(skipped["path"]).parent.name or Path(skipped["origin"]).parent.name
        found.setdefault(folder, set()).add(skipped["reason"])
    return found


def test_the_rules_choose_the_thin_portal_venous_series_and_say_why_not_the_others(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    series = _study(rng)
    inputs = _write(tmp_path / "in", series)
    (tmp_path / "rules.toml").write_text(PORTAL_VENOUS, encoding="utf-8")
    code, report = _run([inputs], tmp_path / "out", tmp_path / "rules.toml")
    assert code == 0 and report["status"] == "done"
    ((case,),) = [report["cases"]]
    assert case["series_instance_uid"] == series["venous"][0].SeriesInstanceUID
    reasons = _reasons(report)
    rule = "not selected: portal venous CT: "
    assert reasons == {
        # Localizers and single images never are volumes, rules or not.
        "localizer": {"localizer (ImageType LOCALIZER)"},
        "scout": {"localizer (ImageType LOCALIZER)"},
        "dose": {"single-slice series (a localizer?) is not a volume"},
        "arterial": {rule + "SeriesDescription 'Abdomen arterial 1.0' does not match 'venous|portal'"},
        "venous_5mm": {rule + "SliceThickness 5 mm is outside 0.5-3 mm"},
    }
    # Every file is a case's or has its reason.
    files = sum(len(datasets) for datasets in series.values())
    assert case["files"] + len(report["skipped_files"]) == files
    # The same rules as JSON choose the same.
    (tmp_path / "rules.json").write_text(json.dumps({"rule": [{
        "name": "portal venous CT", "modality": ["CT"], "series_description": "venous|portal",
        "not_image_type": ["LOCALIZER", "DERIVED"], "slice_thickness_mm": [0.5, 3.0], "min_slices": 10,
        "contrast": True,
    }]}), encoding="utf-8")  # fmt: skip
    code, again = _run([inputs], tmp_path / "json", tmp_path / "rules.json")
    assert code == 0 and _reasons(again) == reasons


def test_the_newest_matching_series_of_a_study_waits_for_the_last_archive(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    series = _study(rng)
    late = {"venous": series.pop("venous")}  # the newest phase comes in a second archive
    tars = []
    for name, part in (("first.tar", series), ("second.tar", late)):
        members = {
            f"{folder}/{k:03d}.dcm": dicom_bytes(ds)
            for folder, items in part.items()
            for k, ds in enumerate(items)
        }
        (tmp_path / name).write_bytes(make_tar(members))
        tars.append(tmp_path / name)
    (tmp_path / "rules.toml").write_text(NEWEST_ABDOMEN, encoding="utf-8")
    code, report = _run(tars, tmp_path / "out", tmp_path / "rules.toml")
    assert code == 0
    assert [c["series_instance_uid"] for c in report["cases"]] == [late["venous"][0].SeriesInstanceUID]
    reasons = _reasons(report)
    assert reasons["arterial"] == {"not selected: newest contrast CT: series 4 of its study is newer"}
    assert reasons["venous_5mm"] == {
        "not selected: newest contrast CT: SliceThickness 5 mm is outside 0.5-3 mm"
    }
    # Without the second archive the arterial phase is the newest.
    code, report = _run(tars[:1], tmp_path / "alone", tmp_path / "rules.toml")
    assert [c["series_number"] for c in report["cases"]] == [3]


def test_a_rules_file_that_means_nothing_is_refused_before_anything_runs(tmp_path: Path) -> None:
    for text, said in (
        ("[[rule]]\nmodalty = ['CT']\n", "modalty is no condition"),
        ("[[rule]]\nseries_description = '(unclosed'\n", "a regular expression that does not compile"),
        ("[[rule]]\nslice_thickness_mm = 3\n", "slice_thickness_mm is \\[low, high\\]"),
        ("[[rule]]\nmin_slices = 'many'\n", "min_slices is a whole number"),
        ("name = 'no rules'\n", "has no rules"),
        ("[[rule\n", "is not valid TOML"),
    ):
        path = tmp_path / "rules.toml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(SettingsError, match=said):
            Settings(select=path)
    with pytest.raises(SettingsError, match="cannot be read"):
        Settings(select=tmp_path / "missing.toml")

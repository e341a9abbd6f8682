"""Ensembles of configurations, postprocessing and cascades equal nnU-Net's own command-line
sequence, voxel for voxel: ``nnUNetv2_predict --save_probabilities`` per configuration,
``nnUNetv2_ensemble``, ``nnUNetv2_apply_postprocessing``, and ``nnUNetv2_predict -c
3d_cascade_fullres -prev_stage_predictions`` after ``-c 3d_lowres`` (run through their console
scripts' entry points), on an anisotropic, rotated NIfTI and on a DICOM series; and a plan that
cannot run fails before any case, with nothing written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import dicom_bytes, make_tar
from nnunet_models import DATASET, ENSEMBLE, PREFIX, make_results

from asyncflow import run_request
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom, nifti_bytes
from asyncflow.errors import ModelError
from asyncflow.log import configure_logging
from asyncflow.stats.measure import statistics_csv
from asyncflow.writing.nifti import read_nifti_seg
from asyncflow.writing.seg import read_dicom_seg

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.model]

LABELS = {"liver": 1, "tumor": 2}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    return make_results(tmp_path_factory.mktemp("best"), model_dir)


@dataclass(frozen=True)
class Reference:
    """The two inputs (a rotated NIfTI, a DICOM series) and nnU-Net's outputs for them, by step."""

    rotated: bytes
    series: list
    cli: dict[str, dict[str, np.ndarray]]

    def entries(self) -> list:
        tar = make_tar({f"s/{k}.dcm": dicom_bytes(ds) for k, ds in enumerate(self.series)})
        return [{"rotated.nii.gz": self.rotated}, {"study.tar": tar}]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, results: Path) -> Reference:
    rng = np.random.default_rng(1234)
    tmp_path = tmp_path_factory.mktemp("reference")
    rotated = _rotated_nifti(rng)
    # Spacings whose model shapes are no half voxel from rounding the other way: the reference reads
    # the series from NIfTI, which keeps spacing in float32.
    series = dicom_series_datasets(make_phantom(rng, (18, 56, 52), spacing=(0.7, 0.85, 2.5)))
    reference_inputs = tmp_path / "reference_in"
    reference_inputs.mkdir()
    (reference_inputs / "rotated_0000.nii.gz").write_bytes(rotated)
    dicom_folder = tmp_path / "series"
    dicom_folder.mkdir()
    paths = [dicom_folder / f"{k:04d}.dcm" for k in range(len(series))]
    for path, ds in zip(paths, series, strict=True):
        path.write_bytes(dicom_bytes(ds))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    sitk.WriteImage(reader.Execute(), str(reference_inputs / "dicom_0000.nii.gz"))
    return Reference(rotated, series, _nnunet_cli(tmp_path / "cli", results, reference_inputs))


def _rotated_nifti(rng: np.random.Generator) -> bytes:
    """An anisotropic phantom whose axes are rotated 20 degrees about z and flipped in y."""
    phantom = make_phantom(rng, (22, 52, 48), spacing=(0.9, 0.8, 2.2))
    path = Path(_temporary(nifti_bytes(phantom.image, phantom.spacing, phantom.origin)))
    image = sitk.ReadImage(str(path))
    path.unlink()
    angle = np.deg2rad(20)
    image.SetDirection((np.cos(angle), np.sin(angle), 0.0, np.sin(angle), -np.cos(angle), 0.0, 0.0, 0.0, 1.0))
    return _bytes_of(image)


def _temporary(data: bytes) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False) as f:
        f.write(data)
    return f.name


def _bytes_of(image: sitk.Image) -> bytes:
    path = Path(_temporary(b""))
    sitk.WriteImage(image, str(path))
    data = path.read_bytes()
    path.unlink()
    return data


def _nnunet_cli(tmp: Path, results: Path, inputs: Path) -> dict[str, dict[str, np.ndarray]]:
    """nnU-Net's own sequence, through its console scripts' entry points in one fresh process:
    each configuration predicted with --save_probabilities, the ensembles, the postprocessing
    that inference_information.json names applied to the two-configuration ensemble, the
    cascade's second stage fed the 3d_lowres segmentation, and its ensemble with 3d_fullres."""
    out = {name: tmp / name for name in ("fullres", "lowres", "2d", "e2", "e3", "pp", "cascade", "ec")}
    predict = ["-i", str(inputs), "-d", DATASET, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0"]
    predict += ["--save_probabilities", "--disable_tta", "--disable_progress_bar"]
    chosen = results / "ensembles" / ENSEMBLE
    postprocess = ["-i", str(out["e2"]), "-o", str(out["pp"]), "-np", "1"]
    postprocess += ["-pp_pkl_file", str(chosen / "postprocessing.pkl")]
    postprocess += ["-plans_json", str(results / f"{PREFIX}3d_fullres" / "plans.json")]
    cascade = [*predict, "-c", "3d_cascade_fullres", "-o", str(out["cascade"])]
    cascade += ["-prev_stage_predictions", str(out["lowres"])]  # the folder of 3d_lowres's outputs
    steps = [
        ("predict", [*predict, "-c", "3d_fullres", "-o", str(out["fullres"])]),
        ("predict", [*predict, "-c", "3d_lowres", "-o", str(out["lowres"])]),
        ("predict", [*predict, "-c", "2d", "-o", str(out["2d"])]),
        ("ensemble", ["-i", str(out["fullres"]), str(out["lowres"]), "-o", str(out["e2"]), "-np", "1"]),
        (
            "ensemble",
            ["-i", *(str(out[n]) for n in ("fullres", "lowres", "2d")), "-o", str(out["e3"]), "-np", "1"],
        ),
        ("postprocess", postprocess),
        ("predict", cascade),
        ("ensemble", ["-i", str(out["fullres"]), str(out["cascade"]), "-o", str(out["ec"]), "-np", "1"]),
    ]
    script = (
        "import json, sys\n"
        "from nnunetv2.inference.predict_from_raw_data import predict_entry_point\n"
        "from nnunetv2.ensembling.ensemble import entry_point_ensemble_folders\n"
        "from nnunetv2.postprocessing.remove_connected_components import entry_point_apply_postprocessing\n"
        "run = {'predict': predict_entry_point, 'ensemble': entry_point_ensemble_folders,\n"
        "       'postprocess': entry_point_apply_postprocessing}\n"
        "if __name__ == '__main__':\n"
        "    for name, argv in json.loads(sys.argv[1]):\n"
        "        sys.argv = [name, *argv]\n"
        "        run[name]()\n"
    )
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "sequence.py").write_text(script, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_results": str(results.parent)}
    env |= {"nnUNet_raw": str(tmp), "nnUNet_preprocessed": str(tmp)}  # read by nnU-Net's imports only
    argv = [sys.executable, str(tmp / "sequence.py"), json.dumps(steps)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {
        name: {
            path.name.removesuffix(".nii.gz"): sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            for path in folder.glob("*.nii.gz")
        }
        for name, folder in out.items()
    }


def _dicom_labels(seg: bytes, series: list) -> np.ndarray:
    numbers, names = read_dicom_seg(seg, [str(ds.SOPInstanceUID) for ds in series])
    labels = np.zeros_like(numbers)
    for number, label in names.items():
        labels[numbers == number] = LABELS[label]
    return labels


def _assert_equal(result, expected: dict[str, np.ndarray], series: list) -> None:
    got = sitk.GetArrayFromImage(read_nifti_seg(result.nifti_seg_bytes["rotated.nii.gz"]))
    np.testing.assert_array_equal(got, expected["rotated"])
    (seg,) = result.dicom_seg_bytes.values()
    np.testing.assert_array_equal(_dicom_labels(seg, series), expected["dicom"])


async def test_best_configuration_and_an_ensemble_equal_nnunet_cli_sequence(
    tmp_path: Path, settings_factory, results: Path, reference: Reference
) -> None:
    cli = reference.cli
    # The test bites: each step changes nnU-Net's answer on these inputs.
    for name in ("rotated", "dicom"):
        assert set(np.unique(cli["e2"][name])) == {0, 1, 2}, name
        assert (cli["e2"][name] != cli["fullres"][name]).any(), f"{name}: the ensemble changes nothing"
        assert (cli["e3"][name] != cli["e2"][name]).any(), f"{name}: the 2d configuration changes nothing"
    assert any((cli["pp"][n] != cli["e2"][n]).any() for n in ("rotated", "dicom")), (
        "postprocessing changes nothing"
    )

    entries = reference.entries()
    # What find_best_configuration chose: the two configurations, their folds, the postprocessing.
    best = await run_request(entries, settings_factory(tmp_path / "work_best", model_dir=results))
    assert best.status == "done", best.report()
    # Three configurations named one by one: an ensemble, no postprocessing.
    folders = [results / f"{PREFIX}{c}" for c in ("3d_fullres", "3d_lowres", "2d")]
    three = await run_request(entries, settings_factory(tmp_path / "work_three", model_dir=folders))
    assert three.status == "done", three.report()

    for result, expected in ((best, cli["pp"]), (three, cli["e3"])):
        _assert_equal(result, expected, reference.series)

    parameters = best.report()["model"]["parameters"]
    assert parameters["configuration"] == "3d_fullres+3d_lowres"
    assert parameters["postprocessing"].count("remove_all_but_largest_component_from_segmentation") == 2
    assert three.report()["model"]["parameters"]["configuration"] == "3d_fullres+3d_lowres+2d"


async def test_an_ensemble_with_a_cascade_equals_nnunet_cli_sequence(
    tmp_path: Path, settings_factory, results: Path, reference: Reference
) -> None:
    cli = reference.cli
    for name in ("rotated", "dicom"):
        assert (cli["ec"][name] != cli["cascade"][name]).any(), f"{name}: the ensemble changes nothing"
    folders = [results / f"{PREFIX}{c}" for c in ("3d_fullres", "3d_cascade_fullres")]
    result = await run_request(reference.entries(), settings_factory(tmp_path, model_dir=folders))
    assert result.status == "done", result.report()
    _assert_equal(result, cli["ec"], reference.series)
    parameters = result.report()["model"]["parameters"]
    assert parameters["configuration"] == "3d_fullres+3d_cascade_fullres"
    assert parameters["cascade"] == "3d_lowres (folds 0) first, its segmentation read by 3d_cascade_fullres"


async def test_a_cascade_equals_nnunet_predict_with_prev_stage_predictions(
    tmp_path: Path, settings_factory, results: Path, reference: Reference
) -> None:
    cli = reference.cli
    for name in ("rotated", "dicom"):  # the test bites: the first stage changes the second's answer
        assert set(np.unique(cli["cascade"][name])) == {0, 1, 2}, name
        assert (cli["cascade"][name] != cli["fullres"][name]).any(), f"{name}: the cascade is 3d_fullres"
    cascade = results / f"{PREFIX}3d_cascade_fullres"
    logs = io.StringIO()
    configure_logging(json=True, stream=logs)
    result = await run_request(reference.entries(), settings_factory(tmp_path, model_dir=cascade))
    assert result.status == "done", result.report()
    _assert_equal(result, cli["cascade"], reference.series)
    parameters = result.report()["model"]["parameters"]
    assert parameters["configuration"] == "3d_cascade_fullres"
    assert parameters["cascade"] == "3d_lowres (folds 0) first, its segmentation read by 3d_cascade_fullres"

    # Each case through both networks, its next input made between them; both stages loaded once.
    events = [json.loads(line) for line in logs.getvalue().splitlines()]
    schema = json.loads((Path(__file__).parents[2] / "ops" / "events.schema.json").read_text())
    for event in events:
        jsonschema.validate(event, schema)
    cases = {r["case_id"] for r in result.report()["cases"]}
    staged = [e for e in events if e["event"] == "case.staged"]
    assert sorted(e["case_id"] for e in staged) == sorted(cases) and {e["stage"] for e in staged} == {2}
    predicted = [(e["case_id"], e["stage"]) for e in events if e["event"] == "case.predicted"]
    assert sorted(predicted) == sorted((case, stage) for case in cases for stage in (1, 2))
    assert [e["event"] for e in events].count("model.loaded") == 1


def _copy(results: Path, tmp_path: Path) -> Path:
    target = tmp_path / DATASET
    shutil.copytree(results, target, symlinks=True)
    return target


@pytest.mark.parametrize(
    "fault",
    [
        "labels",
        "missing fold",
        "foreign pickle",
        "lost postprocessing",
        "cascade without its first stage",
        "v1 member",
        "v1 among several models",
    ],
)
async def test_a_plan_that_cannot_run_fails_before_any_case_with_nothing_written(
    fault: str, tmp_path: Path, settings_factory, results: Path
) -> None:
    dataset = _copy(results, tmp_path)
    chosen = dataset / "ensembles" / ENSEMBLE
    lowres = dataset / f"{PREFIX}3d_lowres"
    model_dir: Path | list[Path] = dataset
    models: list[Path] = []
    if fault == "labels":
        spec = json.loads((lowres / "dataset.json").read_text())
        spec["labels"] = {"background": 0, "liver": 1, "kidney": 2}
        (lowres / "dataset.json").write_text(json.dumps(spec))
        expected = "differ in their labels"
    elif fault == "missing fold":
        information = json.loads((dataset / "inference_information.json").read_text())
        information["folds"] = [0, 1]
        (dataset / "inference_information.json").write_text(json.dumps(information))
        expected = "fold(s) [1]"
    elif fault == "foreign pickle":
        import pickle

        (chosen / "postprocessing.json").unlink()
        (chosen / "postprocessing.pkl").write_bytes(pickle.dumps(([os.system], [{"command": "true"}])))
        expected = "neither plain data nor nnU-Net's postprocessing"
    elif fault == "lost postprocessing":
        shutil.rmtree(chosen)
        expected = "copy the dataset's whole results folder"
    elif fault == "cascade without its first stage":
        shutil.rmtree(lowres)
        model_dir = dataset / f"{PREFIX}3d_cascade_fullres"
        expected = "reads the segmentation of 3d_lowres"
    else:
        v1 = Path(__file__).parents[2] / "asyncflow/models/tiny_v1/nnUNet/3d_fullres/Task998_AsyncflowTiny"
        model_dir = [dataset / f"{PREFIX}3d_fullres", v1 / "nnUNetTrainerV2__nnUNetPlansv2.1"]
        expected = "nnUNet_ensemble is not supported"
        if fault == "v1 among several models":
            model_dir, models = model_dir[0], model_dir[1:]
            expected = "several models in one request run nnU-Net v2 models only"
    work, output = tmp_path / "work", tmp_path / "out"
    settings = settings_factory(work, model_dir=model_dir, output_dir=output, models=models)
    with pytest.raises(ModelError, match=re.escape(expected)):
        await run_request([{"case.nii.gz": b"never read"}], settings)
    assert not work.exists() and not output.exists()


def test_the_model_key_covers_every_configuration_stage_and_the_postprocessing(
    tmp_path: Path, settings_factory, results: Path
) -> None:
    from asyncflow.pipeline.keys import model_key
    from asyncflow.pipeline.model import build_plan

    fullres, lowres = (results / f"{PREFIX}{c}" for c in ("3d_fullres", "3d_lowres"))
    plans = {
        "best": {"model_dir": results},
        "best, no postprocessing": {"model_dir": results, "postprocessing": "none"},
        "the same two named": {"model_dir": [fullres, lowres]},
        "the other order": {"model_dir": [lowres, fullres]},
        "one configuration": {"model_dir": fullres},
        "a cascade": {"model_dir": results / f"{PREFIX}3d_cascade_fullres"},
    }
    keys = {}
    for name, values in plans.items():
        settings = settings_factory(tmp_path, **values)
        keys[name] = model_key(build_plan(settings), settings)
    assert keys["best, no postprocessing"] == keys["the same two named"]
    del keys["the same two named"]
    assert len(set(keys.values())) == len(keys), keys
    one = build_plan(settings_factory(tmp_path, model_dir=fullres))
    assert keys["one configuration"] == model_key(
        one.model, settings_factory(tmp_path)
    )  # keys made before stay
    # A cascade's key covers its first stage: another 3d_lowres checkpoint, another key.
    dataset = _copy(results, tmp_path)
    checkpoint = dataset / f"{PREFIX}3d_lowres" / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    settings = settings_factory(tmp_path, model_dir=dataset / f"{PREFIX}3d_cascade_fullres")
    assert model_key(build_plan(settings), settings) != keys["a cascade"]


def _other_dataset(results: Path, tmp_path: Path) -> Path:
    """Another dataset's model: the 3d_lowres network as ``Dataset998_AsyncflowOther``, its two
    labels named ``left`` and ``right`` (another model, another label set)."""
    folder = tmp_path / "Dataset998_AsyncflowOther" / f"{PREFIX}3d_lowres"
    shutil.copytree(results / f"{PREFIX}3d_lowres", folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["dataset_name"] = "Dataset998_AsyncflowOther"
    (folder / "plans.json").write_text(json.dumps(plans))
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "left": 1, "right": 2}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def _outputs(result, series: list, suffix: str = "") -> dict[str, np.ndarray]:
    """The label maps of a result's NIfTI and SEG (its segment numbers), read back."""
    (nifti,) = [n for n in result.nifti_seg_bytes if n.endswith(f"{suffix}.nii.gz")]
    (seg,) = [n for n in result.dicom_seg_bytes if n.endswith(f"{suffix}.dcm")]
    numbers, _ = read_dicom_seg(result.dicom_seg_bytes[seg], [str(ds.SOPInstanceUID) for ds in series])
    return {"nifti": sitk.GetArrayFromImage(read_nifti_seg(result.nifti_seg_bytes[nifti])), "seg": numbers}


async def test_several_models_each_loaded_once_equal_their_runs_alone(
    tmp_path: Path, settings_factory, results: Path, reference: Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncflow.backends.nnunet_v2 import NnUNetV2Backend

    first, other = results / f"{PREFIX}3d_fullres", _other_dataset(results, tmp_path)
    entries = reference.entries()
    alone = [
        await run_request(entries, settings_factory(tmp_path / f"alone{n}", model_dir=folder))
        for n, folder in enumerate((first, other))
    ]
    loads: list[str] = []
    load = NnUNetV2Backend._load

    def counted(self: NnUNetV2Backend) -> None:
        loads.append(self.info.name)
        load(self)

    monkeypatch.setattr(NnUNetV2Backend, "_load", counted)
    both = await run_request(entries, settings_factory(tmp_path / "both", model_dir=first, models=[other]))
    assert both.status == "done", both.report()
    assert sorted(loads) == ["Dataset998_AsyncflowOther", "Dataset999_AsyncflowTiny"]  # once each

    # Each model's outputs are its own, named after its dataset, equal to its run alone.
    tags = ("_Dataset999_AsyncflowTiny", "_Dataset998_AsyncflowOther")
    assert len(both.nifti_seg_bytes) == 2 and len(both.dicom_seg_bytes) == 2
    for tag, result in zip(tags, alone, strict=True):
        got, expected = _outputs(both, reference.series, tag), _outputs(result, reference.series)
        for kind in ("nifti", "seg"):
            np.testing.assert_array_equal(got[kind], expected[kind])
    assert (
        _outputs(alone[0], reference.series)["nifti"] != _outputs(alone[1], reference.series)["nifti"]
    ).any()
    report = both.report()
    assert report["model"]["name"] == "Dataset999_AsyncflowTiny + Dataset998_AsyncflowOther"
    assert report["model"]["parameters"]["Dataset998_AsyncflowOther configuration"] == "3d_lowres"
    for case in report["cases"]:
        sections = case["models"]
        assert [s["model"] for s in sections] == [t[1:] for t in tags]
        assert case["output"] == sections[0]["output"]  # the report's fields are the first model's
        for tag, section in zip(tags, sections, strict=True):
            assert section["output"].removesuffix(".dcm").removesuffix(".nii.gz").endswith(tag)
            assert section["labels_present"] == [1, 2]
    # statistics.csv: a line per model and label of each case, named by that model's output
    rows = list(csv.DictReader(io.StringIO(statistics_csv(report["cases"]))))
    assert {r["output"] for r in rows} == {s["output"] for c in report["cases"] for s in c["models"]}
    assert len(rows) == 2 * 2 * 2  # cases x models x labels


async def test_several_models_merged_into_one_output_the_later_model_wins(
    tmp_path: Path, settings_factory, results: Path, reference: Reference
) -> None:
    import pydicom

    first, other = results / f"{PREFIX}3d_fullres", _other_dataset(results, tmp_path)
    entries = reference.entries()
    alone = [
        _outputs(
            await run_request(entries, settings_factory(tmp_path / f"alone{n}", model_dir=folder)),
            reference.series,
        )
        for n, folder in enumerate((first, other))
    ]
    settings = settings_factory(tmp_path / "merged", model_dir=first, models=[other], merge_labels=True)
    merged = await run_request(entries, settings)
    assert merged.status == "done", merged.report()
    got = _outputs(merged, reference.series)  # one output per case
    expected = alone[0]["nifti"].copy()
    expected[alone[1]["nifti"] > 0] = alone[1]["nifti"][alone[1]["nifti"] > 0] + 2  # left 3, right 4
    assert ((alone[0]["nifti"] > 0) & (alone[1]["nifti"] > 0)).any()  # the models overlap somewhere
    np.testing.assert_array_equal(got["nifti"], expected)

    (seg,) = merged.dicom_seg_bytes.values()
    segments = pydicom.dcmread(io.BytesIO(seg)).SegmentSequence
    assert [s.SegmentLabel for s in segments] == ["liver", "tumor", "left", "right"]
    assert all("the later model's label wins" in s.SegmentDescription for s in segments)
    assert "later model's label wins" in merged.report()["model"]["parameters"]["merge"]


async def test_several_models_resume_as_they_were_and_redo_when_one_changes(
    tmp_path: Path, settings_factory, results: Path, reference: Reference
) -> None:
    from asyncflow.pipeline.journal import OutputFolder

    first, other = results / f"{PREFIX}3d_fullres", _other_dataset(results, tmp_path)
    out = tmp_path / "out"
    settings = settings_factory(tmp_path / "work", model_dir=first, models=[other])
    done = await run_request(reference.entries(), settings, sink=OutputFolder(out))
    assert done.status == "done", done.report()
    names = sorted(p.name for p in out.rglob("*.dcm")) + sorted(p.name for p in out.rglob("*.nii.gz"))
    assert len(names) == 4 and all("_Dataset99" in n for n in names)

    again = await run_request(reference.entries(), settings, sink=OutputFolder(out, resume=True))
    cases = again.report()["cases"]
    assert {c["status"] for c in cases} == {"resumed"}
    assert [c["models"] for c in cases] == [c["models"] for c in done.report()["cases"]]

    merged = replace(settings, merge_labels=True)  # another plan: every case is done again
    redone = await run_request(reference.entries(), merged, sink=OutputFolder(out, resume=True))
    assert {c["status"] for c in redone.report()["cases"]} == {"done"}

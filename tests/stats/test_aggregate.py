"""Statistics across nodes: sums that merge exactly, the minimum cell size, noise of the stated
scale, the FLAME statistics result (two nodes through the harness) and ``asyncflow stats``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flame_harness import run_star
from helpers import make_tar

from asyncflow import SettingsError
from asyncflow.cli import main
from asyncflow.cli.synthetic import make_phantom, nifti_bytes
from asyncflow.flame.analysis import StatisticsAggregator, nnUNetAnalyzer, run_star_model
from asyncflow.stats.aggregate import DEFAULT_BOUNDS, FORMAT, merge_nodes, node_aggregates, parse_bounds


def _case(volume: float, mean: float | None, components: int, status: str = "done") -> dict[str, Any]:
    return {
        "case_id": "case",
        "status": status,
        "statistics": [
            {"name": "liver", "volume_ml": volume, "intensity_mean": mean, "components": components},
            {"name": "tumor", "volume_ml": 0.0, "intensity_mean": None, "components": 0},
        ],
    }


def test_merged_figures_equal_those_of_all_cases_together() -> None:
    rng = np.random.default_rng(3)
    volumes = [rng.normal(1500, 250, size) for size in (7, 9)]
    means = [rng.normal(110, 12, len(v)) for v in volumes]
    nodes = {
        f"node_{n}": node_aggregates(
            [_case(v, m, 1 + k % 3) for k, (v, m) in enumerate(zip(vs, ms, strict=True))]
        )
        for n, (vs, ms) in enumerate(zip(volumes, means, strict=True))
    }
    merged = merge_nodes(nodes)
    everything = np.concatenate(volumes)
    overall = merged["overall"]["labels"]["liver"]["volume_ml"]
    assert overall["count"] == 16 and merged["overall"]["cases"] == 16
    assert overall["mean"] == pytest.approx(everything.mean(), rel=1e-9)
    assert overall["sd"] == pytest.approx(everything.std(ddof=1), rel=1e-6)
    assert (overall["min"], overall["max"]) == (
        pytest.approx(everything.min()),
        pytest.approx(everything.max()),
    )
    width = 4000 / 80  # the default bins of volume_ml
    for q in (5, 25, 50, 75, 95):  # from the merged histogram: where the cases' share crosses q, to a bin
        value = overall[f"p{q}"]
        assert (everything < value - width).mean() <= q / 100 <= (everything <= value + width).mean(), q
    # Values that all fall into one bin: the percentiles stay between the known min and max.
    small = merge_nodes({"a": node_aggregates([_case(v, 100, 1) for v in (6.3, 7.0, 7.2, 7.5, 7.7)])})
    tiny = small["overall"]["labels"]["liver"]["volume_ml"]
    assert 6.3 == tiny["min"] <= tiny["p5"] <= tiny["p50"] <= tiny["p95"] <= tiny["max"] == 7.7
    node_0 = merged["nodes"]["node_0"]["labels"]["liver"]["intensity_mean"]
    assert node_0["mean"] == pytest.approx(means[0].mean(), rel=1e-9)
    # An empty label has volume 0 in every case, and no intensity at all: that cell is suppressed.
    tumor = merged["overall"]["labels"]["tumor"]
    assert tumor["volume_ml"]["mean"] == 0 and tumor["volume_ml"]["count"] == 16
    assert tumor["intensity_mean"] == {"count": 0, "suppressed_count": 0}


def test_a_node_below_the_minimum_cell_size_sends_only_its_count() -> None:
    small = node_aggregates([_case(1000 + k, 100, 1) for k in range(4)])
    assert small == {"format": FORMAT, "cases": 4, "min_cases": 5, "suppressed": True, "labels": {}}
    # Failed cases do not count; a figure with fewer values than the minimum sends its count only.
    mixed = [_case(1000 + k, 100 if k < 3 else None, 1) for k in range(6)] + [_case(1, 1, 1, "failed")]
    aggregate = node_aggregates(mixed)
    assert aggregate["cases"] == 6
    assert aggregate["labels"]["liver"]["intensity_mean"] == {"count": 3, "suppressed": True}
    assert aggregate["labels"]["liver"]["volume_ml"]["count"] == 6
    merged = merge_nodes({"big": aggregate, "small": small})
    assert merged["overall"]["suppressed_cases"] == 4 and merged["nodes"]["small"]["labels"] == {}
    assert node_aggregates([_case(1, 1, 1)], min_cases=1)["labels"]["liver"]["volume_ml"]["count"] == 1
    # A case resumed from an earlier run keeps that run's statistics: it counts.
    resumed = node_aggregates([_case(1, 1, 1, "resumed"), _case(2, 1, 1)], min_cases=1)
    assert resumed["cases"] == 2 and resumed["labels"]["liver"]["volume_ml"]["count"] == 2


def test_values_are_clipped_to_their_bounds_and_bounds_can_be_set_per_label() -> None:
    bounds = parse_bounds({"volume_ml": [0, 2000, 20], "tumor.volume_ml": [0, 50, 50]})
    aggregate = node_aggregates([_case(v, 100, 1) for v in (500, 900, 1500, 2500, 9000)], bounds=bounds)
    liver = aggregate["labels"]["liver"]["volume_ml"]
    assert liver["max"] == 2000 and liver["sum"] == 500 + 900 + 1500 + 2000 + 2000
    assert liver["bounds"] == [0, 2000, 20] and sum(liver["histogram"]) == 5
    assert aggregate["labels"]["tumor"]["volume_ml"]["bounds"] == [0, 50, 50]
    assert aggregate["labels"]["liver"]["components"]["bounds"] == DEFAULT_BOUNDS["components"].as_list()
    with pytest.raises(SettingsError, match="unknown figure 'weight'"):
        parse_bounds({"weight": [0, 1, 1]})
    with pytest.raises(SettingsError, match="needs low < high"):
        parse_bounds({"volume_ml": [5, 5, 1]})
    different = node_aggregates([_case(v, 100, 1) for v in (500, 900, 1500, 2500, 9000)])
    conflict = merge_nodes({"a": aggregate, "b": different})["overall"]["labels"]["liver"]["volume_ml"]
    assert conflict["error"].startswith("the nodes binned this figure differently")


def test_the_noise_has_the_scale_its_sensitivity_and_epsilon_give() -> None:
    pytest.importorskip("opendp")
    from asyncflow.stats.privacy import LaplaceNoise

    noise = LaplaceNoise(2.0, releases=4)  # epsilon 0.5 per release
    assert (noise.epsilon_each, noise.scale(3.0)) == (0.5, 6.0)
    draws = np.asarray(noise.vector([0.0] * 50_000, 3.0))
    # Laplace(b): mean 0, E|X| = b, Var = 2 b^2
    assert abs(draws.mean()) < 0.25 and np.abs(draws).mean() == pytest.approx(6.0, rel=0.03)  # 6 SE
    assert draws.var() == pytest.approx(72.0, rel=0.06)


def test_epsilon_puts_noise_of_each_figures_sensitivity_on_every_release_and_withholds_min_and_max() -> None:
    pytest.importorskip("opendp")
    cases = [_case(1000.0 + 10 * k, 100.0, 2) for k in range(30)]  # far above min_cases, noise and all
    # 2 labels x 3 figures: 1 + 4 * 6 = 25 releases; epsilon 25 gives each release epsilon 1.
    draws = [node_aggregates(cases, epsilon=25.0, min_cases=1) for _ in range(300)]
    first = draws[0]
    assert (first["epsilon"], first["releases"], first["epsilon_per_release"]) == (25.0, 25, 1.0)
    liver = [d["labels"]["liver"]["volume_ml"] for d in draws]
    assert "min" not in liver[0] and "max" not in liver[0]
    values = [1000.0 + 10 * k for k in range(30)]
    # E|Laplace(b)| = b, with b = sensitivity / (epsilon per release): 1 for counts and histogram
    # bins, max(|low|, |high|) = 4000 for the sum of volumes, its square for the sum of squares.
    expected = {
        "cases": ([d["cases"] - 30 for d in draws], 1.0),
        "count": ([c["count"] - 30 for c in liver], 1.0),
        "sum": ([c["sum"] - sum(values) for c in liver], 4000.0),
        "sum_sq": ([c["sum_sq"] - sum(v * v for v in values) for c in liver], 4000.0**2),
    }
    for name, (noise, scale) in expected.items():
        assert np.abs(noise).mean() == pytest.approx(scale, rel=0.3), name  # 300 draws: 5 standard errors
    empty_bins = [n for c in liver for n in c["histogram"][:19]]  # no volume below 950 ml
    assert np.abs(empty_bins).mean() == pytest.approx(1.0, rel=0.07)
    with pytest.raises(SettingsError, match="epsilon must be positive"):
        node_aggregates(cases, epsilon=0.0)


def _volumes(rng: np.random.Generator, count: int, key: str) -> dict[str, bytes]:
    phantoms = [make_phantom(rng, (24, 32, 32)) for _ in range(count)]
    return {
        f"{key}/scan{k}.nii.gz": nifti_bytes(p.image, p.spacing, p.origin) for k, p in enumerate(phantoms)
    }


@pytest.mark.slow
def test_two_nodes_send_statistics_only_and_a_small_node_only_its_count(
    tmp_path: Path, model_dir: Path, rng: np.random.Generator
) -> None:
    nodes = [
        [_volumes(rng, 5, "Hospital-A/Mustermann")],
        [{"Hospital-B/archive.tar": make_tar(_volumes(rng, 3, "Doe"), mode="w")}],
    ]
    kwargs = {
        "model_dir": str(model_dir),
        "work_dir": str(tmp_path / "work"),
        "device": "cpu",
        "use_mirroring": False,
        "torch_threads": 1,
        "result": "statistics",
    }
    run = run_star(nnUNetAnalyzer, StatisticsAggregator, nodes, output_type="str", analyzer_kwargs=kwargs)

    text = run.final_result.decode()
    merged = json.loads(text)
    assert merged["format"] == FORMAT and merged["nodes_without_statistics"] == []
    assert merged["nodes"]["node_0"]["cases"] == 5 and not merged["nodes"]["node_0"]["suppressed"]
    assert merged["nodes"]["node_1"] == {"cases": 3, "suppressed": True, "labels": {}}
    liver = merged["overall"]["labels"]["liver"]
    assert liver["volume_ml"]["count"] == 5 and 5 < liver["volume_ml"]["mean"] < 200
    assert 100 < liver["intensity_mean"]["mean"] < 180  # the phantom's liver: 140 HU
    assert merged["overall"]["suppressed_cases"] == 3
    for secret in ("Hospital", "Mustermann", "Doe", "scan", ".nii", ".tar", "case-"):
        assert secret not in text
    # What each analyzer sent: the contract's maps empty, no report, no bytes anywhere.
    for node in ("node_0", "node_1"):
        (sent,) = run.sent[node]
        assert sent["dicom_seg_bytes"] == {} and sent["nifti_seg_bytes"] == {} and "report" not in sent
        assert b"nii" not in pickle.dumps(sent) and sent["statistics"]["format"] == FORMAT


def test_bad_statistics_options_fail_before_any_work() -> None:
    with pytest.raises(SettingsError, match="epsilon applies to result='statistics' only"):
        run_star_model(epsilon=1.0)
    with pytest.raises(SettingsError, match="needs aggregator='statistics'"):
        run_star_model(result="statistics", aggregator="zip")
    with pytest.raises(SettingsError, match="result must be 'segmentations' or 'statistics'"):
        run_star_model(analyzer_kwargs={"result": "pixels"})


def test_stats_merges_run_reports_as_the_aggregator_does(tmp_path: Path, capsys) -> None:
    reports = []
    for number, volumes in enumerate(([900.0, 1100, 1300, 1500, 1700], [1000.0, 1200])):
        path = tmp_path / f"run{number}" / "report.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"status": "done", "cases": [_case(v, 120, 1) for v in volumes]}))
        reports.append(str(path))
    out = tmp_path / "merged.json"
    assert main(["stats", *reports, "-o", str(out), "--bounds", "volume_ml=0,2000,20"]) == 0
    merged = json.loads(out.read_text())
    assert merged["overall"]["labels"]["liver"]["volume_ml"]["mean"] == pytest.approx(1300)
    assert merged["nodes"][reports[1]]["suppressed"] and merged["overall"]["suppressed_cases"] == 2
    assert main(["stats", *reports, "--min-cases", "2"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["overall"]["cases"] == 7
    assert merged["overall"]["labels"]["liver"]["volume_ml"]["mean"] == pytest.approx(8700 / 7)
    (tmp_path / "other.json").write_text("[1, 2]")
    assert main(["stats", str(tmp_path / "other.json")]) == 2
    assert "not an asyncflow report.json" in capsys.readouterr().err


def test_a_case_of_several_models_counts_every_model_s_labels() -> None:
    def case(liver: float, kidney: float) -> dict[str, Any]:
        first = [{"name": "liver", "volume_ml": liver, "intensity_mean": 100.0, "components": 1}]
        second = [{"name": "kidney", "volume_ml": kidney, "intensity_mean": 30.0, "components": 2}]
        models = [
            {"model": "Dataset029_LiTS", "statistics": first},
            {"model": "Dataset064_KiTS", "statistics": second},
        ]
        return {"case_id": "case", "status": "done", "statistics": first, "models": models}

    bounds = parse_bounds({"kidney.volume_ml": ["0", "500", "50"]})  # by the label's own name
    aggregate = node_aggregates([case(1500 + k, 150 + k) for k in range(5)], bounds=bounds)
    assert sorted(aggregate["labels"]) == ["Dataset029_LiTS.liver", "Dataset064_KiTS.kidney"]
    kidney = aggregate["labels"]["Dataset064_KiTS.kidney"]["volume_ml"]
    assert kidney["count"] == 5 and kidney["sum"] == pytest.approx(sum(150 + k for k in range(5)))
    assert kidney["bounds"] == [0.0, 500.0, 50]

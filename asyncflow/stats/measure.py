"""Per-case measurements of each label: volume, intensity, connected components, extent.

Measured in the source geometry, on the label map the case's output holds, and
the source's own voxels (channel 0; CT in HU, the rescale applied), for every
label the model declares, present or not:

- ``voxels`` and ``volume_ml``: voxel count times the voxel volume (spacing x * y * z mm^3 / 1000),
  to the decimal place of a tenth of one voxel's volume (0.0001 ml for voxels of 1 to 9.99
  mm^3): digits below it are float noise of the spacing, not a measurement;
- ``intensity_mean``, ``intensity_sd`` (population sd), ``intensity_p5``, ``intensity_p50``,
  ``intensity_p95`` (numpy's linear percentiles) of the label's voxels;
- ``components``: connected components under 26-connectivity (faces, edges and corners
  touch), and ``largest_component_share``: the largest one's voxels / the label's voxels;
- ``extent_mm``: (x, y, z) size of the label's bounding box along the volume's own axes;
- ``flags``: ``empty`` (no voxel), ``volume_below_plausible`` / ``volume_above_plausible``
  (outside the label's ``volume_ml`` range from the label configuration; none by default).

An empty label has zero voxels, volume and components, and no intensity, share or extent.
A plain synchronous function, run by the export workers.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from asyncflow.labels.segment import SegmentLabel

__all__ = ["CSV_FIELDS", "LabelStatistics", "measure_labels", "statistics_csv"]

_26_CONNECTED = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class LabelStatistics:
    label: int
    name: str
    voxels: int
    volume_ml: float
    intensity_mean: float | None = None
    intensity_sd: float | None = None
    intensity_p5: float | None = None
    intensity_p50: float | None = None
    intensity_p95: float | None = None
    components: int = 0
    largest_component_share: float | None = None
    extent_mm: tuple[float, float, float] | None = None  # (x, y, z)
    flags: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> LabelStatistics:
        """The inverse of :meth:`as_dict`."""
        extent = entry.get("extent_mm")
        return cls(**{**entry, "extent_mm": tuple(extent) if extent else None, "flags": list(entry["flags"])})

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "name": self.name,
            "voxels": self.voxels,
            "volume_ml": self.volume_ml,
            "intensity_mean": self.intensity_mean,
            "intensity_sd": self.intensity_sd,
            "intensity_p5": self.intensity_p5,
            "intensity_p50": self.intensity_p50,
            "intensity_p95": self.intensity_p95,
            "components": self.components,
            "largest_component_share": self.largest_component_share,
            "extent_mm": list(self.extent_mm) if self.extent_mm else None,
            "flags": list(self.flags),
        }


def measure_labels(
    labels: np.ndarray,
    intensities: np.ndarray,
    spacing: Sequence[float],
    definitions: Mapping[int, SegmentLabel],
) -> list[LabelStatistics]:
    """Each defined label's figures on a (z, y, x) label map and the source voxels on its grid;
    ``spacing`` is SimpleITK's (x, y, z) in mm."""
    if labels.shape != intensities.shape:
        raise ValueError(f"label map {labels.shape} and source voxels {intensities.shape} differ in shape")
    voxel_ml = math.prod(float(s) for s in spacing[:3]) / 1000.0
    boxes = ndimage.find_objects(labels.astype(np.int64, copy=False)) if labels.size else []
    measured = []
    for value in sorted(v for v in definitions if v > 0):
        definition = definitions[value]
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            measured.append(_flagged(LabelStatistics(value, definition.name, 0, 0.0), definition))
            continue
        mask = labels[box] == value
        count = int(np.count_nonzero(mask))
        values = intensities[box][mask].astype(np.float64)
        p5, p50, p95 = (float(v) for v in np.percentile(values, [5, 50, 95]))
        components, number = ndimage.label(mask, structure=_26_CONNECTED)
        largest = int(np.bincount(components.ravel())[1:].max()) if number else 0
        z, y, x = (s.stop - s.start for s in box)
        extent = (x * float(spacing[0]), y * float(spacing[1]), z * float(spacing[2]))
        statistics = LabelStatistics(
            value,
            definition.name,
            count,
            _volume(count, voxel_ml),
            intensity_mean=float(values.mean()),
            intensity_sd=float(values.std()),
            intensity_p5=p5,
            intensity_p50=p50,
            intensity_p95=p95,
            components=int(number),
            largest_component_share=largest / count,
            extent_mm=extent,
        )
        measured.append(_flagged(statistics, definition))
    return measured


def _volume(voxels: int, voxel_ml: float) -> float:
    """``voxels`` of ``voxel_ml`` each, to the decimal place of a tenth of one voxel's volume."""
    places = max(0, 1 - math.floor(math.log10(voxel_ml))) if voxel_ml > 0 else 6
    return round(voxels * voxel_ml, places)


def _flagged(statistics: LabelStatistics, definition: SegmentLabel) -> LabelStatistics:
    flags = statistics.flags
    if statistics.voxels == 0:
        flags.append("empty")
    if definition.volume_ml is not None:
        low, high = definition.volume_ml
        if statistics.volume_ml < low:
            flags.append("volume_below_plausible")
        elif statistics.volume_ml > high:
            flags.append("volume_above_plausible")
    return statistics


CSV_FIELDS = [
    "case_id",
    "series_number",
    "modality",
    "output",
    "label",
    "name",
    "voxels",
    "volume_ml",
    "intensity_mean",
    "intensity_sd",
    "intensity_p5",
    "intensity_p50",
    "intensity_p95",
    "components",
    "largest_component_share",
    "extent_x_mm",
    "extent_y_mm",
    "extent_z_mm",
    "flags",
]


# Decimals a figure is written with in the CSV (the report keeps every digit but the volume's
# noise): a thousandth of a ml is a cubic millimetre, a hundredth of a HU or mm is below any
# scanner's resolution.
_DECIMALS = {"volume_ml": 3, "largest_component_share": 4, "extent_mm": 2} | {
    f"intensity_{figure}": 2 for figure in ("mean", "sd", "p5", "p50", "p95")
}


def _rounded(key: str, value: Any) -> Any:
    return round(value, _DECIMALS[key]) if isinstance(value, float) and key in _DECIMALS else value


def statistics_csv(cases: Iterable[Mapping[str, Any]]) -> str:
    """One line per case and label, from report case entries (``statistics`` lists of dicts),
    with the case's output and its source series' number and modality (no patient data);
    figures rounded (:data:`_DECIMALS`), empty cells where a figure does not exist, flags
    joined by ``;``. A case of several models: a line per model and label, with that model's
    output."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for case, section in ((c, s) for c in cases for s in c.get("models") or [c]):
        for row in section.get("statistics") or []:
            extent = [_rounded("extent_mm", v) for v in row.get("extent_mm") or [None, None, None]]
            writer.writerow(
                {
                    **{key: _rounded(key, row.get(key)) for key in CSV_FIELDS if key in row},
                    "case_id": case["case_id"],
                    "series_number": case.get("series_number"),
                    "modality": case.get("modality"),
                    "output": section.get("output"),
                    "extent_x_mm": extent[0],
                    "extent_y_mm": extent[1],
                    "extent_z_mm": extent[2],
                    "flags": ";".join(row.get("flags") or []),
                }
            )
    return out.getvalue()

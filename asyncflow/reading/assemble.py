"""Scanned files -> cases: NIfTI volumes (or modality sets) and DICOM series.

:class:`CaseBuilder` turns the scans of inputs (:mod:`asyncflow.reading.scan`) into
cases with opaque ids and unique output names. NIfTI cases are complete as soon as
their input is scanned. A DICOM series becomes a case as soon as the archive that
delivered it is scanned, so prediction starts before the last archive is unpacked
(series of loose files, one input per file, wait for :meth:`CaseBuilder.finish`).
A series may span inputs, though: when a later input adds slices to a series that
is already a case, or turns out unreadable after delivering part of one, that case
is *withdrawn* (:attr:`CaseBuilder.withdrawn`; the pipeline drops whatever it
produced) and the grown series becomes a new case. No partial volume is ever
returned.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from asyncflow.case import Case, CaseSource, DicomInstance, Origin, SkippedFile
from asyncflow.enums import InputKind, SourceKind
from asyncflow.labels.mitk import MITK_SUFFIX
from asyncflow.log import get_logger, scrub
from asyncflow.reading.archives import UnpackedInput
from asyncflow.reading.names import stem as stem_of
from asyncflow.reading.scan import Scan
from asyncflow.reading.select import Selection, SeriesFacts
from asyncflow.reading.series import Stack, split_frames, split_series
from asyncflow.reading.volumes import Choice, choose

__all__ = ["CaseBuilder"]

_CHANNEL = re.compile(r"^(?P<id>.+)_(?P<channel>\d{4})$")
log = get_logger(__name__)


def _series_label(unpacked: UnpackedInput) -> str:
    """A series is named after its archive, or after the folder of a loose file."""
    if unpacked.kind is InputKind.ARCHIVE:
        return unpacked.item.name
    return PurePosixPath(unpacked.item.name.replace("\\", "/")).parent.name or unpacked.item.name


def _opaque(unpacked: UnpackedInput) -> str:
    """The name of an input's cases when names from the data must not be used."""
    return f"input{unpacked.item.index:03d}"


def _ranges(frames: tuple[int, ...]) -> str:
    """1-based frame numbers as runs: ``1-40, 81-120``."""
    runs: list[list[int]] = []
    for frame in sorted(frames):
        if runs and frame == runs[-1][-1] + 1:
            runs[-1].append(frame)
        else:
            runs.append([frame])
    return ", ".join(f"{r[0] + 1}-{r[-1] + 1}" if len(r) > 1 else f"{r[0] + 1}" for r in runs)


def _label_file_for(stem: str, label_files: list[Path]) -> Path | None:
    """The input's label JSON named after the case, else its only one."""
    for path in label_files:
        if path.name[: -len(MITK_SUFFIX)].lower() == stem.lower():
            return path
    return label_files[0] if len(label_files) == 1 else None


@dataclass
class _Series:
    uid: str  # SeriesInstanceUID
    origin: Origin  # the input the first instance came from (report)
    label: str  # what the series is named after
    instances: dict[str, DicomInstance] = field(default_factory=dict)  # by SOPInstanceUID
    cases: list[Case] = field(default_factory=list)  # the cases made of it as it stands


class CaseBuilder:
    """Turns scans into cases: opaque ids, unique output names, series across inputs."""

    def __init__(
        self,
        *,
        multi_modal: bool = False,
        opaque_names: bool = False,
        volumes: Choice | None = None,
        selection: Selection | None = None,
    ) -> None:
        self.multi_modal = multi_modal
        self.selection = selection  # which DICOM series become cases (None: every one)
        self.opaque_names = opaque_names  # name outputs by input index, not by archive or file name
        self.volumes = volumes or Choice("all")  # which volumes of a 4D series become cases
        self._count = 0
        self._names: set[str] = set()
        self._series: dict[str, _Series] = {}
        self._label_files: dict[Origin, list[Path]] = {}  # input -> its *.mitklabel.json
        self._broken: dict[str, int] = {}  # SeriesInstanceUID -> the unreadable input that held part of it
        self._where: dict[Path, tuple[Origin, str]] = {}  # DICOM file -> (its input, its path there)
        self.skipped: list[SkippedFile] = []
        # Cases made of a series that then grew or lost an input: their results must not be returned.
        self.withdrawn: list[Case] = []

    def _new_case(
        self, kind: SourceKind, stem: str, origin: Origin, files: list[Path], source: CaseSource
    ) -> Case:
        self._count += 1
        name, n = stem, 1
        while name.lower() in self._names:
            n += 1
            name = f"{stem}-{n}"
        self._names.add(name.lower())
        return Case(
            case_id=f"case-{self._count:04d}",
            kind=kind,
            output_name=name,
            origin=origin,
            files=files,
            source=source,
        )

    def _withdraw(self, series: _Series) -> None:
        for case in series.cases:
            self.withdrawn.append(case)
            self._names.discard(case.output_name.lower())
        series.cases = []

    def _skip(self, instance: DicomInstance, reason: str, kept: DicomInstance | None = None) -> None:
        origin, path = self._where[instance.path]
        self.skipped.append(SkippedFile(origin, path, reason, kept=self._where[kept.path] if kept else None))

    def _dicom_source(self, stack: Stack) -> CaseSource:
        first = stack.instances[0]
        location = PurePosixPath(self._where[first.path][1])
        return CaseSource(
            location=(location if first.frames > 1 or first.mosaic else location.parent).as_posix(),
            series_instance_uid=first.series_instance_uid,
            series_number=first.series_number,
            modality=first.modality,
            part=stack.part,
            files=len(stack.instances),
            frames=len(stack.frames) if stack.frames is not None else None,
        )

    def _chosen(self, stacks: list[Stack], *, record: bool = True) -> list[Stack]:
        """The stacks the ``volumes`` setting keeps; with ``record``, the others' files (or
        frames) are skipped, with why."""
        volumes = [s.volume for s in stacks if s.volume is not None]
        if not volumes:
            return stacks
        kept, reason = choose(volumes, self.volumes)
        chosen = []
        for stack in stacks:
            if stack.volume is None or stack.volume in kept:
                chosen.append(stack)
                continue
            if not record:
                continue
            what = f"{stack.part}: {reason}"
            if stack.frames is not None:
                what = f"frames {_ranges(stack.frames)} of this multi-frame image, {what}"
            for instance in stack.instances:
                self._skip(instance, what)
        return chosen

    def _stack_case(self, stack: Stack, stem: str, origin: Origin, label_files: list[Path]) -> Case:
        source = self._dicom_source(stack)
        case = self._new_case(SourceKind.DICOM, stem, origin, [i.path for i in stack.instances], source)
        case.instances = stack.instances
        case.frames = stack.frames
        case.label_file = _label_file_for(case.output_name, label_files)
        return case

    def broken(self, unpacked: UnpackedInput) -> None:
        """An input that failed: series it had begun to deliver are refused, not segmented partially."""
        for uid in unpacked.broken_series:
            self._broken[uid] = unpacked.item.index
            if uid in self._series:
                self._withdraw(self._series[uid])

    def add(self, result: Scan) -> list[Case]:
        """The cases this scan completes: its NIfTI volumes, multi-frame images and the series
        it delivered slices of (a series it grew replaces that series' earlier cases)."""
        origin = result.unpacked.item.origin
        self.skipped.extend(result.skipped)
        label = _opaque(result.unpacked) if self.opaque_names else _series_label(result.unpacked)
        cases = []
        grown: dict[str, _Series] = {}
        for instance in result.dicom:
            self._where[instance.path] = (origin, result.unpacked.relative(instance.path))
            if instance.frames > 1:  # an enhanced multi-frame image: a volume, or a 4D image's volumes
                image = _Series(
                    instance.series_instance_uid, origin, label, {instance.sop_instance_uid: instance}
                )
                if not self._selected(image, final=True):  # judged now, among the series seen so far
                    continue
                stacks = split_frames(instance)
                for stack in self._chosen(stacks):
                    stem = (
                        stem_of(label) if len(stacks) == 1 else f"{stem_of(label)}_p{stacks.index(stack) + 1}"
                    )
                    cases.append(self._stack_case(stack, stem, origin, result.label_files))
                continue
            uid = instance.series_instance_uid
            series = self._series.setdefault(uid, _Series(uid, origin, label))
            kept = series.instances.get(instance.sop_instance_uid)
            if kept is None:
                series.instances[instance.sop_instance_uid] = instance
                grown[uid] = series
            else:  # the same image twice (two exports of one study, or two encodings): one slice
                self._skip(instance, "same SOPInstanceUID as another file, which was kept (see kept)", kept)
        self._label_files[origin] = result.label_files
        for number, (stem, files) in enumerate(self._nifti_groups(result), start=1):
            if self.opaque_names:
                stem = f"{label}_{number}"
            source = CaseSource(location=result.unpacked.relative(files[0]), files=len(files))
            case = self._new_case(SourceKind.NIFTI, stem, origin, files, source)
            case.label_file = _label_file_for(stem, result.label_files)
            cases.append(case)
        for series in grown.values():
            self._withdraw(series)
        if result.unpacked.kind is not InputKind.ARCHIVE:
            # Loose files come one input per file: their series wait for finish(), else a folder
            # of 200 slices would make and withdraw 199 growing cases.
            return cases
        return cases + self._series_cases(list(grown.values()), final=False)

    def _nifti_groups(self, result: Scan) -> list[tuple[str, list[Path]]]:
        unpacked = result.unpacked
        singles: list[tuple[str, list[Path]]] = []
        sets: dict[tuple[Path, str], dict[int, Path]] = defaultdict(dict)
        for path in result.nifti:
            stem = stem_of(path.name)
            match = _CHANNEL.match(stem)
            if self.multi_modal and match:
                sets[(path.parent, match["id"])][int(match["channel"])] = path
            else:
                # nnU-Net names its single-channel inputs <case>_0000: the case is <case>.
                singles.append((match["id"] if match and match["channel"] == "0000" else stem, [path]))
        for (_, case_id), channels in sets.items():
            if sorted(channels) != list(range(len(channels))):
                for path in channels.values():
                    self.skipped.append(
                        SkippedFile(
                            unpacked.item.origin,
                            unpacked.relative(path),
                            f"the channels of its set are {sorted(channels)}, not 0..{len(channels) - 1}",
                        )
                    )
                continue
            singles.append((case_id, [channels[c] for c in sorted(channels)]))
        return singles

    def finish(self) -> list[Case]:
        """Every input is scanned: the series not yet cases become cases or are skipped, with reasons."""
        cases = self._series_cases(list(self._series.values()), final=True)
        self._series.clear()
        return cases

    def _series_cases(self, candidates: list[_Series], *, final: bool) -> list[Case]:
        """Cases for ``candidates`` (series without current cases), named after their archive
        or folder; with ``final``, skip reasons for what cannot become a case. Whatever goes
        wrong with one series skips that series, with the reason."""
        several = {label for label, n in Counter(s.label for s in self._series.values()).items() if n > 1}
        ordered = sorted(
            candidates, key=lambda s: (s.label, next(iter(s.instances.values())).series_number or 0)
        )
        cases = []
        for series in ordered:
            try:
                cases += self._cases_of(series, series.label in several, final=final)
            except Exception as exc:  # noqa: BLE001 - one series' surprise is that series' failure
                log.warning(
                    "series.failed",
                    series_instance_uid=series.uid,
                    error_type=type(exc).__name__,
                    reason=scrub(str(exc)),
                )
                if final and not series.cases:  # a series made into cases keeps them
                    reason = f"series could not be assembled: {type(exc).__name__}: {exc}"
                    for instance in series.instances.values():
                        self._skip(instance, reason)
        return cases

    def _cases_of(self, series: _Series, shares_label: bool, *, final: bool) -> list[Case]:
        if series.uid in self._broken:
            if final:
                reason = (
                    f"part of this series was in input {self._broken[series.uid]}, which could not be "
                    "read: not segmented as a partial volume"
                )
                for instance in series.instances.values():
                    self._skip(instance, reason)
            return []
        split = split_series(list(series.instances.values()))
        if final:
            for instance, reason in split.skipped:
                self._skip(instance, reason)
        stacks = self._chosen(split.stacks, record=final)  # the skips are recorded once, at the end
        if series.cases or not stacks or not self._selected(series, final=final):
            return []
        stem = stem_of(series.label)
        if shares_label:
            number = stacks[0].instances[0].series_number
            stem = f"{stem}_S{number if number is not None else self._position(series)}"
        origin, label_files = series.origin, self._label_files.get(series.origin, [])
        several = len(split.stacks) > 1
        series.cases = [
            self._stack_case(
                stack, f"{stem}_p{split.stacks.index(stack) + 1}" if several else stem, origin, label_files
            )
            for stack in stacks
        ]
        return series.cases

    def _selected(self, series: _Series, *, final: bool) -> bool:
        """Whether the selection rules choose ``series`` now. One that meets only rules that pick
        the newest series of its study waits for the last input (``final``); then the newest of
        the study's series that meet such a rule is chosen. At ``final`` an excluded series'
        files are skipped with each rule's first failed condition."""
        if self.selection is None:
            return True
        facts = SeriesFacts.of(list(series.instances.values()))
        met, failed = self.selection.verdict(facts)
        chosen = [rule.name for rule in met if not rule.newest]
        if not chosen and met and not final:
            return False  # its study's other series may still come
        for rule in [rule for rule in met if rule.newest and not chosen]:
            rivals = [
                SeriesFacts.of(list(other.instances.values()))
                for other in self._series.values()
                if other is not series and other.instances
            ]
            rivals = [r for r in rivals if r.study == facts.study and rule.failure(r) is None]
            newer = [r for r in rivals if r.acquired > facts.acquired]
            if newer:
                newest = max(newer, key=lambda r: r.acquired)
                failed[rule.name] = ("newest", f"series {newest.series_number} of its study is newer")
            else:
                chosen.append(rule.name)
        uid = series.uid
        if chosen:
            log.info("series.selected", series_instance_uid=uid, rules=chosen)
            return True
        if final:
            reason = "not selected: " + "; ".join(f"{name}: {text}" for name, (_, text) in failed.items())
            for instance in series.instances.values():
                self._skip(instance, reason)
            conditions = {name: condition for name, (condition, _) in failed.items()}
            log.info(
                "series.skipped", series_instance_uid=uid, files=len(series.instances), failed=conditions
            )
        return False

    def _position(self, series: _Series) -> int:
        """1-based place of a series without SeriesNumber among the series of its label."""
        same = [s for s in self._series.values() if s.label == series.label]
        same.sort(key=lambda s: next(iter(s.instances.values())).series_number or 0)
        return same.index(series) + 1

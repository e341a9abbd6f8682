"""Series pulled from a PACS: a request's inputs from a DICOMweb or DIMSE query.

A source is written as a destination is (:mod:`asyncflow.delivery.pacs`: its authentication and
TLS options, its calling AE title), with DICOM attributes as the query:

- ``dicomweb://host:port/path?StudyInstanceUID=…`` (or ``PatientID=…&StudyDate=…``, any
  attribute QIDO-RS searches series by): QIDO-RS lists the series, WADO-RS retrieves each;
- ``dimse://AET@host:port?StudyInstanceUID=…``: C-FIND at the SERIES level (Study Root) lists
  them, C-GET retrieves each on the same association (C-MOVE, which needs the PACS to know
  a destination of ours, is not used).

:func:`series_of` asks once and gives one :class:`~asyncflow.reading.request.RemoteObject` per
series (key ``<StudyInstanceUID>/<SeriesInstanceUID>``), fetched when the pipeline is ready
for it (the fetch window, as a FLAME node's objects are): :meth:`PacsStore.fetch` writes the
series' instances into an uncompressed TAR, one member per instance, which goes through the
pipeline as an archive's members do. What the PACS could not be reached for (a refused
connection, a timeout, HTTP 5xx, an association not accepted) is tried again, ``tries``
times; a series it no longer has, or refuses (HTTP 4xx, a C-GET failure status), is lost
alone, with the reason.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import pydicom
from pydicom.datadict import tag_for_keyword

from asyncflow.delivery.pacs import Destination, http_session, parse_destination, short_reason
from asyncflow.enums import InputFailure
from asyncflow.errors import RequestError
from asyncflow.reading.request import FetchFailed, RemoteObject

__all__ = ["SCHEMES", "PacsStore", "is_source", "series_of"]

SCHEMES = ("dicomweb://", "dicomwebs://", "dimse://")


def is_source(text: object) -> bool:
    """Whether an input names a PACS query rather than a file."""
    return isinstance(text, str) and text.startswith(SCHEMES)


def _parse(text: str) -> tuple[Destination, dict[str, str]]:
    """The PACS a source names, and its query (DICOM keyword -> value)."""
    parts = urlsplit(text)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = {key: value for key, value in pairs if tag_for_keyword(key) is not None}
    options = [(key, value) for key, value in pairs if tag_for_keyword(key) is None]
    try:
        destination = parse_destination(urlunsplit(parts._replace(query=urlencode(options))))
    except ValueError as exc:
        raise RequestError(f"source: {exc}") from None
    if not query:
        raise RequestError(
            f"source {destination.text}: name what to pull by DICOM attributes, e.g. "
            "?StudyInstanceUID=1.2.3 or ?PatientID=X&StudyDate=20260101 (a whole PACS is never pulled)"
        )
    return destination, query


@dataclass(frozen=True)
class _Series:
    study: str
    series: str


class _Refused(Exception):
    """The PACS answered, and refused: trying again would not help."""


class PacsStore:
    """Retrieves series from one PACS into TARs (the store of :func:`series_of`'s objects)."""

    def __init__(self, destination: Destination, *, tries: int = 3, backoff_s: float = 1.0) -> None:
        self.destination, self.tries, self.backoff_s = destination, tries, backoff_s

    async def fetch(self, obj: RemoteObject, target: Path) -> int:
        """The series ``obj`` names into ``target`` (an uncompressed TAR); the tries it took.
        Raises :class:`FetchFailed`."""
        study, _, series = obj.key.partition("/")
        last, wait = "no try made", self.backoff_s
        for tries in range(1, self.tries + 1):
            try:
                count = await anyio.to_thread.run_sync(self._retrieve, _Series(study, series), target)
            except _Refused as exc:
                target.unlink(missing_ok=True)
                raise FetchFailed(InputFailure.FETCH_REFUSED, f"refused: {exc}", tries) from None
            except Exception as exc:  # noqa: BLE001 - unreachable, timed out, a server error: try again
                target.unlink(missing_ok=True)
                last = short_reason(exc)
            else:
                if count == 0:
                    target.unlink(missing_ok=True)
                    raise FetchFailed(
                        InputFailure.NOT_FOUND, "the PACS holds no instance of the series", tries
                    )
                return tries
            if tries < self.tries:
                await anyio.sleep(wait)
                wait *= 2
        raise FetchFailed(
            InputFailure.FETCH_FAILED, f"not retrieved on each of {self.tries} tries: {last}", self.tries
        )

    def _retrieve(self, series: _Series, target: Path) -> int:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(target, "w") as tar:
            add = _adder(tar, series.series)
            if self.destination.kind == "dicomweb":
                return self._wado(series, add)
            return self._c_get(series, add)

    def _wado(self, series: _Series, add: Callable[[str, bytes], None]) -> int:
        import requests
        from dicomweb_client.api import DICOMwebClient

        assert self.destination.url is not None
        client = DICOMwebClient(self.destination.url, session=http_session(self.destination), timeout=60)
        client.set_http_retry_params(retry=False)
        count = 0
        try:
            for ds in client.iter_series(series.study, series.series):
                buffer = io.BytesIO()
                pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
                add(str(ds.SOPInstanceUID), buffer.getvalue())
                count += 1
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 404:
                return 0
            if 400 <= status < 500:
                raise _Refused(f"HTTP {status} from the WADO-RS service") from exc
            raise
        return count

    def _c_get(self, series: _Series, add: Callable[[str, bytes], None]) -> int:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

        ae = AE(ae_title=self.destination.calling_aet)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        classes = [cx.abstract_syntax for cx in StoragePresentationContexts[:127] if cx.abstract_syntax]
        for sop_class in classes:
            ae.add_requested_context(sop_class, ALL_TRANSFER_SYNTAXES)
        count, code = 0, None

        def store(event: Any) -> int:
            nonlocal count
            add(str(event.request.AffectedSOPInstanceUID), event.encoded_dataset(include_meta=True))
            count += 1
            return 0x0000

        association = ae.associate(
            self.destination.host,
            self.destination.port,
            ae_title=self.destination.called_aet or "",
            ext_neg=[build_role(sop_class, scp_role=True) for sop_class in classes],
            evt_handlers=[(evt.EVT_C_STORE, store)],
        )
        if not association.is_established:
            raise ConnectionError(f"no association with {self.destination.text}")
        try:
            identifier = _identifier({"StudyInstanceUID": series.study, "SeriesInstanceUID": series.series})
            for status, _ in association.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
                code = int(status.Status) if status and "Status" in status else None
            if code is None:
                raise ConnectionError("the association ended before the C-GET was answered")
        finally:
            association.release()
        if code not in (0x0000, 0xB000) and not count:
            # A PACS may answer a series it does not hold with a failure (Orthanc: 0xC000): ask.
            keys = {"StudyInstanceUID": series.study, "SeriesInstanceUID": series.series}
            if not _c_find(self.destination, keys):
                return 0
            raise _Refused(f"C-GET status 0x{code:04X}")
        return count


def _adder(tar: tarfile.TarFile, folder: str) -> Callable[[str, bytes], None]:
    def add(sop: str, data: bytes) -> None:
        member = tarfile.TarInfo(f"{folder}/{sop}.dcm")
        member.size, member.mtime = len(data), int(time.time())
        tar.addfile(member, io.BytesIO(data))

    return add


def _identifier(keys: dict[str, str]) -> pydicom.Dataset:
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    return identifier


def _qido(destination: Destination, query: dict[str, str]) -> list[_Series]:
    from dicomweb_client.api import DICOMwebClient

    assert destination.url is not None
    client = DICOMwebClient(destination.url, session=http_session(destination), timeout=60)
    client.set_http_retry_params(retry=False)  # one question: its failure stops the request at once
    found = client.search_for_series(search_filters=query, get_remaining=True, fields=["StudyInstanceUID"])
    return [_Series(item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]) for item in found]


def _c_find(destination: Destination, query: dict[str, str]) -> list[_Series]:
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    ae = AE(ae_title=destination.calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    association = ae.associate(destination.host, destination.port, ae_title=destination.called_aet or "")
    if not association.is_established:
        raise ConnectionError(f"no association with {destination.text}")
    found = []
    try:
        keys = {"StudyInstanceUID": "", "SeriesInstanceUID": "", **query}
        for status, answer in association.send_c_find(
            _identifier(keys), StudyRootQueryRetrieveInformationModelFind
        ):
            code = int(status.Status) if status and "Status" in status else None
            if code in (0xFF00, 0xFF01) and answer is not None:
                found.append(_Series(str(answer.StudyInstanceUID), str(answer.SeriesInstanceUID)))
            elif code not in (0x0000, 0xFF00, 0xFF01):
                raise RequestError(f"source {destination.text}: C-FIND answered {_hex(code)}")
    finally:
        association.release()
    return found


def _hex(code: int | None) -> str:
    return "nothing (does the PACS know this calling AE title?)" if code is None else f"status 0x{code:04X}"


def series_of(text: str, *, tries: int = 3, backoff_s: float = 1.0) -> list[RemoteObject]:
    """The series a source's query finds, each an object to fetch (in study and series order);
    RequestError when the PACS cannot be asked or finds none."""
    destination, query = _parse(text)
    try:
        found = _qido(destination, query) if destination.kind == "dicomweb" else _c_find(destination, query)
    except RequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever stops the query stops the request, in a few words
        raise RequestError(f"source {destination.text}: the query failed: {short_reason(exc)}") from None
    if not found:
        raise RequestError(f"source {destination.text}: no series matches {query}")
    store = PacsStore(destination, tries=tries, backoff_s=backoff_s)
    unique = sorted({(s.study, s.series) for s in found})
    return [RemoteObject(f"{study}/{series}", 0, destination.text, store) for study, series in unique]

"""Sending a case's DICOM objects to a PACS: DICOMweb STOW-RS or DIMSE C-STORE.

A destination is written as a URL (:func:`parse_destination`):

- ``dicomweb://host:port/path`` (``dicomwebs://`` for HTTPS): STOW-RS to
  ``http://host:port/path/studies``, with dicomweb-client;
- ``dimse://AET@host:port``: C-STORE to the application entity ``AET``, with pynetdicom,
  as the calling AE title ``ASYNCFLOW``.

:meth:`Sender.send` sends one case's objects and returns a :class:`Delivery`: ``sent``,
or ``failed`` with the reason. What the PACS could not be reached for (a refused
connection, a timeout, an HTTP 5xx, an association that was not accepted) is tried
again, ``tries`` times in all, the wait doubling from ``backoff_s``; what it refuses
(an HTTP 4xx, a failed STOW-RS instance, a C-STORE failure status) is not. A PACS that
already holds an object keeps one copy: the SEG's UIDs are the same for the same case,
model and settings.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import pydicom

from asyncflow.artifact import Delivery

__all__ = ["CALLING_AET", "Destination", "Sender", "parse_destination"]

CALLING_AET = "ASYNCFLOW"
_DICOMWEB = ("dicomweb", "dicomwebs")


class _Refused(Exception):
    """The PACS answered, and refused: trying again would not help."""


@dataclass(frozen=True)
class Destination:
    """Where a case's objects go: ``text`` as the user wrote it, less any password."""

    kind: Literal["dicomweb", "dimse"]
    host: str
    port: int
    text: str
    url: str | None = None  # DICOMweb: the service's base URL
    called_aet: str | None = None  # DIMSE: the PACS' AE title

    def __str__(self) -> str:
        return self.text


def parse_destination(text: str) -> Destination:
    """``dicomweb://host:port/path``, ``dicomwebs://…`` or ``dimse://AET@host:port``;
    ValueError says what is accepted."""
    parts = urlsplit(text.strip())
    usage = (
        "a destination is dicomweb://host:port/path (STOW-RS; dicomwebs:// for HTTPS) or "
        f"dimse://AET@host:port (C-STORE), got {text!r}"
    )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(usage) from None
    if parts.scheme in _DICOMWEB and parts.hostname:
        scheme = "https" if parts.scheme == "dicomwebs" else "http"
        port = port or (443 if scheme == "https" else 80)
        url = f"{scheme}://{parts.hostname}:{port}{parts.path.rstrip('/')}"
        return Destination(
            "dicomweb", parts.hostname, port, f"{parts.scheme}://{parts.hostname}:{port}{parts.path}", url
        )
    if parts.scheme == "dimse" and parts.hostname and port and parts.username and not parts.path.strip("/"):
        if len(parts.username) > 16:
            raise ValueError(f"an AE title has at most 16 characters, got {parts.username!r}")
        return Destination(
            "dimse",
            parts.hostname,
            port,
            f"dimse://{parts.username}@{parts.hostname}:{port}",
            called_aet=parts.username,
        )
    raise ValueError(usage)


class Sender:
    """Sends each case's objects to one destination (thread-safe: one connection per call)."""

    def __init__(
        self, destination: Destination, *, tries: int = 3, backoff_s: float = 1.0, timeout_s: float = 30.0
    ) -> None:
        self.destination, self.tries, self.backoff_s, self.timeout_s = (
            destination,
            tries,
            backoff_s,
            timeout_s,
        )

    def send(self, objects: Sequence[bytes]) -> Delivery:
        """Send ``objects`` (DICOM Part 10 bytes); the :class:`Delivery`, never an exception."""
        datasets = [pydicom.dcmread(io.BytesIO(data)) for data in objects]
        started, wait, reason = time.monotonic(), self.backoff_s, "not tried"
        for attempt in range(1, self.tries + 1):
            try:
                if self.destination.kind == "dicomweb":
                    self._stow(datasets)
                else:
                    self._c_store(datasets)
                return self._delivery("sent", len(objects), attempt, started)
            except _Refused as exc:
                return self._delivery("failed", len(objects), attempt, started, f"refused: {exc}")
            except Exception as exc:  # noqa: BLE001 - unreachable, timed out, a server error: try again
                reason = f"{type(exc).__name__}: {exc}"
            if attempt < self.tries:
                time.sleep(wait)
                wait *= 2
        tried = f"on each of {self.tries} tries" if self.tries > 1 else "on its one try"
        return self._delivery("failed", len(objects), self.tries, started, f"not reached {tried}: {reason}")

    def _delivery(
        self,
        status: Literal["sent", "failed"],
        objects: int,
        tries: int,
        started: float,
        reason: str | None = None,
    ) -> Delivery:
        return Delivery(self.destination.text, status, objects, tries, time.monotonic() - started, reason)

    def _stow(self, datasets: Sequence[pydicom.Dataset]) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        assert self.destination.url is not None
        client = DICOMwebClient(self.destination.url, timeout=self.timeout_s)
        client.set_http_retry_params(retry=False)  # the tries and waits are the Sender's
        try:
            response = client.store_instances(datasets)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if 400 <= status < 500:
                raise _Refused(f"HTTP {status} from the STOW-RS service") from exc
            raise
        failed = list(response.get("FailedSOPSequence") or []) if response is not None else []
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise _Refused(
                f"{len(failed)} of {len(datasets)} object(s) not stored (FailureReason {', '.join(reasons)})"
            )
        # PS3.18: each stored object is in ReferencedSOPSequence; one in neither list was not stored.
        confirmed = response.get("ReferencedSOPSequence") or [] if response is not None else []
        stored = {str(item.get("ReferencedSOPInstanceUID")) for item in confirmed}
        missing = sum(str(ds.SOPInstanceUID) not in stored for ds in datasets)
        if missing:
            raise _Refused(
                f"the STOW-RS service confirmed {len(datasets) - missing} of {len(datasets)} object(s)"
            )

    def _c_store(self, datasets: Sequence[pydicom.Dataset]) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=CALLING_AET)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assert self.destination.called_aet is not None
        association = ae.associate(
            self.destination.host, self.destination.port, ae_title=self.destination.called_aet
        )
        if not association.is_established:
            raise ConnectionError(
                f"no association with {self.destination.called_aet} at {self.destination.host}:{self.destination.port}"
            )
        try:
            for ds in datasets:
                status = association.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
                if code is None:
                    raise ConnectionError("the association ended before the C-STORE was answered")
                if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:  # success or warning
                    raise _Refused(f"C-STORE status 0x{code:04X}")
        finally:
            association.release()

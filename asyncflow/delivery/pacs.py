"""Sending a case's DICOM objects to a PACS: DICOMweb STOW-RS or DIMSE C-STORE.

A destination is written as a URL (:func:`parse_destination`):

- ``dicomweb://host:port/path`` (``dicomwebs://`` for HTTPS): STOW-RS to
  ``http://host:port/path/studies``, with dicomweb-client;
- ``dimse://AET@host:port``: C-STORE to the application entity ``AET``, with pynetdicom,
  as the calling AE title ``ASYNCFLOW`` (``?calling_aet=`` another).

A DICOMweb service that asks who is calling gets HTTP basic authentication for a user named
in the URL (``dicomweb://alice@host/...``), its password read from the file ``?password_file=``
or the environment variable ``ASYNCFLOW_SEND_PASSWORD``; or a bearer token from
``?token_file=`` or ``ASYNCFLOW_SEND_TOKEN``. HTTPS takes ``?ca_bundle=`` (the CA
certificates to trust) and ``?client_cert=`` / ``?client_key=`` (PEM files). A password is
never taken from the URL: a command line is seen by every user of the machine and a
destination is written into reports and manifests (:attr:`Destination.text`, which holds
no secret and no option). Secrets are read when a :class:`Sender` is made, and kept only in
its HTTP session.

:meth:`Sender.send` sends one case's objects and returns a :class:`Delivery`: ``sent``,
or ``failed`` with a short reason (``connection refused``, ``HTTP 401 from the STOW-RS
service``: never a retry dump). What the PACS could not be reached for (a refused
connection, a timeout, an HTTP 5xx, an association that was not accepted) is tried
again, ``tries`` times in all, the wait doubling from ``backoff_s``; what it refuses
(an HTTP 4xx, a failed STOW-RS instance, a C-STORE failure status) is not. A PACS that
already holds an object keeps one copy: the SEG's UIDs are the same for the same case,
model and settings.
"""

from __future__ import annotations

import io
import os
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import pydicom

from asyncflow.artifact import Delivery

__all__ = [
    "CALLING_AET",
    "PASSWORD_ENV",
    "TOKEN_ENV",
    "Destination",
    "Sender",
    "http_session",
    "parse_destination",
    "short_reason",
]

CALLING_AET = "ASYNCFLOW"
PASSWORD_ENV, TOKEN_ENV = "ASYNCFLOW_SEND_PASSWORD", "ASYNCFLOW_SEND_TOKEN"
_DICOMWEB = ("dicomweb", "dicomwebs")
# The options a destination URL takes (?key=value), by kind.
_FILES = ("password_file", "token_file", "ca_bundle", "client_cert", "client_key")
_OPTIONS = {"dicomweb": frozenset(_FILES), "dimse": frozenset({"calling_aet"})}


class _Refused(Exception):
    """The PACS answered, and refused: trying again would not help."""


@dataclass(frozen=True)
class Destination:
    """Where a case's objects go: ``text`` as the user wrote it, less any password."""

    kind: Literal["dicomweb", "dimse"]
    host: str
    port: int
    text: str  # where it goes (its identity in reports and journals): no secret, no option
    url: str | None = None  # DICOMweb: the service's base URL
    called_aet: str | None = None  # DIMSE: the PACS' AE title
    calling_aet: str = CALLING_AET  # DIMSE: asyncflow's AE title
    user: str | None = None  # DICOMweb: HTTP basic authentication as this user
    password_file: Path | None = None  # ... with the password in this file (else PASSWORD_ENV)
    token_file: Path | None = None  # DICOMweb: a bearer token in this file (else TOKEN_ENV, if set)
    ca_bundle: Path | None = None  # HTTPS: the CA certificates to trust (PEM)
    client_cert: Path | None = None  # HTTPS: the client's certificate (PEM, its key too unless client_key)
    client_key: Path | None = None

    def __str__(self) -> str:
        return self.text


def _aet(value: str, what: str) -> str:
    if not 0 < len(value) <= 16 or not value.isascii() or "\\" in value:
        raise ValueError(f"{what} is 1 to 16 ASCII characters, got {value!r}")
    return value


def parse_destination(text: str) -> Destination:
    """``dicomweb://[user@]host:port/path[?options]``, ``dicomwebs://…`` or
    ``dimse://AET@host:port[?calling_aet=AET]``; ValueError says what is accepted (and never
    repeats a password)."""
    parts = urlsplit(text.strip())
    shown = text.replace(f":{parts.password}@", ":***@") if parts.password else text
    usage = (
        "a destination is dicomweb://host:port/path (STOW-RS; dicomwebs:// for HTTPS) or "
        f"dimse://AET@host:port (C-STORE), got {shown!r}"
    )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(usage) from None
    if parts.password is not None:
        raise ValueError(
            f"{shown}: a password is never read from the URL (a command line is seen by every user of "
            f"this machine, a destination is written into reports): put it in a file named by "
            f"?password_file= or in the environment variable {PASSWORD_ENV}"
        )
    kind: Literal["dicomweb", "dimse"] = "dicomweb" if parts.scheme in _DICOMWEB else "dimse"
    options = _options(parts.query, kind, shown)
    if parts.scheme in _DICOMWEB and parts.hostname:
        scheme = "https" if parts.scheme == "dicomwebs" else "http"
        if scheme == "http" and {"ca_bundle", "client_cert", "client_key"} & set(options):
            raise ValueError(f"{shown}: ca_bundle, client_cert and client_key are for dicomwebs:// (HTTPS)")
        port = port or (443 if scheme == "https" else 80)
        url = f"{scheme}://{parts.hostname}:{port}{parts.path.rstrip('/')}"
        user = f"{parts.username}@" if parts.username else ""
        destination = Destination(
            "dicomweb",
            parts.hostname,
            port,
            f"{parts.scheme}://{user}{parts.hostname}:{port}{parts.path}",
            url,
            user=parts.username or None,
            password_file=_path(options, "password_file"),
            token_file=_path(options, "token_file"),
            ca_bundle=_path(options, "ca_bundle"),
            client_cert=_path(options, "client_cert"),
            client_key=_path(options, "client_key"),
        )
        _credentials(destination)  # a user without a password, a file that is not there: now
        return destination
    if parts.scheme == "dimse" and parts.hostname and port and parts.username and not parts.path.strip("/"):
        return Destination(
            "dimse",
            parts.hostname,
            port,
            f"dimse://{parts.username}@{parts.hostname}:{port}",
            called_aet=_aet(parts.username, "an AE title"),
            calling_aet=_aet(options.get("calling_aet", CALLING_AET), "calling_aet"),
        )
    raise ValueError(usage)


def _options(query: str, kind: str, shown: str) -> dict[str, str]:
    """The ``?key=value`` options of a destination of ``kind``: each known, given once, its file there."""
    try:
        given = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"{shown}: options are ?key=value&key=value") from None
    options = {}
    for key, values in given.items():
        if key not in _OPTIONS[kind] or len(values) != 1 or not values[0]:
            known = ", ".join(sorted(_OPTIONS[kind]))
            raise ValueError(
                f"{shown}: {key!r} is not an option of a {kind} destination (once each: {known})"
            )
        if key in _FILES and not Path(values[0]).is_file():
            raise ValueError(f"{shown}: {key} {values[0]} is not a file")
        options[key] = values[0]
    return options


def _path(options: dict[str, str], key: str) -> Path | None:
    return Path(options[key]) if key in options else None


def _secret(file: Path | None, variable: str) -> str | None:
    """A secret from ``file`` (its first line), else from the environment ``variable``."""
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"{file} cannot be read: {exc.strerror}") from None
        return lines[0] if lines else ""
    return os.environ.get(variable)


def _credentials(destination: Destination) -> tuple[str, str] | str | None:
    """(user, password) for HTTP basic, a bearer token, or None."""
    if destination.user is not None:
        if destination.token_file is not None:
            raise ValueError(f"{destination.text}: a user (basic authentication) or a token_file, not both")
        password = _secret(destination.password_file, PASSWORD_ENV)
        if password is None:
            raise ValueError(
                f"{destination.text} names a user: give the password in a file (?password_file=) or "
                f"in the environment variable {PASSWORD_ENV}"
            )
        return destination.user, password
    if destination.password_file is not None:
        raise ValueError(f"{destination.text}: a password_file needs a user (dicomweb://USER@host...)")
    return _secret(destination.token_file, TOKEN_ENV)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (causes, contexts, urllib3's reasons, exceptions in its args)."""
    seen, queue = set(), [exc]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        queue += [e for e in wrapped if isinstance(e, BaseException)]


def short_reason(exc: BaseException) -> str:
    """What went wrong in a few words: ``connection refused``, ``timed out``, ``host not found``,
    ``TLS certificate not trusted: …``, ``HTTP 503 from the STOW-RS service``; else the error's
    type and the first line of its message."""
    import requests

    for cause in _causes(exc):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "host not found"
        if isinstance(cause, TimeoutError | requests.Timeout):
            return "timed out"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {cause.verify_message}"
        if isinstance(cause, ssl.SSLEOFError):
            return "TLS: the server ended the handshake (does it want a client certificate?)"
        if isinstance(cause, ssl.SSLError) and "CERTIFICATE_REQUIRED" in str(cause.reason):
            return "TLS: the server wants a client certificate"  # its alert came before the end
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or cause}"
        if isinstance(cause, requests.HTTPError) and cause.response is not None:
            return f"HTTP {cause.response.status_code} from the STOW-RS service"
    message = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


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
        self._session = http_session(destination) if destination.kind == "dicomweb" else None

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
                reason = short_reason(exc)
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
        client = DICOMwebClient(self.destination.url, session=self._session, timeout=self.timeout_s)
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

        ae = AE(ae_title=self.destination.calling_aet)
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


def http_session(destination: Destination) -> Any:
    """The HTTP session of a DICOMweb destination: its authentication and TLS options."""
    import requests

    class Session(requests.Session):
        """requests lets REQUESTS_CA_BUNDLE (and CURL_CA_BUNDLE) override a session's own CA
        bundle (psf/requests#3829); given to each request, the destination's own wins."""

        def request(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
            if destination.ca_bundle is not None:
                kwargs.setdefault("verify", str(destination.ca_bundle))
            return super().request(method, url, *args, **kwargs)

    session = Session()
    credentials = _credentials(destination)
    if isinstance(credentials, tuple):
        session.auth = requests.auth.HTTPBasicAuth(*credentials)
    elif credentials is not None:
        session.headers["Authorization"] = f"Bearer {credentials}"
    if destination.client_cert is not None:
        cert, key = destination.client_cert, destination.client_key
        session.cert = (str(cert), str(key)) if key is not None else str(cert)
    return session

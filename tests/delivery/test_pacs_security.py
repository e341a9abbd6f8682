"""Sending to a PACS that asks who is calling: HTTP basic authentication against an Orthanc with
users, a bearer token through a gateway in front of Orthanc, HTTPS with a client certificate
through a TLS gateway (Python's ssl; certificates made by ``openssl``), DIMSE with a calling AE title of the user's. A secret never
reaches any output: the test plants one and greps every file, log line and console line."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from helpers import dicom_bytes, phantom_backend
from pacs import DICOMWEB_PLUGIN, ORTHANC, TlsFiles, orthanc, tls_files

from asyncflow.cli import main
from asyncflow.cli.synthetic import dicom_series_datasets, make_phantom
from asyncflow.delivery.pacs import PASSWORD_ENV, TOKEN_ENV
from asyncflow.errors import SettingsError
from asyncflow.settings import Settings

pytestmark = pytest.mark.skipif(
    (ORTHANC is None or not DICOMWEB_PLUGIN.is_file() or shutil.which("openssl") is None)
    and not os.environ.get("CI"),
    reason="Orthanc, orthanc-dicomweb (Debian) or openssl are not installed",
)
SECRET = "pl4nted-S3cret-7f3a"
FAST = ["--no-mirroring", "--threads", "1", "--device", "cpu", "--set", "send_backoff_s=0.1"]


@pytest.fixture(autouse=True)
def _no_secrets_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def _inputs(folder: Path, rng: np.random.Generator) -> Path:
    for number in (1, 2):
        series = folder / f"series{number}"
        series.mkdir(parents=True)
        for k, ds in enumerate(dicom_series_datasets(make_phantom(rng, (8, 24, 24)), series_number=number)):
            (series / f"{k:03d}.dcm").write_bytes(dicom_bytes(ds))
    return folder


def _run(
    inputs: Path, out: Path, destination: str, capsys: pytest.CaptureFixture[str], *more: str
) -> tuple[int, dict[str, Any], str]:
    """A run sending to ``destination``, its events into a log file: its exit code, its
    report, and everything it wrote (files, log, console) as one text."""
    log = out.parent / f"{out.name}.log.jsonl"
    options = ["--send", destination, "--log-file", str(log), *more, *FAST]
    code = main(["run", str(inputs), "-o", str(out), *options], backend=phantom_backend())
    console = capsys.readouterr()
    written = [path.read_bytes() for path in [*out.rglob("*"), log] if path.is_file()]
    everything = b"\n".join([*written, console.out.encode(), console.err.encode()])
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return code, report, everything.decode("utf-8", errors="replace")


def test_basic_authentication_with_the_password_in_a_file_or_the_environment_and_never_in_an_output(
    tmp_path: Path,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = _inputs(tmp_path / "in", rng)
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    with orthanc(tmp_path / "pacs", users={"alice": SECRET}) as pacs:
        user = pacs.dicomweb.replace("://", "://alice@")
        code, report, written = _run(inputs, tmp_path / "out", f"{user}?password_file={secret_file}", capsys)
        assert code == 0 and [c["delivery"]["status"] for c in report["cases"]] == ["sent", "sent"]
        assert len(pacs.sop_instance_uids()) == 2
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["settings"]["send"] == user.split("?")[0]  # where it went, and as whom
        assert SECRET not in written
        monkeypatch.setenv(PASSWORD_ENV, SECRET)
        code, report, written = _run(inputs, tmp_path / "env", user, capsys)
        assert code == 0 and SECRET not in written
        monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
        code, report, written = _run(inputs, tmp_path / "wrong", user, capsys)
        assert code == 1 and report["status"] == "partial"
        for case in report["cases"]:  # refused: not tried again
            assert case["delivery"]["reason"] == "refused: HTTP 401 from the STOW-RS service"
            assert case["delivery"]["tries"] == 1
        # Without a user, the PACS says who may not: the same short reason.
        code, report, _ = _run(inputs, tmp_path / "anonymous", pacs.dicomweb, capsys)
        assert code == 1 and report["cases"][0]["delivery"]["reason"].endswith(
            "HTTP 401 from the STOW-RS service"
        )


def test_a_password_in_the_url_is_refused_without_being_repeated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings(send=f"dicomweb://alice:{SECRET}@127.0.0.1:8042/dicom-web")
    assert SECRET not in str(refused.value) and PASSWORD_ENV in str(refused.value)
    code = main(["run", "in", "-o", "out", "--send", f"dicomweb://alice:{SECRET}@127.0.0.1:8042/dicom-web"])
    console = capsys.readouterr()
    assert code == 2 and SECRET not in console.out + console.err and "password_file" in console.err
    for wrong, said in (
        ("dicomweb://alice@127.0.0.1:8042/dicom-web", f"in the environment variable {PASSWORD_ENV}"),
        ("dicomweb://127.0.0.1:8042/dicom-web?ca_bundle=/etc/hosts", "are for dicomwebs://"),
        ("dicomwebs://127.0.0.1/dicom-web?ca_bundle=/no/such.pem", "ca_bundle /no/such.pem is not a file"),
        ("dicomweb://127.0.0.1/dicom-web?verify=no", "'verify' is not an option of a dicomweb destination"),
        ("dimse://PACS@127.0.0.1:104?calling_aet=MUCH_TOO_LONG_AE_TITLE", "calling_aet is 1 to 16"),
    ):
        with pytest.raises(SettingsError, match=said):
            Settings(send=wrong)


class _Gateway(http.server.BaseHTTPRequestHandler):
    """A gateway in front of Orthanc: a request is passed on, unless a bearer ``token`` is asked
    for and it lacks it (401)."""

    token: str | None = None
    port = 0

    def _forward(self) -> None:
        if self.token is not None and self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "host")}
        upstream = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def _gateway(upstream_port: int, token: str | None = None, tls: TlsFiles | None = None) -> Iterator[int]:
    """A gateway to the Orthanc at ``upstream_port`` on a port of its own: asking for ``token``;
    with ``tls``, HTTPS only, for clients with a certificate of its CA."""
    handler = type("Gateway", (_Gateway,), {"token": token, "port": upstream_port})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls.server_cert), str(tls.server_key))
        context.load_verify_locations(str(tls.ca))
        context.verify_mode = ssl.CERT_REQUIRED
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_a_bearer_token_from_a_file_or_the_environment_reaches_the_gateway_and_no_output(
    tmp_path: Path,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = _inputs(tmp_path / "in", rng)
    token_file = tmp_path / "token"
    token_file.write_text(SECRET, encoding="utf-8")
    with orthanc(tmp_path / "pacs") as pacs, _gateway(pacs.http_port, SECRET) as port:
        gateway = f"dicomweb://127.0.0.1:{port}/dicom-web"
        code, report, written = _run(inputs, tmp_path / "file", f"{gateway}?token_file={token_file}", capsys)
        assert code == 0 and pacs.received() == 2 and SECRET not in written
        monkeypatch.setenv(TOKEN_ENV, SECRET)
        code, report, written = _run(inputs, tmp_path / "env", gateway, capsys)
        assert code == 0 and pacs.received() == 4 and SECRET not in written
        monkeypatch.delenv(TOKEN_ENV)
        code, report, _ = _run(inputs, tmp_path / "none", gateway, capsys)
        assert (
            code == 1
            and report["cases"][0]["delivery"]["reason"] == "refused: HTTP 401 from the STOW-RS service"
        )


def test_https_with_the_pacs_ca_and_a_client_certificate(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = _inputs(tmp_path / "in", rng)
    tls = tls_files(tmp_path / "tls")
    with orthanc(tmp_path / "pacs") as pacs, _gateway(pacs.http_port, tls=tls) as port:
        https = f"dicomwebs://127.0.0.1:{port}/dicom-web"
        client = f"client_cert={tls.client_cert}&client_key={tls.client_key}"
        code, report, _ = _run(inputs, tmp_path / "ok", f"{https}?ca_bundle={tls.ca}&{client}", capsys)
        assert code == 0 and len(pacs.sop_instance_uids()) == 2
        code, report, _ = _run(inputs, tmp_path / "untrusted", f"{https}?{client}", capsys)
        reason = report["cases"][0]["delivery"]["reason"]
        assert code == 1 and reason.startswith(
            "not reached on each of 3 tries: TLS certificate not trusted: "
        )
        code, report, _ = _run(inputs, tmp_path / "anonymous", f"{https}?ca_bundle={tls.ca}", capsys)
        reason = report["cases"][0]["delivery"]["reason"]
        # TLS 1.3 asks for the certificate after the client's handshake is done: the client reads
        # either the server's alert or the end of the connection, whichever its read meets first.
        assert code == 1 and reason in (
            "not reached on each of 3 tries: TLS: the server ended the handshake (does it want a client certificate?)",
            "not reached on each of 3 tries: TLS: the server wants a client certificate",
        )
        assert pacs.received() == 2


def test_dimse_calls_with_the_ae_title_the_user_gives(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = _inputs(tmp_path / "in", rng)
    with orthanc(tmp_path / "pacs") as pacs:
        code, report, _ = _run(inputs, tmp_path / "default", pacs.dimse, capsys)
        assert code == 0 and pacs.callers() == ["ASYNCFLOW"] * 2
        code, report, _ = _run(inputs, tmp_path / "mine", f"{pacs.dimse}?calling_aet=RADIOLOGY_AI", capsys)
        assert code == 0 and pacs.callers()[2:] == ["RADIOLOGY_AI"] * 2
        assert report["cases"][0]["delivery"]["destination"] == pacs.dimse  # its identity: no option
    seg = next((tmp_path / "mine" / "dicom_seg").glob("*.dcm"))
    assert pydicom.dcmread(seg).Modality == "SEG"

"""A real PACS for tests: Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``) on localhost.

:func:`orthanc` starts an Orthanc process on ports it chooses, with its DICOMweb plugin, a
storage folder of the test's own and, when asked, a Lua filter that refuses every object of
one PatientID (a PACS rule that refuses one object and accepts the rest) and registered users
(HTTP basic authentication); it is stopped after the test. :func:`tls_files` makes a CA and
certificates with the ``openssl`` command for an HTTPS gateway in front of it (Debian's
Orthanc 1.10.1 resets every HTTPS connection of its own right after the handshake here). :class:`Orthanc` reads back what
it holds through QIDO-RS, and counts what it received and from which calling AE title (a Lua
filter logs each object as it arrives).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AET = "ORTHANC"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and its key, and a client certificate and key,
    all signed by the CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def tls_files(folder: Path) -> TlsFiles:
    """Make a CA and certificates signed by it with the ``openssl`` command."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=asyncflow test CA")  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n", encoding="utf-8")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=asyncflow")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", subject)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *(["-extfile", "san.ext"] if name == "server" else []))  # fmt: skip
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    return TlsFiles(*(folder / name for name in names))


class Orthanc:
    """A running Orthanc: where it listens, and what it holds."""

    def __init__(
        self,
        folder: Path,
        refuse_patient_id: str | None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.http_port, self.dicom_port = _free_port(), _free_port()
        self.dicomweb = f"dicomweb://127.0.0.1:{self.http_port}/dicom-web"
        self.dimse = f"dimse://{AET}@127.0.0.1:{self.dicom_port}"
        self._authorization = None
        if users:
            user, password = next(iter(users.items()))
            self._authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        config: dict[str, Any] = {
            "Name": "asyncflow-test",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users),
            "RegisteredUsers": dict(users or {}),
            "DicomCheckCalledAet": True,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        # Every object it receives is logged (a copy sent twice shows twice) with the AE title that
        # sent it (DIMSE); one PatientID may be refused.
        self.received_log, self.callers_log = folder / "received.txt", folder / "callers.txt"
        refuse = (
            f"  if dicom.PatientID == '{refuse_patient_id}' then error('refused by this PACS') end\n"
            if refuse_patient_id is not None
            else ""
        )
        lua = folder / "received.lua"
        lua.write_text(
            "function ReceivedInstanceFilter(dicom, origin, info)\n"
            f"  local log = io.open('{self.received_log}', 'a')\n"
            "  log:write(dicom.SOPInstanceUID .. '\\n')\n"
            "  log:close()\n"
            f"  local callers = io.open('{self.callers_log}', 'a')\n"
            "  callers:write((origin.RemoteAet or '-') .. '\\n')\n"
            "  callers:close()\n"
            f"{refuse}"
            "  return true\n"
            "end\n",
            encoding="utf-8",
        )
        config["LuaScripts"] = [str(lua)]
        (folder / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
        self.folder = folder
        self.start()

    def start(self) -> None:
        """Start it (again, after :meth:`stop`: the same ports, the same storage)."""
        self.log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [ORTHANC or "Orthanc", str(self.folder / "orthanc.json")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not start: see {self.folder / 'orthanc.log'}") from None
                time.sleep(0.2)

    def get(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        if self._authorization is not None:
            request.add_header("Authorization", self._authorization)
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def call(self, method: str, path: str, body: bytes | dict[str, Any] | str) -> Any:
        """A REST call with a body (DICOM bytes, JSON, or text such as an id)."""
        data = (
            body
            if isinstance(body, bytes)
            else (json.dumps(body) if isinstance(body, dict) else body).encode()
        )
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        if self._authorization is not None:
            request.add_header("Authorization", self._authorization)
        with urllib.request.urlopen(request, timeout=60) as answer:
            text = answer.read()
        return json.loads(text) if text.strip() else None

    def callers(self) -> list[str]:
        """The calling AE title of each object received over DIMSE (``-``: over HTTP)."""
        if not self.callers_log.is_file():
            return []
        return self.callers_log.read_text(encoding="utf-8").split()

    def sop_instance_uids(self) -> list[str]:
        """The SOPInstanceUID of every instance it holds, through QIDO-RS."""
        found = self.get("/dicom-web/instances?includefield=00080018")
        return sorted(item["00080018"]["Value"][0] for item in found)

    def received(self) -> int:
        """Objects it has received, refused ones included (a copy sent twice counts twice)."""
        if not self.received_log.is_file():
            return 0
        return len(self.received_log.read_text(encoding="utf-8").split())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.log.close()


@contextmanager
def orthanc(
    folder: Path,
    *,
    refuse_patient_id: str | None = None,
    users: Mapping[str, str] | None = None,
) -> Iterator[Orthanc]:
    """An Orthanc for the test's duration, storing under ``folder``: with ``users``, HTTP basic
    authentication."""
    folder.mkdir(parents=True, exist_ok=True)
    server = Orthanc(folder, refuse_patient_id, users)
    try:
        yield server
    finally:
        server.stop()

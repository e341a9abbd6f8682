"""A real PACS for tests: Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``) on localhost.

:func:`orthanc` starts an Orthanc process on ports it chooses, with its DICOMweb plugin, a
storage folder of the test's own and, when asked, a Lua filter that refuses every object of
one PatientID (a PACS rule that refuses one object and accepts the rest); it is stopped
after the test. :class:`Orthanc` reads back what it holds through QIDO-RS, and counts what it
received (a Lua filter logs each object as it arrives).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AET = "ORTHANC"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """A running Orthanc: where it listens, and what it holds."""

    def __init__(self, folder: Path, refuse_patient_id: str | None) -> None:
        self.http_port, self.dicom_port = _free_port(), _free_port()
        self.dicomweb = f"dicomweb://127.0.0.1:{self.http_port}/dicom-web"
        self.dimse = f"dimse://{AET}@127.0.0.1:{self.dicom_port}"
        config: dict[str, Any] = {
            "Name": "asyncflow-test",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        # Every object it receives is logged (a copy sent twice shows twice); one PatientID may be refused.
        self.received_log = folder / "received.txt"
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
            f"{refuse}"
            "  return true\n"
            "end\n",
            encoding="utf-8",
        )
        config["LuaScripts"] = [str(lua)]
        (folder / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
        self.log = (folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [ORTHANC or "Orthanc", str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not start: see {folder / 'orthanc.log'}") from None
                time.sleep(0.2)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as answer:
            return json.loads(answer.read())

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
def orthanc(folder: Path, *, refuse_patient_id: str | None = None) -> Iterator[Orthanc]:
    """An Orthanc for the test's duration, storing under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    server = Orthanc(folder, refuse_patient_id)
    try:
        yield server
    finally:
        server.stop()

"""A real Orthanc PACS for the tests: Debian's ``orthanc`` and ``orthanc-dicomweb`` (``scripts/setup.sh --test``).

:class:`OrthancServer` writes a JSON configuration into a temporary folder (DICOM and HTTP ports free on
loopback, its AE title, the DICOMweb plugin, remote access off, no authentication: loopback only) and
runs ``Orthanc`` on it; :meth:`~OrthancServer.stop` and :meth:`~OrthancServer.start` take it down and
bring it back on the same ports and storage (the fault-injection tests), :meth:`~OrthancServer.close`
stops it and removes the folder. :meth:`~OrthancServer.get` / :meth:`~OrthancServer.post` talk to its
REST API.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from ctscreen.embedded import free_port

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))


def orthanc_bin() -> str | None:
    """``Orthanc`` on PATH, or None."""
    return shutil.which("Orthanc")


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's shared library, or None."""
    for folder in PLUGIN_DIRS:
        found = sorted(folder.glob("libOrthancDicomWeb.so*"))
        if found:
            return found[0]
    return None


class OrthancServer:
    """One Orthanc in a temporary folder (see the module docstring)."""

    def __init__(self, ae_title: str = "ORTHANC") -> None:
        exe, plugin = orthanc_bin(), dicomweb_plugin()
        if exe is None or plugin is None:
            raise RuntimeError("Orthanc and its DICOMweb plugin are not installed (scripts/setup.sh --test)")
        self.exe, self.ae_title = exe, ae_title
        self.root = Path(tempfile.mkdtemp(prefix="ctscreen-orthanc-"))
        self.dicom_port, self.http_port = free_port(), free_port()
        config = {
            "Name": f"ctscreen-test-{ae_title}",
            "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ae_title,
            "DicomCheckCalledAet": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "StableAge": 1,
            "HttpThreadsCount": 4,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
        }
        self.config = self.root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.log = self.root / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 60.0) -> None:
        """Start (again) on the same ports and storage; returns once the REST API answers (at once if it runs)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen([self.exe, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                          cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {timeout} s")

    def stop(self) -> None:
        """Stop the server (storage kept)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.url}{path}", timeout=30)
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.content

    def post(self, path: str, body: Any) -> Any:
        r = httpx.post(f"{self.url}{path}", json=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def store(self, *paths: Path) -> None:
        """Store DICOM files as a modality would (REST upload: the same store as a C-STORE)."""
        for path in paths:
            httpx.post(f"{self.url}/instances", content=path.read_bytes(), timeout=30).raise_for_status()

    def instances_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance Orthanc holds of the study, with its tags, series and patient."""
        return self.post("/tools/find", {"Level": "Instance", "Expand": True,
                                         "Query": {"StudyInstanceUID": study_instance_uid}})

"""``ctscreen triton`` as a user runs it: one clear line and a non-zero exit when it cannot serve,
a clean stop on SIGTERM. Every server here is the real tritonserver; ports are picked free."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctscreen.repo import build_repository
from tests.conftest import free_port
from tests.triton_analytic import write_analytic_models

pytestmark = pytest.mark.triton


def ctscreen_triton(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctscreen.cli", "triton", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def ports() -> list[str]:
    return [
        "--grpc-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
    ]


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    return build_repository("cpu", root / "repo", onnx_dir=write_analytic_models(root / "onnx"))


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_taken_port_is_one_line(small_repo: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = ctscreen_triton(
            "--repo",
            str(small_repo),
            "--grpc-port",
            str(port),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
        )
    assert done.returncode == 1
    assert one_line(done.stderr) == f"ctscreen triton: gRPC port {port} on 127.0.0.1 is already in use"


def test_missing_binary_is_one_line(small_repo: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "tritonserver"
    done = ctscreen_triton("--repo", str(small_repo), *ports(), env={"CTSCREEN_TRITONSERVER": str(missing)})
    assert done.returncode == 1
    assert one_line(done.stderr) == (
        f"ctscreen triton: tritonserver binary not found or not executable: {missing} (from CTSCREEN_TRITONSERVER)"
    )


def test_model_that_fails_to_load_is_named(small_repo: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(small_repo, broken)
    (broken / "lesion" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    done = ctscreen_triton("--repo", str(broken), *ports())
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert line.startswith(f"ctscreen triton: model 'lesion' failed to load from {broken / 'lesion'}: "), line
    assert "INVALID_PROTOBUF" in line and "At:" not in line  # the reason, without the stub's stack


def test_bad_port_argument_is_one_line() -> None:
    done = ctscreen_triton("--grpc-port", "70000")
    assert done.returncode == 2
    assert one_line(done.stderr) == 'ctscreen triton: Argument "grpc_port" must be in [0, 65535], got 70000.'


def test_sigterm_stops_server_and_stubs(small_repo: Path) -> None:
    args = ports()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctscreen.cli", "triton", "--quiet", "--repo", str(small_repo), *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = proc.stderr.readline()
        assert ready.startswith("ctscreen triton: ready, grpc 127.0.0.1:" + args[1]), ready
        server_pids = children(proc.pid)
        assert server_pids, "tritonserver is not a child of ctscreen triton"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert proc.stderr.read().strip() == "ctscreen triton: stopping"
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in server_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in server_pids if Path(f"/proc/{pid}").exists()]


def children(pid: int) -> list[int]:
    """The tritonserver child of ``pid`` and the stubs in its session (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid
            child = int(stat.parent.name)
            found.append(child)
            found += [
                int(s.parent.name)
                for s in Path("/proc").glob("[0-9]*/stat")
                if s.exists() and _ppid(s) == child
            ]
    return found


def _ppid(stat: Path) -> int:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_server_dies_with_its_parent(small_repo: Path) -> None:
    """A killed parent (no chance to stop the server) leaves no orphaned tritonserver behind."""
    code = (
        "import sys, time; from ctscreen.embedded import EmbeddedTriton; "
        f"t = EmbeddedTriton({str(small_repo)!r}).start(); print(t.pid, flush=True); time.sleep(600)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(parent.stdout.readline())
        assert Path(f"/proc/{server_pid}").exists()
    finally:
        parent.kill()
        parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{server_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    orphaned = Path(f"/proc/{server_pid}").exists()
    if orphaned:  # do not leave it running on a shared machine
        os.kill(server_pid, signal.SIGKILL)
    assert not orphaned, "tritonserver outlived its parent"

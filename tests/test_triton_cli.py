"""``ctscreen triton`` as a user runs it: one clear line and a non-zero exit when it cannot serve,
a clean stop on SIGTERM. Every server here is the real tritonserver; ports are picked free."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ctscreen.embedded import (
    MALLOC_ENV,
    SHM_DIR,
    EmbeddedTriton,
    TritonStartError,
    new_shm_prefix,
    remove_shm,
    server_environment,
    sweep_stale_shm,
)
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


def test_a_metrics_port_taken_while_the_server_starts_fails_the_start(small_repo: Path, caplog) -> None:
    """tritonserver binds its metrics port last and exits when it is taken, after it has answered
    /v2/health/ready: such a server must not count as started (a CI run lost one of three that way).
    The port is taken as the server is launched, after the check that it was free."""
    port = free_port()
    taken = socket.socket()

    class TakeThePort(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("starting "):
                taken.bind(("127.0.0.1", port))
                taken.listen()

    handler = TakeThePort()
    caplog.set_level(logging.INFO, logger="ctscreen.embedded")
    logging.getLogger("ctscreen.embedded").addHandler(handler)
    triton = EmbeddedTriton(small_repo, grpc_port=free_port(), http_port=free_port(), metrics_port=port)
    try:
        with pytest.raises(TritonStartError, match=f"could not bind 127.0.0.1:{port}: address already in use"):
            triton.start(timeout=120)
    finally:
        logging.getLogger("ctscreen.embedded").removeHandler(handler)
        taken.close()
        triton.stop()


def test_servers_started_at_once_are_never_handed_the_same_port(tmp_path: Path, monkeypatch) -> None:
    """bind(0) may hand two threads the same port a moment apart; a port picked for a server that is
    still starting is not picked for another. (A stand-in binary that never gets ready: only the
    choice of ports is under test.)"""
    never_ready = tmp_path / "tritonserver"
    never_ready.write_text("#!/bin/sh\nexec sleep 60\n")
    never_ready.chmod(0o755)
    monkeypatch.setenv("CTSCREEN_TRITONSERVER", str(never_ready))
    per_thread = threading.local()  # what bind(0) returns, a moment apart: the same ports to each thread

    def free_port(host: str = "127.0.0.1") -> int:
        per_thread.picks = getattr(per_thread, "picks", None) or itertools.cycle(range(41000, 41006))
        return next(per_thread.picks)

    monkeypatch.setattr("ctscreen.embedded.free_port", free_port)

    def ports(triton: EmbeddedTriton) -> set[str]:
        return {triton.grpc_url, triton.http_url, triton.metrics_url.removesuffix("/metrics").split("//")[1]}

    first, second = EmbeddedTriton(tmp_path), EmbeddedTriton(tmp_path)
    starting = threading.Thread(target=lambda: pytest.raises(TritonStartError, first.start, timeout=4))
    starting.start()
    try:
        deadline = time.monotonic() + 10
        while first.pid is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(TritonStartError, match="not ready"):
            second.start(timeout=1)
    finally:
        starting.join()
    assert not ports(first) & ports(second), (ports(first), ports(second))


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


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_stale_shared_memory_is_swept_and_only_that(tmp_path: Path) -> None:
    """Regions named for a process that is gone are removed; a live process's, another PID namespace's
    and anything not named by ctscreen stay (real files, as shm_open makes them in /dev/shm)."""
    dead = new_shm_prefix(_dead_pid())
    live = new_shm_prefix()
    other_ns = f"ctscreen_1_{_dead_pid()}_0123abcd_"
    names = [dead + "a-region", dead + "b-region", live + "a-region", other_ns + "a-region", "someone-else",
             f"ctscreen_{_dead_pid()}_0123abcd_legacy"]
    for name in names:
        (tmp_path / name).write_bytes(b"\0" * 64)
    assert sweep_stale_shm(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    assert remove_shm(live, tmp_path) == 1 and not (tmp_path / names[2]).exists()


def test_a_killed_server_leaves_no_shared_memory(small_repo: Path) -> None:
    """Its python-backend stubs' regions (RAM-backed /dev/shm, 16 MiB or more each) go with it, and a
    start sweeps the regions of processes that died without stopping their server."""
    if not SHM_DIR.is_dir():
        pytest.skip(f"{SHM_DIR} does not exist here")
    stale = SHM_DIR / (new_shm_prefix(_dead_pid()) + "left-by-a-crash")
    stale.write_bytes(b"\0" * 64)
    triton = EmbeddedTriton(small_repo).start()
    try:
        assert not stale.exists(), "start did not sweep the stale region"
        prefix = triton.shm_prefix
        assert prefix is not None and list(SHM_DIR.glob(prefix + "*")), "no region of this server in /dev/shm"
        assert triton.pid is not None
        os.killpg(triton.pid, signal.SIGKILL)  # no chance to clean up: the stubs' regions stay behind
        deadline = time.monotonic() + 30
        while triton.running and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        triton.stop()
        stale.unlink(missing_ok=True)
    assert not list(SHM_DIR.glob(prefix + "*"))


@pytest.mark.parametrize(("base", "extra", "want"), [
    ({}, None, MALLOC_ENV),
    # the caller's own value of a name is the caller's; env= sets or removes a name
    ({"MALLOC_TOP_PAD_": "0"}, {"MALLOC_MMAP_THRESHOLD_": None},
     {"MALLOC_TOP_PAD_": "0", "MALLOC_TRIM_THRESHOLD_": MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]}),
    ({}, {"MALLOC_TRIM_THRESHOLD_": "1"}, {**MALLOC_ENV, "MALLOC_TRIM_THRESHOLD_": "1"}),
    # an operator's GLIBC_TUNABLES malloc policy (from the caller or env=) is not overridden by MALLOC_* names
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}, None, {}),
    ({}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {}),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=4096"}, None, MALLOC_ENV),
])
def test_server_environment_sets_the_malloc_policy_unless_the_operator_has_one(base, extra, want) -> None:
    import doctest

    from ctscreen import embedded

    env = server_environment({"PATH": "/usr/bin", **base}, Path("/libs"), extra)
    assert {k: v for k, v in env.items() if k.startswith("MALLOC_")} == want
    assert env["LD_LIBRARY_PATH"] == "/libs" and env["PATH"].endswith(":/usr/bin") and env["OMP_NUM_THREADS"] == "1"
    assert doctest.testmod(embedded).failed == 0


_SIGNAL_WHILE_WAITING = """
import signal, sys, threading
from ctscreen.signals import set_from_signal
stop = threading.Event()
direct = sys.argv[1] == "direct"
signal.signal(signal.SIGTERM, lambda signum, frame: stop.set() if direct else set_from_signal(stop))
with stop._cond:  # what the main thread holds as Event.wait(0.5) returns: the signal lands there
    signal.raise_signal(signal.SIGTERM)
print("stopped" if stop.wait(5) else "not set")
"""


@pytest.mark.parametrize("handler", ["set_from_signal", "direct"])
def test_a_signal_that_lands_while_the_main_thread_holds_the_stop_events_lock_still_stops(handler: str) -> None:
    """``ctscreen demo``, ``serve`` and ``triton`` wait in ``Event.wait(0.5)`` loops and their SIGTERM/SIGINT
    handlers set that event. Setting it in the handler itself (``direct``, as before) waits forever for the
    lock the interrupted main thread holds: ``make demo`` stopped by ``timeout`` hung with its Triton, and
    Ctrl-C could no longer end it. The race is made certain here by holding the lock when the signal comes."""
    cmd = [sys.executable, "-c", _SIGNAL_WHILE_WAITING, handler]
    if handler == "direct":  # the control: the deadlock this guards against is real
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run(cmd, capture_output=True, text=True, timeout=3)
        return
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout.strip()) == (0, "stopped"), done.stderr

"""The embedded Triton: the real ``tritonserver`` of the nvidia-pytriton wheel, on the cpu repository.

No GPU, no Docker: the wheel ships ``tritonserver`` 2.51 with the python backend, and the cpu profile
(:mod:`ctscreen.repo`) runs every model in it. :class:`EmbeddedTriton` assembles a backend folder (the
python backend plus the stub built for this Python), renders the cpu repository into the cache unless
given one, starts the server on loopback ports, waits until every model is READY (``--strict-readiness``
and ``--exit-on-error``: READY means loaded and warmed up), forwards the server log, and stops it with
SIGTERM, then SIGKILL.

The python-backend stub embeds the first ``python3`` on ``PATH``; this environment's ``bin`` goes first,
so the stub runs with this environment's numpy (< 2: numpy 2 makes ``pb_utils.Tensor`` carry 0 bytes).

Errors
------
``TritonStartError(RuntimeError)``: the binary is missing, a port is taken, a model fails to load, or
the server is not ready in time. Its message is one line saying what and where.

Example
-------
>>> with EmbeddedTriton() as triton:            # doctest: +SKIP
...     client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from glob import escape as glob_escape
from pathlib import Path
from typing import IO, Final

from ctscreen.signals import stop_on_signals

logger = logging.getLogger(__name__)
server_logger = logging.getLogger("ctscreen.tritonserver")

_PORT_TAKEN = re.compile(
    r"Socket '([^']+)' already in use|failed to start (\w+) service.*?address already in use", re.I
)
_LOAD_FAILED = re.compile(r"failed to load '([^']+)' version (\d+): (.*?)\"?$")
_ERROR_LINE = re.compile(r"^E\d{4} |^error: |Error:", re.I)


MALLOC_ENV: Final = {
    "MALLOC_MMAP_THRESHOLD_": str(16 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(128 << 20),
    "MALLOC_TOP_PAD_": str(16 << 20),
}
"""glibc malloc settings of tritonserver and its python stubs (environment variables: every process of the
server reads them at its start; the Helm chart sets the same, ``triton.mallocEnv``). With glibc's defaults a
stub returns the memory of a slice's label and mask arrays (about 1 MiB each) to the kernel after every
request and faults it back in at the next: 700-1000 page faults a slice in each post-processing and fused stub
(tests/test_triton_server.py), about 1.2 ms of CPU a slice in the fused stubs. Arrays up to 16 MiB come from
the heap, and the main heap keeps up to 128 MiB free before it shrinks (docs/triton.md, "Memory allocator").
A name the caller's environment sets is the caller's, and a ``GLIBC_TUNABLES`` naming ``glibc.malloc.``
settings is an operator's malloc policy that these names would override: then none is set (:func:`malloc_policy`).
The gateway's process applies the same values to itself at its start (:func:`apply_malloc_policy`)."""

MALLOPT_PARAM: Final = {"MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2}
"""glibc's ``mallopt`` parameter of each :data:`MALLOC_ENV` name (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``,
``M_TOP_PAD`` of ``<malloc.h>``): the same setting as the variable, made in a process already running."""


def malloc_policy(environ: Mapping[str, str]) -> dict[str, str]:
    """The :data:`MALLOC_ENV` settings a process with the environment ``environ`` is given: each name it does
    not set itself, and none when its ``GLIBC_TUNABLES`` names ``glibc.malloc.`` settings (an operator's
    policy, which the ``MALLOC_*`` names would override).

    >>> sorted(malloc_policy({"MALLOC_TOP_PAD_": "0"}))
    ['MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_']
    >>> malloc_policy({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}), malloc_policy({}) == MALLOC_ENV
    ({}, True)
    """
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return {}
    return {name: value for name, value in MALLOC_ENV.items() if name not in environ}


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt`` of this process; None on another C library (musl) or without one."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc's own: musl's mallopt does nothing
            return None
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def apply_malloc_policy(environ: Mapping[str, str] | None = None,
                        mallopt: Callable[[int, int], int] | None = None) -> dict[str, int]:
    """Give this running process :data:`MALLOC_ENV` by glibc's ``mallopt`` (its variables are read only when a
    process starts), under the rules of :func:`malloc_policy` on ``environ`` (default ``os.environ``); return
    what was set. Not glibc (musl): nothing, logged at debug. ``mallopt`` replaces glibc's (tests).

    >>> calls = []
    >>> apply_malloc_policy({"MALLOC_TOP_PAD_": "0"}, lambda p, v: calls.append((p, v)) or 1)
    {'MALLOC_MMAP_THRESHOLD_': 16777216, 'MALLOC_TRIM_THRESHOLD_': 134217728}
    >>> calls
    [(-3, 16777216), (-1, 134217728)]
    >>> apply_malloc_policy({"GLIBC_TUNABLES": "glibc.malloc.top_pad=0"}, lambda p, v: 1/0)
    {}
    """
    wanted = malloc_policy(os.environ if environ is None else environ)
    if not wanted:
        logger.debug("glibc malloc: the environment's own policy (MALLOC_* or GLIBC_TUNABLES) is kept")
        return {}
    if mallopt is None:
        mallopt = _glibc_mallopt()
        if mallopt is None:
            logger.debug("not glibc: no malloc policy set (%s)", ", ".join(wanted))
            return {}
    done = {}
    for name, value in wanted.items():
        if mallopt(MALLOPT_PARAM[name], int(value)) == 1:
            done[name] = int(value)
        else:
            logger.debug("glibc malloc: mallopt refused %s=%s", name, value)
    return done


def server_environment(base: Mapping[str, str], libs: Path, extra: Mapping[str, str | None] | None = None,
                       ) -> dict[str, str]:
    """The environment tritonserver runs in: ``base`` (the caller's), the wheel's ``libs`` first on
    ``LD_LIBRARY_PATH``, this Python's ``bin`` first on ``PATH`` (the stub embeds the first ``python3``),
    ``OMP_NUM_THREADS=1`` unless set, ``extra`` on top (None removes a name), then :data:`MALLOC_ENV` for the
    names neither sets, unless ``GLIBC_TUNABLES`` names malloc settings (an operator's policy, which the
    ``MALLOC_*`` names would override).

    >>> env = server_environment({"MALLOC_TOP_PAD_": "0"}, Path("/libs"), {"MALLOC_MMAP_THRESHOLD_": None})
    >>> env["LD_LIBRARY_PATH"], env["MALLOC_TOP_PAD_"], "MALLOC_MMAP_THRESHOLD_" in env, env["MALLOC_TRIM_THRESHOLD_"]
    ('/libs', '0', False, '134217728')
    >>> sorted(k for k in server_environment({}, Path("/l"), {"GLIBC_TUNABLES": "glibc.malloc.top_pad=0"})
    ...        if k.startswith("MALLOC_"))
    []
    """
    env = dict(base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.prefix) / "bin"), env.get("PATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # ORT sizes its own pools from the model configs
    extra = dict(extra or {})
    for name, given in extra.items():
        if given is None:
            env.pop(name, None)
        else:
            env[name] = given
    env.update({name: value for name, value in malloc_policy(env).items() if name not in extra})
    return env


class TritonStartError(RuntimeError):
    """tritonserver could not be started or did not become ready; the message is one line."""


def _pytriton_dir() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent


def server_binary() -> tuple[Path, Path]:
    """``(tritonserver, libs dir)``: ``$CTSCREEN_TRITONSERVER`` or the one in the nvidia-pytriton wheel.

    Raises
    ------
    TritonStartError
        The binary is not there or is not executable.
    """
    override = os.environ.get("CTSCREEN_TRITONSERVER")
    try:
        root = _pytriton_dir()
    except ImportError:
        root = None
    libs = root.parent / "nvidia_pytriton.libs" if root else Path("/opt/tritonserver/lib")
    binary = (
        Path(override) if override else (root / "tritonserver" / "bin" / "tritonserver" if root else None)
    )
    if binary is None:
        raise TritonStartError("tritonserver not found: install nvidia-pytriton or set CTSCREEN_TRITONSERVER")
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise TritonStartError(
            f"tritonserver binary not found or not executable: {binary}"
            + (" (from CTSCREEN_TRITONSERVER)" if override else " (reinstall nvidia-pytriton)")
        )
    return binary, libs


def backend_dir() -> Path:
    """A backend folder holding the wheel's python backend and the stub for this Python (cached).

    ``$CTSCREEN_TRITON_BACKENDS`` overrides it (e.g. ``/opt/tritonserver/backends`` with a
    ``CTSCREEN_TRITONSERVER`` from a Triton install).
    """
    from ctscreen.repo import cache_root

    if os.environ.get("CTSCREEN_TRITON_BACKENDS"):
        return Path(os.environ["CTSCREEN_TRITON_BACKENDS"])
    try:
        root = _pytriton_dir() / "tritonserver"
    except ImportError:
        raise TritonStartError(
            "the python backend comes from nvidia-pytriton: install it or set CTSCREEN_TRITON_BACKENDS"
        ) from None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    backend = root / "backends" / "python"
    files = [backend / "libtriton_python.so", backend / "triton_python_backend_utils.py", stub]
    for path in files:
        if not path.is_file():
            raise TritonStartError(f"python backend file missing from nvidia-pytriton: {path}")
    stamp = "|".join(f"{p}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files)
    out = cache_root() / f"triton-backends-py{version}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"
    if (out / "python" / stub.name).is_file():
        return out
    tmp = cache_root() / f".backends-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    (tmp / "python").mkdir(parents=True)
    for path in files:
        shutil.copy2(path, tmp / "python" / path.name)
    try:
        tmp.rename(out)
    except OSError:  # another process assembled it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the server binds: connections of a server that just stopped (TIME_WAIT) do not hold the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _answers(url: str, containing: bytes = b"") -> bool:
    """``url`` answers 200 (with ``containing`` in its body)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200 and (not containing or containing in response.read())
    except (urllib.error.URLError, OSError):
        return False


_LIVE: set[EmbeddedTriton] = set()
"""Servers started and not yet stopped (strong references: a dropped object still gets stopped)."""
_CLAIMED: set[int] = set()
"""Ports this process picked for servers it runs, held until each server is cleaned up: two servers
started at once from threads (the balancing tests start three) must not be handed the same port that
``bind(0)`` returned to each a moment apart."""
_CLAIMED_LOCK = threading.Lock()

SHM_DIR = Path("/dev/shm")
"""Where the python backend's stubs keep their shared-memory regions (``shm_open``)."""


def _pid_namespace() -> str:
    """This process's PID namespace (its inode), so that a region is judged only by processes that see
    the same PIDs (containers sharing ``/dev/shm`` need not share PIDs)."""
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or "0"
    except OSError:
        return "0"


def new_shm_prefix(pid: int | None = None) -> str:
    r"""The python-backend shared-memory prefix of one server started by process ``pid`` (default: this one):
    ``ctscreen_<pid namespace>_<pid>_<8 hex>_``.

    >>> import re; bool(re.fullmatch(r"ctscreen_\d+_42_[0-9a-f]{8}_", new_shm_prefix(42)))
    True
    """
    return f"ctscreen_{_pid_namespace()}_{os.getpid() if pid is None else pid}_{uuid.uuid4().hex[:8]}_"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_shm(prefix: str, shm_dir: Path = SHM_DIR) -> int:
    """Remove the shared-memory regions named ``prefix*`` (a server's, once it and its stubs are gone);
    returns how many. Each start takes 16 MiB or more a stub, and a server that is killed (or crashes)
    leaves them behind in RAM-backed ``/dev/shm``."""
    return _unlink(shm_dir.glob(f"{glob_escape(prefix)}*") if shm_dir.is_dir() else ())


def _unlink(paths: Iterable[Path]) -> int:
    """Remove ``paths``; how many went (one already gone, or not ours to remove, is skipped)."""
    removed = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            path.unlink()
            removed += 1
    return removed


def sweep_stale_shm(shm_dir: Path = SHM_DIR) -> int:
    """Remove the regions of servers whose starting process is gone (killed, crashed, powered off
    mid-run: nothing removed them); returns how many. Only names made by :func:`new_shm_prefix` in this PID
    namespace are judged: a live process's regions, and anyone else's, are left alone."""
    if not shm_dir.is_dir():
        return 0
    ours = re.compile(rf"ctscreen_{re.escape(_pid_namespace())}_(\d+)_[0-9a-f]{{8}}_")
    removed = _unlink(path for path in shm_dir.iterdir()
                      if (match := ours.match(path.name)) is not None and not _alive(int(match.group(1))))
    if removed:
        logger.warning("removed %d shared-memory regions of python-backend stubs left by stopped processes "
                       "(in %s)", removed, shm_dir)
    return removed


@atexit.register
def _stop_all() -> None:  # a test run that crashes must not leave servers behind
    for triton in list(_LIVE):
        with contextlib.suppress(Exception):
            triton.stop()


class EmbeddedTriton:
    """A real tritonserver on loopback ports, serving a rendered model repository.

    Parameters
    ----------
    repo_dir : Path, optional
        Rendered repository; default: the cpu profile rendered into the cache by
        :func:`ctscreen.repo.cached_repository`.
    grpc_port, http_port, metrics_port : int
        0 picks a free port (retried if another process takes it first).
    log_file : Path, optional
        Also write the server log here (it always goes to the ``ctscreen.tritonserver`` logger).
    host : str
        Address to bind; ``127.0.0.1`` by default, ``0.0.0.0`` to serve other machines.
    log_verbose : int
        tritonserver ``--log-verbose``.
    echo : IO[str], optional
        Write every server log line to this stream as well (the ``ctscreen triton`` command).
    env : Mapping[str, str | None], optional
        Environment of the server on top of its own (:data:`MALLOC_ENV` among it); ``None`` removes a name
        (``{"MALLOC_TOP_PAD_": None}``: glibc's default for it). ``benchmarks.ab_triton`` compares two.
    """

    def __init__(
        self,
        repo_dir: Path | None = None,
        *,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        log_file: Path | None = None,
        host: str = "127.0.0.1",
        log_verbose: int = 0,
        echo: IO[str] | None = None,
        env: Mapping[str, str | None] | None = None,
    ) -> None:
        for name, port in (
            ("grpc_port", grpc_port),
            ("http_port", http_port),
            ("metrics_port", metrics_port),
        ):
            if not 0 <= int(port) <= 65535:
                raise ValueError(f'Argument "{name}" must be in [0, 65535], got {port}.')
        self._repo_dir = Path(repo_dir) if repo_dir is not None else None
        self._requested = {"grpc": int(grpc_port), "http": int(http_port), "metrics": int(metrics_port)}
        self._ports = dict(self._requested)
        self.host = host
        self.log_file = Path(log_file) if log_file is not None else None
        self.log_verbose = int(log_verbose)
        self._echo = echo
        self._extra_env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=400)
        self._log_fh: IO[str] | None = None
        self._shm_prefix: str | None = None  # the python backend's regions of the running server
        self._claimed: set[int] = set()  # ports picked for it (0 requested), in _CLAIMED until cleanup

    # -- properties -------------------------------------------------------------------------------
    @property
    def repo_dir(self) -> Path | None:
        """The repository served (known once :meth:`start` has rendered it)."""
        return self._repo_dir

    @property
    def screen_model(self) -> str | None:
        """The model a client should call: the fused model where the served repository holds it (the cpu
        profile; the same outputs, one stub a slice instead of three), else the ensemble; None before
        :meth:`start` has rendered the repository."""
        from ctscreen.contracts import ENSEMBLE_MODEL, FUSED_MODEL

        if self._repo_dir is None:
            return None
        return FUSED_MODEL if (self._repo_dir / FUSED_MODEL / "config.pbtxt").is_file() else ENSEMBLE_MODEL

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint (what ``tritonclient.grpc`` takes)."""
        return f"{self._client_host}:{self._ports['grpc']}"

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP/REST endpoint (what ``tritonclient.http`` takes)."""
        return f"{self._client_host}:{self._ports['http']}"

    @property
    def metrics_url(self) -> str:
        """``http://host:port/metrics``: Prometheus metrics."""
        return f"http://{self._client_host}:{self._ports['metrics']}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_tail(self) -> str:
        """The last few hundred lines of the server log."""
        return "".join(self._tail)

    @property
    def shm_prefix(self) -> str | None:
        """The name prefix of the running server's python-backend shared-memory regions (in ``/dev/shm``);
        they are removed when it stops."""
        return self._shm_prefix

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 180.0, *, cancel: threading.Event | None = None) -> EmbeddedTriton:
        """Start tritonserver and wait until every model is READY.

        ``cancel``, when set while waiting, stops the server and raises :class:`TritonStartError`
        (``ctscreen triton`` sets it on Ctrl-C).

        Raises
        ------
        TritonStartError
            Missing binary, taken port, a model that fails to load, or not ready in ``timeout`` s.
        """
        if self.running:
            return self
        binary, libs = server_binary()
        if self._repo_dir is None:
            from ctscreen.repo import RepositoryError, cached_repository

            try:
                self._repo_dir = cached_repository("cpu")
            except (RepositoryError, FileNotFoundError) as exc:
                raise TritonStartError(f"cannot render the cpu model repository: {exc}") from None
        if not self._repo_dir.is_dir():
            raise TritonStartError(f"model repository not found: {self._repo_dir}")
        backends = backend_dir()
        sweep_stale_shm()
        attempts = 3 if 0 in self._requested.values() else 1
        for attempt in range(1, attempts + 1):
            self._choose_ports()
            try:
                self._launch(binary, libs, backends)
                self._wait_ready(timeout, cancel)
                return self
            except _PortRace as exc:
                self._cleanup()
                if attempt == attempts:
                    raise TritonStartError(str(exc)) from None
                logger.info("port race (%s); retrying with other ports", exc)
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _choose_ports(self) -> None:
        names = {"grpc": "gRPC", "http": "HTTP", "metrics": "metrics"}
        self._release_ports()
        with _CLAIMED_LOCK:
            chosen: dict[str, int] = {}
            for key, requested in self._requested.items():
                if requested == 0:
                    port = free_port(self._client_host)
                    while port in _CLAIMED or port in chosen.values():
                        port = free_port(self._client_host)
                else:
                    port = requested
                    if not _port_free(self.host, port):
                        raise TritonStartError(f"{names[key]} port {port} on {self.host} is already in use")
                chosen[key] = port
            self._ports.update(chosen)
            self._claimed = {port for key, port in chosen.items() if self._requested[key] == 0}
            _CLAIMED.update(self._claimed)

    def _release_ports(self) -> None:
        with _CLAIMED_LOCK:
            _CLAIMED.difference_update(self._claimed)
            self._claimed = set()

    def _command(self, binary: Path, backends: Path) -> list[str]:
        self._shm_prefix = prefix = new_shm_prefix()
        return [
            str(binary),
            f"--model-repository={self._repo_dir}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--http-port={self._ports['http']}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self._ports['grpc']}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self._ports['metrics']}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--disable-auto-complete-config",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={prefix}",
            # one slice's probability map is 1 MiB: start the stub's region big enough for a batch
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
        ]

    def _env(self, libs: Path) -> dict[str, str]:
        return server_environment(os.environ, libs, self._extra_env)

    def _launch(self, binary: Path, libs: Path, backends: Path) -> None:
        self._tail.clear()
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(self.log_file, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        cmd = self._command(binary, backends)
        # If this process dies without stopping the server (SIGKILL, an unhandled SIGTERM), the kernel
        # sends the server SIGTERM: no orphaned tritonserver on a shared machine. The signal follows
        # the *thread* that forked, so only when started from the main thread.
        setpriv = shutil.which("setpriv")
        thread = threading.current_thread()
        if setpriv and (thread is threading.main_thread() or getattr(thread, "lives_with_process", False)):
            cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
        logger.info("starting %s", " ".join(cmd))
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self._env(libs),
                start_new_session=True,  # Ctrl-C reaches us, and we stop the server in order
            )
        except OSError as exc:
            raise TritonStartError(f"cannot run tritonserver {binary}: {exc.strerror or exc}") from None
        _LIVE.add(self)
        self._reader = threading.Thread(target=self._read_log, name="tritonserver-log", daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            self._tail.append(line)
            if self._log_fh is not None:
                self._log_fh.write(line)
                self._log_fh.flush()
            if self._echo is not None:
                self._echo.write(line)
                self._echo.flush()
            server_logger.debug("%s", line.rstrip())

    def _wait_ready(self, timeout: float, cancel: threading.Event | None = None) -> None:
        """Ready when the server says so, serves its metrics, and is still running a moment later.

        tritonserver starts its metrics service last and exits when that port is taken, after it has
        answered ``/v2/health/ready``: so the health check alone let a server that was about to exit
        count as started (a CI run lost one of three servers that way).
        """
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        seen_ready = False
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                raise TritonStartError("interrupted while tritonserver was starting")
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)
                raise self._failure(code)
            if _answers(url) and _answers(self.metrics_url, containing=b"nv_"):
                if seen_ready:  # still alive one poll after it first looked ready
                    logger.info("tritonserver ready: grpc %s, http %s", self.grpc_url, self.http_url)
                    return
                seen_ready = True
            else:
                seen_ready = False
            time.sleep(0.25)
        raise TritonStartError(
            f"tritonserver not ready after {timeout:.0f} s (repository {self._repo_dir}); "
            f"last log line: {self._last_error() or '-'}"
        )

    def _last_error(self) -> str:
        for line in reversed(self._tail):
            if _ERROR_LINE.search(line.strip()):
                return line.strip()
        return self._tail[-1].strip() if self._tail else ""

    def _failure(self, code: int) -> Exception:
        text = self.log_tail
        port = _PORT_TAKEN.search(text)
        if port:
            message = f"tritonserver could not bind {port.group(1) or port.group(2)}: address already in use"
            return _PortRace(message) if 0 in self._requested.values() else TritonStartError(message)
        failed = []
        for line in self._tail:
            m = _LOAD_FAILED.search(line.strip())
            if m:
                # the python backend appends the stub's stack ("At: file(line): function"): drop it
                reason = re.split(r"(?:\\n|\s)+At:(?:\\n|\s)", m.group(3))[0].replace("\\n", " ").strip()
                where = self._repo_dir / m.group(1) if self._repo_dir is not None else m.group(1)
                failed.append(f"model '{m.group(1)}' failed to load from {where}: {reason}")
        if failed:
            return TritonStartError("; ".join(dict.fromkeys(failed)))
        return TritonStartError(
            f"tritonserver exited with code {code} before it was ready (repository {self._repo_dir}): "
            f"{self._last_error() or 'no log'}"
        )

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the server's process group."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop in %.0f s; killing it", timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            # python-backend stubs live in the server's session; none may outlive it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL the server's process group at once, then clean up as :meth:`stop` does (its stubs, their shared
        memory): for a server no client calls any more. Its own stop (SIGTERM) first unloads the models, 3-4 s here
        for nothing to keep: the python backend checks each instance's stub with a fixed 1 s sleep before it
        finalizes it, one instance after another, and the server looks every second whether all are gone."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.stop()  # reaps it and cleans up

    def restart(self, timeout: float = 180.0) -> EmbeddedTriton:
        """Start a server that died again, on the same ports (clients keep their URLs).

        Raises
        ------
        TritonStartError
            As :meth:`start` (e.g. a port is still taken).
        """
        self.stop()  # reaps the dead server and any python-backend stub it left
        self._requested = dict(self._ports)
        return self.start(timeout)

    def _cleanup(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if self._shm_prefix is not None:  # the server and its stubs are gone: so are their regions
            remove_shm(self._shm_prefix)
            self._shm_prefix = None
        self._release_ports()
        _LIVE.discard(self)


class Supervisor(threading.Thread):
    """Restarts an :class:`EmbeddedTriton` that died, with back-off; ``on_restart`` is called after each.

    Checks every ``interval`` s; waits ``backoff`` s (doubling up to ``max_backoff``) before each try.
    Every death and restart is logged; :meth:`close` stops watching (call it before stopping the server).
    """

    lives_with_process = True  # servers started from this thread get the parent-death signal

    def __init__(self, triton: EmbeddedTriton, *, on_restart: Callable[[], None] | None = None,
                 start_timeout: float = 300.0, interval: float = 1.0, backoff: float = 1.0,
                 max_backoff: float = 30.0) -> None:
        super().__init__(name="tritonserver-supervisor", daemon=True)
        self.triton, self.on_restart = triton, on_restart
        self.start_timeout, self.interval = start_timeout, interval
        self.backoff, self.max_backoff = backoff, max_backoff
        self.restarts = 0
        self._closed = threading.Event()

    def run(self) -> None:
        wait, down = self.backoff, False
        while not self._closed.wait(self.interval):
            if not down:
                proc = self.triton._proc
                if proc is None or proc.poll() is None:
                    continue
                down = True
                logger.error("tritonserver died (exit code %s): %s; restarting it in %g s", proc.returncode,
                             self.triton._last_error() or "no log", wait)
            if self._closed.wait(wait):
                return
            try:
                self.triton.restart(self.start_timeout)
            except TritonStartError as exc:
                wait = min(self.max_backoff, wait * 2)
                logger.error("tritonserver restart failed: %s; next try in %g s", exc, wait)
                continue
            down = False
            self.restarts += 1
            wait = self.backoff
            logger.warning("tritonserver restarted (restart %d): grpc %s", self.restarts, self.triton.grpc_url)
            if self.on_restart is not None:
                self.on_restart()

    def close(self) -> None:
        """Stop watching (returns at once; the thread ends within ``interval``)."""
        self._closed.set()


class _PortRace(TritonStartError):
    """An automatically chosen port was taken between our check and the server's bind."""


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``ctscreen triton [--grpc-port --http-port --metrics-port --repo DIR]``."""
    parser = argparse.ArgumentParser(
        prog="ctscreen triton",
        description="Run the real tritonserver of the nvidia-pytriton wheel on the cpu model repository.",
    )
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    parser.add_argument("--repo", type=Path, help="a rendered repository (default: the cpu profile, cached)")
    parser.add_argument("--log-file", type=Path, help="also write the server log here")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for READY")
    parser.add_argument("--quiet", action="store_true", help="do not forward the server log to stderr")
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if args.log_file is not None:
        try:  # fail here with one line, not with a traceback once the server is launching
            args.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(args.log_file, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            parser.error(f"--log-file {args.log_file} cannot be written: {exc.strerror or exc}")
    try:
        triton = EmbeddedTriton(
            args.repo,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            log_file=args.log_file,
            host=args.host,
            log_verbose=args.log_verbose,
            echo=None if args.quiet else sys.stderr,
        )
    except ValueError as exc:
        sys.stderr.write(f"ctscreen triton: {exc}\n")
        return 2

    stopping = threading.Event()
    with stop_on_signals(stopping):
        return _serve(triton, stopping, args.timeout)


def _serve(triton: EmbeddedTriton, stopping: threading.Event, timeout: float) -> int:
    """Run ``triton`` until ``stopping`` is set or it exits by itself; stop it after."""
    try:
        try:
            triton.start(timeout=timeout, cancel=stopping)
        except TritonStartError as exc:
            sys.stderr.write(f"ctscreen triton: {exc}\n")
            return 130 if stopping.is_set() else 1
        sys.stderr.write(
            f"ctscreen triton: ready, grpc {triton.grpc_url}, http {triton.http_url}, "
            f"metrics {triton.metrics_url}, repository {triton.repo_dir}\n"
        )
        sys.stderr.flush()
        while not stopping.wait(0.5):
            if not triton.running:
                sys.stderr.write(
                    f"ctscreen triton: tritonserver exited unexpectedly: {triton._last_error()}\n"
                )
                return 1
        sys.stderr.write("ctscreen triton: stopping\n")
        return 0
    finally:
        triton.stop()

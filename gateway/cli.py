"""``ctscreen serve``, ``ctscreen screen`` and ``ctscreen demo``.

* ``serve``: the embedded Triton (cpu profile) and the gateway on localhost, one command; Ctrl-C stops
  both. A Triton that dies is restarted (back-off, logged, ``ctscreen_triton_restarts_total``) while
  accepted jobs wait in the state store; SIGTERM stops taking work and releases running jobs first.
* ``screen PATH... [--url URL] [--json]``: upload each study (a folder of DICOM files, a zip, or one
  file) to a running gateway with a progress bar, follow its progress, print a verdict table.
* ``db upgrade``: upgrade the state store's schema (what ``serve`` does at start; the Helm hook Job);
  ``db downgrade REVISION``: back to a revision named explicitly, printing what it undoes first.
* ``demo``: ``serve`` plus sample studies made on the spot (phantom COVID and normal studies), screened
  and printed, then the service stays up with its URL printed until Ctrl-C (``--exit``: stop after
  printing).

The HTTP client that ``screen``, ``send`` and ``demo`` use (upload, follow, verdict table) is
:mod:`gateway.client`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctscreen.signals import stop_on_signals
from gateway.client import CliError, error_of, http_client, screen_paths, verdict_table

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"


# --- the stack: embedded Triton + the gateway under uvicorn ------------------------------------
@dataclass
class Stack:
    """A running gateway (and the embedded Triton it uses, if any)."""

    url: str
    triton_url: str
    settings: Any = None
    _server: Any = None
    _thread: threading.Thread | None = None
    _triton: Any = None

    _stop: threading.Event = field(default_factory=threading.Event)
    _signals_held: bool = False

    def wait(self) -> None:
        """Block until Ctrl-C or SIGTERM, or until the server stops by itself.

        The signal handlers only set an event: an exception raised inside ``Thread.join`` would leave
        the thread marked as stopped while it runs, and the gateway would never shut down cleanly.
        ``run_stack(handle_signals=True)`` installs them before the gateway answers its first request,
        so a signal sent as soon as ``/readyz`` says ready still stops it cleanly.
        """
        assert self._thread is not None
        with contextlib.nullcontext() if self._signals_held else stop_on_signals(self._stop):
            while self._thread.is_alive() and not self._stop.wait(0.5):
                pass
            if self._stop.is_set():
                from gateway.logs import say

                say("\nstopping ...", getattr(self.settings, "log_format", "text"))


def _preflight(settings: Any) -> None:
    """What the gateway's start-up opens that a site may have got wrong, checked before Triton starts, each said
    in one line: the blob folder (a file in its way, a read-only volume; one that is not the database's:
    :mod:`gateway.store.pairing`) and the DICOM TLS files. Found by the
    gateway's own start-up instead, each was a 60-line traceback and '(port taken?)'.

    Raises
    ------
    CliError
        The blob store cannot be opened, or a TLS file cannot be read.
    """
    from gateway.store.pairing import StorePairingError, check_pairing_now

    where = settings.blob_url or str(settings.blobs())
    try:
        blobs = settings.blob_store()
    except OSError as exc:
        raise CliError(f"the blob store {where} cannot be opened: {exc.strerror or exc}") from None
    try:
        check_pairing_now(settings.database(), blobs)
    except StorePairingError as exc:
        raise CliError(str(exc)) from None
    if settings.dicom_port is not None:
        for name, path in (("CTSCREEN_DICOM_TLS_CERT", settings.dicom_tls_cert),
                           ("CTSCREEN_DICOM_TLS_KEY", settings.dicom_tls_key), ("CTSCREEN_DICOM_TLS_CA", settings.dicom_tls_ca)):
            if path is not None and not os.access(path, os.R_OK):
                raise CliError(f"{name} {path} cannot be read")


@contextmanager
def run_stack(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    triton_url: str | None = None,
    repo: Path | None = None,
    log_level: str = "warning",
    start_timeout: float = 300.0,
    settings_overrides: dict[str, Any] | None = None,
    handle_signals: bool = False,
) -> Iterator[Stack]:
    """Start the embedded Triton (unless ``triton_url``) and the gateway; stop both on exit.

    ``port=0`` picks a free port. The gateway runs in a background thread; the caller's thread is
    free (see :meth:`Stack.wait`). ``handle_signals`` (main thread only): from the moment the gateway
    starts, SIGTERM and SIGINT ask :meth:`Stack.wait` to stop instead of raising KeyboardInterrupt;
    one that arrives before the gateway is up aborts the start (KeyboardInterrupt).
    """
    from gateway.logs import configure, say

    settings = _settings({"host": host, **(settings_overrides or {})})  # before Triton starts: a bad setting costs nothing
    configure(settings.log_format)  # before the imports below: alembic's logs a line as it is imported

    import uvicorn

    from ctscreen.embedded import EmbeddedTriton, Supervisor, free_port
    from gateway.httpserver import bounded_protocol
    from gateway.main import create_app, tune_malloc
    from gateway.store.migrate import SchemaError, prepare_schema

    try:  # so is a schema this release cannot run on
        prepare_schema(settings.database(), settings.db_migrate, settings.db_start_wait_s)
    except SchemaError as exc:
        raise CliError(str(exc)) from None
    _preflight(settings)
    tune_malloc(settings.malloc_tuning)  # this process runs the gateway (Triton's processes take MALLOC_ENV at start)
    triton = supervisor = None
    try:
        if triton_url is None:
            say("starting the embedded Triton (cpu profile) ...", settings.log_format)
            triton = EmbeddedTriton(repo)
            triton.start(timeout=start_timeout)
            triton_url = triton.grpc_url
            if "triton_model" not in settings.model_fields_set and triton.screen_model:
                # on a CPU the fused model screens the same slices to the same boxes, one stub a slice
                # instead of three (docs/triton.md); CTSCREEN_TRITON_MODEL=ct_screen picks the ensemble
                settings = settings.model_copy(update={"triton_model": triton.screen_model})
        settings = settings.model_copy(update={"triton_urls": [triton_url]})
        app = create_app(settings, start_checked=True)
        if triton is not None:
            supervisor = Supervisor(triton, start_timeout=start_timeout,
                                    on_restart=lambda: app.state.metrics.triton_restarts.inc())
            supervisor.start()
        if port == 0:
            port = free_port(host)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=5,  # a head over the limit: 431 (gateway.httpserver)
                                http=bounded_protocol(settings.max_request_head_bytes))
        configure(settings.log_format)  # again: uvicorn.Config has just set up uvicorn's loggers
        server = uvicorn.Server(config)
        stop = threading.Event()
        with contextlib.ExitStack() as held:
            if handle_signals:
                held.enter_context(stop_on_signals(stop))
            thread = threading.Thread(target=server.run, name="ctscreen-gateway", daemon=True)
            thread.start()
            deadline = time.monotonic() + 60
            while not server.started:
                if stop.is_set():
                    server.should_exit = True
                    thread.join(15)
                    raise KeyboardInterrupt
                if not thread.is_alive():
                    raise CliError(f"the gateway could not start on {host}:{port} (the port taken, or its start-up "
                                   "failed: the log above says why)")
                if time.monotonic() > deadline:
                    raise CliError("the gateway did not start within 60 s")
                time.sleep(0.05)
            shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            stack = Stack(url=f"http://{shown}:{port}", triton_url=triton_url, settings=settings, _server=server,
                          _thread=thread, _triton=triton, _stop=stop, _signals_held=handle_signals)
            try:
                yield stack
            finally:
                app.state.drain()  # no new claim, event streams end: the server need not wait for them
                server.should_exit = True  # the lifespan stops claiming and releases running jobs ...
                thread.join(settings.shutdown_grace_s + 15)
    finally:
        if supervisor is not None:
            supervisor.close()
        if triton is not None:
            # ... before Triton goes. Killed: the gateway, its only client, has stopped, so nothing is in flight;
            # its own stop (SIGTERM) unloaded every model for 3-4 s more before `ctscreen serve` could exit
            triton.kill()


def _settings(overrides: dict[str, Any] | None) -> Any:
    """Settings from the environment and ``overrides``; one-line errors. (The state store is migrated by
    :func:`gateway.store.migrate.prepare_schema`, which waits for a database not up yet.)"""
    from pydantic import ValidationError

    from gateway.settings import Settings, setting_error

    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        raise CliError(setting_error(exc)) from None


# --- subcommands --------------------------------------------------------------------------------
def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="gateway port; 0 picks a free one (default 8000)")
    p.add_argument("--triton-url", default=None,
                   help="use this Triton gRPC endpoint (host:port) instead of starting the embedded one")
    p.add_argument("--repo", type=Path, default=None, help="Triton model repository (default: the cpu profile)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--insecure", action="store_true",
                   help="serve without authentication on a non-loopback --host (default: refused)")


def _bind_error(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now, or None when it can."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"--host {host} cannot be resolved ({exc.strerror})"
    bound = None
    for family, _, _, _, address in infos:  # the server binds every address the name resolves to
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # a family this kernel lacks (IPv6 off): the server skips it too
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"{host}:{port} is already in use (another server?); pick another port or 0"
                return f"{host}:{port} cannot be bound ({exc.strerror or exc}; is {host} an address of this machine?)"
            bound = address
    return None if bound is not None else f"{host}:{port} cannot be bound (no address family of it is available)"


def _check_free(p: argparse.ArgumentParser, flag: str, host: str, port: int) -> None:
    """Refuse a taken port (or a host that is not this machine's) up front, in one line, before anything
    is started."""
    why = _bind_error(host, port) if port else None
    if why is not None:
        p.error(why if why.startswith("--host") else f"{flag} {port}: {why}")


def _check_stack_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from gateway.settings import unknown_variables

    for line in unknown_variables(os.environ):  # before anything can stop the start: a typo may be its cause
        print(f"ctscreen {p.prog.split()[-1]}: warning: {line}", file=sys.stderr, flush=True)
    if not 0 <= args.port < 65536:
        p.error(f"--port must be 0..65535, got {args.port}")
    _check_free(p, "--port", args.host, args.port)
    if args.repo is not None and not args.repo.is_dir():
        p.error(f"--repo {args.repo}: no such folder")
    if args.triton_url is not None:
        from gateway.settings import check_endpoint

        try:
            check_endpoint(args.triton_url)
        except ValueError as exc:
            p.error(str(exc))


def _check_exposure(p: argparse.ArgumentParser, host: str, overrides: dict[str, Any]) -> None:
    """Off loopback, refuse to start without auth (CTSCREEN_AUTH_*) unless --insecure; one line."""
    from pydantic import ValidationError

    from gateway.auth import AuthConfigError, check_exposure
    from gateway.settings import Settings, setting_error

    try:
        check_exposure(Settings(**{"host": host, **overrides}), host)
    except AuthConfigError as exc:
        p.exit(2, f"{p.prog}: {exc}\n")
    except ValidationError as exc:
        p.exit(2, f"{p.prog}: {setting_error(exc)}\n")


def _metrics_port(p: argparse.ArgumentParser) -> int | None:
    """``CTSCREEN_METRICS_PORT`` (the settings' own check, in one line), or None."""
    from pydantic import ValidationError

    from gateway.settings import Settings, setting_error

    try:
        return Settings().metrics_port
    except ValidationError as exc:
        p.exit(2, f"ctscreen serve: {setting_error(exc)}\n")


def _described(command: str) -> str:
    """The module docstring's item on ``command``, as plain text (its --help description)."""
    items = (__doc__ or "").split("\n\n")[1].lstrip("* ").split("\n* ")
    text = " ".join(next(i for i in items if i.startswith(f"``{command}``:")).split(":", 1)[1].split())
    return (text[0].upper() + text[1:]).replace("``", "")


def serve_main(argv: list[str]) -> int:
    """``ctscreen serve``: embedded Triton + gateway on localhost until Ctrl-C."""
    p = argparse.ArgumentParser(prog="ctscreen serve", description=_described("serve"))
    _stack_args(p)
    p.add_argument("--dicom-port", type=int, default=None,
                   help="also listen for DICOM C-STORE / C-ECHO on this port (a Storage SCP; default: off)")
    p.add_argument("--dicom-ae-title", default="CTSCREEN", help="AE title of the DICOM SCP (default CTSCREEN)")
    p.add_argument("--destinations", type=Path, default=None, metavar="FILE",
                   help="send results to the PACS / RIS destinations of this YAML or JSON file (see docs/gateway.md)")
    args = p.parse_args(argv)
    _check_stack_args(p, args)
    if args.dicom_port is not None and not 0 < args.dicom_port < 65536:
        p.error(f"--dicom-port must be 1..65535, got {args.dicom_port}")
    if args.dicom_port is not None and args.dicom_port == args.port:
        p.error(f"--dicom-port {args.dicom_port} is the API's --port: give each its own")
    if args.dicom_port is not None:
        _check_free(p, "--dicom-port", args.host, args.dicom_port)
    if not 0 < len(args.dicom_ae_title.strip()) <= 16:
        p.error(f"--dicom-ae-title must be 1 to 16 characters, got {args.dicom_ae_title!r}")
    overrides: dict[str, Any] = {} if args.dicom_port is None else {
        "dicom_port": args.dicom_port, "dicom_host": args.host, "dicom_ae_title": args.dicom_ae_title.strip()}
    if args.destinations is not None:
        from gateway.delivery import DestinationsError, load_destinations

        try:
            names = [d.name for d in load_destinations(args.destinations)]
        except DestinationsError as exc:
            p.error(str(exc))
        overrides["destinations_file"] = args.destinations
    if args.insecure:
        overrides["auth_insecure"] = True
    _check_exposure(p, args.host, overrides)  # one line, before Triton starts
    metrics_port = _metrics_port(p)
    if metrics_port:
        _check_free(p, "CTSCREEN_METRICS_PORT", args.host, metrics_port)
    _logging(args.log_level)
    try:
        with run_stack(host=args.host, port=args.port, triton_url=args.triton_url, repo=args.repo,
                       log_level=args.log_level, settings_overrides=overrides, handle_signals=True) as stack:
            from gateway.store import redact

            print(f"ctscreen gateway: {stack.url}  (web page {stack.url}/, API schema {stack.url}/openapi.json, "
                  f"Triton gRPC {stack.triton_url})")
            print(f"state store: {redact(stack.settings.database())}  blobs: {stack.settings.blob_url or stack.settings.blobs()}")
            if args.destinations is not None:
                print(f"results sent to: {', '.join(names) or 'no destination'}")
            if args.dicom_port is not None:
                print(f"DICOM C-STORE SCP: AE {overrides['dicom_ae_title']} on {args.host}:{args.dicom_port}")
            print("Ctrl-C to stop.", flush=True)
            stack.wait()
    except CliError as exc:
        print(f"ctscreen serve: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # TritonStartError and friends: one line, no traceback
        print(f"ctscreen serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _sqlite_file_missing(url: str) -> bool:
    """Whether ``url`` names a SQLite database file that is not there (SQLite would create it on opening)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    path = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or path in ("", ":memory:") or path.startswith("file:"):
        return False
    return not Path(path).exists()


def _upgraded(before: str | None, after: str | None, target: str) -> str:
    """What ``ctscreen db upgrade`` did, from the database's revision ``before`` and ``after`` it (Alembic goes only
    forward: a ``--revision`` behind the database changes nothing, which "upgraded to REV" misreported)."""
    from gateway.store.migrate import head

    newest = head()
    if after != before:
        return f"upgraded{f' from {before}' if before else ''} to {after}" + ("" if after == newest else
                                                                               f" (newest {newest})")
    if target in ("head", after):
        return f"at revision {after} already: nothing to upgrade"
    return f"at revision {after}, past {target} already: nothing to upgrade (`ctscreen db downgrade {target}` goes back)"


def db_main(argv: list[str]) -> int:
    """``ctscreen db upgrade [--revision REV]`` / ``ctscreen db downgrade REVISION [--dry-run]`` /
    ``ctscreen db current``."""
    p = argparse.ArgumentParser(prog="ctscreen db", description="The gateway's state store (CTSCREEN_DATABASE_URL, "
                                "or SQLite in CTSCREEN_DATA_DIR).")
    sub = p.add_subparsers(dest="action", required=True)
    up = sub.add_parser("upgrade", help="upgrade the schema (to the newest revision by default)")
    up.add_argument("--revision", default="head",
                    help="target revision: one this release ships, by its full id, or head (the default)")
    down = sub.add_parser("downgrade", help="undo migrations back to REVISION (no default), dropping what they made")
    down.add_argument("revision", metavar="REVISION",
                      help="a revision this release ships (`ctscreen db current` names the newest), or base: no schema")
    down.add_argument("--dry-run", action="store_true", help="print what it would undo and change nothing")
    sub.add_parser("current", help="print the schema revision of the database")
    args = p.parse_args(argv)
    from gateway.store import redact
    from gateway.store.migrate import RevisionError, SchemaError

    try:
        settings = _settings({"db_migrate": False})
        database = settings.database()
        if args.action == "downgrade":
            from gateway.store.migrate import downgrade, plan_downgrade

            plan = plan_downgrade(database, args.revision)
            print("\n".join(plan.lines()), flush=True)
            if plan.steps and args.dry_run:
                print("dry run: nothing changed")
            elif plan.steps:
                downgrade(plan)
                print(f"state store {redact(database)}: downgraded to {plan.target}")
        elif args.action == "upgrade":
            from gateway.store.migrate import database_revision, known_revision, upgrade

            known_revision(args.revision, "head")  # before the database is opened
            before = None if _sqlite_file_missing(database) else database_revision(database)
            later = upgrade(database, args.revision)
            if later is not None:  # a later release migrated it (then a rollback): nothing to do here
                print(f"state store {redact(database)}: at revision {later}, later than this release ships; "
                      "left as it is (migrations only add)")
            else:
                print(f"state store {redact(database)}: {_upgraded(before, database_revision(database), args.revision)}")
        else:
            from gateway.store.migrate import database_revision, head

            if _sqlite_file_missing(database):  # opening it would create it (or fail: no folder)
                print(f"state store {redact(database)}: no database yet, revision none (newest {head()}); "
                      "`ctscreen db upgrade` creates it")
                return 0
            at = database_revision(database) or "none"
            print(f"state store {redact(database)}: revision {at} (newest {head()})")
    except (CliError, RevisionError, SchemaError) as exc:
        print(f"ctscreen db: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - unreachable database, unknown revision: one line
        print(f"ctscreen db: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    return 0


def send_main(argv: list[str]) -> int:
    """``ctscreen send JOB_ID --to NAME [--url URL] [--force]``: queue a result's delivery again."""
    p = argparse.ArgumentParser(prog="ctscreen send",
                                description="Send a job's result to a configured destination again (a re-send).")
    p.add_argument("job_id", metavar="JOB_ID",
                   help="the job whose result to send: its job_id, as GET /v1/studies/{uid} and the web "
                        "page's study address (#/study/JOB_ID) give it")
    p.add_argument("--to", required=True, metavar="NAME", help="destination name from the destinations file")
    p.add_argument("--force", action="store_true", help="send again even if it was delivered (same UIDs)")
    p.add_argument("--url", default=os.environ.get("CTSCREEN_URL", DEFAULT_URL),
                   help=f"gateway URL (default $CTSCREEN_URL or {DEFAULT_URL})")
    p.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds (default 30)")
    args = p.parse_args(argv)
    if not args.url.startswith(("http://", "https://")):
        p.error(f"--url must start with http:// or https://, got {args.url!r}")
    if args.timeout <= 0:
        p.error(f"--timeout must be > 0, got {args.timeout}")
    import httpx

    try:
        with http_client(args.url, args.timeout) as http:
            r = http.post(f"/v1/jobs/{args.job_id}/deliveries/{args.to}/resend",
                          params={"force": "true"} if args.force else None)
    except httpx.HTTPError as exc:
        print(f"ctscreen send: cannot reach {args.url}: {type(exc).__name__}", file=sys.stderr)
        return 1
    except CliError as exc:  # a $CTSCREEN_TOKEN no header can carry
        print(f"ctscreen send: {exc}", file=sys.stderr)
        return 1
    if r.status_code != 202:
        err = error_of(r)
        message = str(err.get("message", err.get("reason")))
        if err.get("reason") == "not_resendable":  # the API names its query parameter; here it is an option
            message = message.replace("force=true", "--force")
        print(f"ctscreen send: {message}", file=sys.stderr)
        return 1
    body = r.json()
    print(f"job {args.job_id} -> {args.to}: {body['state']} (objects are sent by the gateway; "
          f"GET /v1/jobs/{args.job_id}/deliveries shows progress)")
    return 0


def screen_main(argv: list[str]) -> int:
    """``ctscreen screen PATH... [--url URL] [--json]``."""
    p = argparse.ArgumentParser(prog="ctscreen screen",
                                description="Upload studies to a ctscreen gateway and print their verdicts "
                                            "(credential: $CTSCREEN_TOKEN, a bearer token or API key).")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="a study: a folder of DICOM files, a zip archive, or one DICOM file")
    p.add_argument("--url", default=os.environ.get("CTSCREEN_URL", DEFAULT_URL),
                   help=f"gateway URL (default $CTSCREEN_URL or {DEFAULT_URL})")
    p.add_argument("--json", action="store_true", help="print the CaseResult documents as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--timeout", type=float, default=600.0, help="HTTP timeout in seconds (default 600)")
    p.add_argument("--priority", choices=("urgent", "routine", "low"), default="routine",
                   help="urgent: screened before every routine and low study waiting (default routine)")
    args = p.parse_args(argv)
    if not args.url.startswith(("http://", "https://")):
        p.error(f"--url must start with http:// or https://, got {args.url!r}")
    import httpx

    try:
        httpx.URL(args.url)
    except (httpx.InvalidURL, ValueError) as exc:
        p.error(f"--url {args.url!r} is not a valid URL: {exc}")
    if not args.timeout > 0:
        p.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    for path in args.paths:
        if not path.exists():
            p.error(f"{path}: no such file or folder")
    try:
        outcomes = screen_paths(args.url.rstrip("/"), args.paths, quiet=args.quiet or args.json,
                                timeout=args.timeout, priority=args.priority)
    except CliError as exc:
        print(f"ctscreen screen: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([o.result if o.result is not None else {"path": o.path, "error": o.error}
                          for o in outcomes], indent=2))
    else:
        print(verdict_table(outcomes))
    return 0 if all(o.result is not None for o in outcomes) else 1


def make_samples(out: Path, n_slices: int, kinds: Sequence[str] = ("covid", "normal")) -> dict[str, str]:
    """Write one phantom study per kind under ``out``; returns ``{path: kind}``."""
    import phantom

    truth = {}
    for seed, kind in enumerate(kinds, start=1):
        study = phantom.make_study(seed=seed, kind=kind, n_slices=n_slices)
        path = Path(phantom.write_study(study, out / f"{kind}-{seed}"))
        truth[str(path)] = kind
    return truth


def demo_main(argv: list[str]) -> int:
    """``ctscreen demo``: serve, screen phantom samples, print verdicts, stay up until Ctrl-C."""
    p = argparse.ArgumentParser(
        prog="ctscreen demo",
        description="Start the embedded stack, screen phantom COVID and normal studies made on the spot, "
                    "print their verdicts and keep the service running until Ctrl-C.")
    _stack_args(p)
    p.add_argument("--slices", type=int, default=64, help="slices per sample study (default 64)")
    p.add_argument("--out", type=Path, default=None, help="where sample studies are written (default: a temp dir)")
    p.add_argument("--exit", action="store_true", help="stop after printing the verdicts")
    args = p.parse_args(argv)
    _check_stack_args(p, args)
    if not 8 <= args.slices <= 1000:
        p.error(f"--slices must be 8..1000, got {args.slices}")
    if args.out is not None:
        try:  # before anything starts: a bad folder must not cost a Triton start
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            p.error(f"--out {args.out}: cannot be created ({exc.strerror or exc})")
    overrides: dict[str, Any] = {"auth_insecure": True} if args.insecure else {}
    _check_exposure(p, args.host, overrides)  # one line, before Triton starts, as for serve
    _logging(args.log_level)
    tmp = None
    try:
        out = args.out
        if out is None:
            tmp = tempfile.TemporaryDirectory(prefix="ctscreen-demo-")
            out = Path(tmp.name)
        # the audit trail goes beside the samples, not between the progress bars and the verdict table
        audit = out / "audit.jsonl"
        with run_stack(host=args.host, port=args.port, triton_url=args.triton_url, repo=args.repo,
                       log_level=args.log_level, settings_overrides={**overrides, "audit_log_file": audit}) as stack:
            print(f"gateway up at {stack.url}; making sample studies in {out} ...", file=sys.stderr, flush=True)
            truth = make_samples(out, args.slices)
            outcomes = screen_paths(stack.url, [Path(p) for p in truth])
            print(verdict_table(outcomes, truth))
            print(f"\nctscreen is running at {stack.url}  (web page {stack.url}/, API schema {stack.url}/openapi.json)")
            print(f"screen your own studies: ctscreen screen PATH --url {stack.url}", flush=True)
            if args.out is not None:
                print(f"audit log: {audit}", flush=True)
            if not args.exit:
                print("Ctrl-C to stop.", flush=True)
                stack.wait()
            failed = [o for o in outcomes if o.result is None]
    except CliError as exc:
        print(f"ctscreen demo: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line, no traceback
        print(f"ctscreen demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 1 if failed else 0

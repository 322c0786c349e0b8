"""Shared fixtures: the session's real embedded tritonserver, free loopback ports, a data folder per test.

``triton`` starts :class:`ctscreen.embedded.EmbeddedTriton` once per test session on the cpu profile
rendered from ``model_repository/`` (the shipped ONNX files), on free ports, and stops it at the end.
Tests that use it should carry ``@pytest.mark.triton``. Its log is written to the session's temporary
folder and printed when start-up fails.

``browser`` is Debian's Chromium (headless) driven by Playwright, one per test module, and ``page`` a fresh tab in it
that fails its test on a JavaScript error or a Content-Security-Policy refusal (``tests/test_web_*.py``).

``postgres`` is a real PostgreSQL server for the session, ``pg_url`` a fresh database in it, ``db_url`` a fresh
state store on SQLite and on PostgreSQL (two runs of the test).

Every test runs with ``CTSCREEN_DATA_DIR`` set to a folder of its own, so a gateway made by a test
keeps its state store (SQLite) and blobs there, never in the user's data folder or another test's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctscreen.embedded import EmbeddedTriton, TritonStartError
from ctscreen.embedded import free_port as _free_port
from tests.postgres import PostgresServer, pg_bin


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` a moment ago; never hard-code ports in tests."""
    return _free_port(host)


_RUN_DATA_DIR: list[str] = []  # the run's data folder when this process made it (removed at the end)


def pytest_configure(config: pytest.Config) -> None:
    """Module- and session-scoped gateways get a data folder of the run, never the user's."""
    if "CTSCREEN_DATA_DIR" not in os.environ:
        os.environ["CTSCREEN_DATA_DIR"] = tempfile.mkdtemp(prefix="ctscreen-test-data-")
        _RUN_DATA_DIR.append(os.environ["CTSCREEN_DATA_DIR"])


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the run's data folder (module-scoped gateways keep studies there: 150 MB a run)."""
    while _RUN_DATA_DIR:
        shutil.rmtree(_RUN_DATA_DIR.pop(), ignore_errors=True)


# The test files that take longest (their tests' durations in CI at dea7ca9, most first: 132 s down to 20 s).
# scripts/test.sh hands test files to its two workers in collection order (--dist loadfile
# --no-loadscope-reorder; xdist's own order is by number of tests, which put the 132 s file of 11 tests late),
# so these go first and the run ends on short files rather than one worker finishing a long one alone. Order
# only: a file missing here still runs, after these, in the usual order.
LONGEST_FIRST = (
    "test_gateway_cluster.py", "test_models_quality.py", "test_web_page.py", "test_store.py",
    "test_gateway_app_api.py", "test_gateway_delivery.py", "test_cli_bad_args.py", "test_gateway_stow_durable.py",
    "test_store_s3.py", "test_triton_server.py", "test_gateway_admission.py", "test_gateway_auth.py",
    "test_aggregator_eval.py", "test_gateway_dimse.py", "test_training_models.py", "test_e2e_gateway.py",
    "test_triton_cli.py", "test_e2e_delivery.py", "test_gateway_speculation.py", "test_balancing_triton.py",
    "test_benchmarks_smoke.py", "test_gateway_stream.py", "test_gateway_hostile_requests.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of :data:`LONGEST_FIRST` first, in that order; each file's tests keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _data_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTSCREEN_DATA_DIR", str(tmp_path_factory.mktemp("ctscreen-data")))


CHROMIUM = os.environ.get("CTSCREEN_CHROMIUM", "/usr/bin/chromium")
"""The browser of the web page's tests (never downloaded: scripts/setup.sh --test installs Debian's)."""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    # a script or style the page's Content-Security-Policy refuses shows only here (the policy allows no eval:
    # wait_for_function takes arrow functions, which Playwright calls, not strings it would evaluate)
    pg.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        yield pg
    finally:
        # a test's route handler still running (a slice's fetch while the page reloads) failed once in CI as
        # "Route.fulfill: Fetch response has been disposed", raised into the next test's setup: routes go first,
        # their late errors dropped (Playwright's unroute_all(behavior="ignoreErrors"))
        pg.unroute_all(behavior="ignoreErrors")
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL 15 server for the session (``tests/postgres.py``); skipped when not installed."""
    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed: scripts/setup.sh --test installs Debian's postgresql")
    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The URL of a fresh, empty PostgreSQL database."""
    return postgres.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh state store URL, once on SQLite (a file of the test's folder) and once on PostgreSQL (``pg_url``)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    """A started real tritonserver serving the cpu profile (valid_area, lesion, postprocess, ct_screen)."""
    log_file = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = EmbeddedTriton(log_file=log_file)
    try:
        server.start(timeout=300)
    except TritonStartError as exc:
        tail = log_file.read_text(errors="replace")[-4000:] if log_file.exists() else ""
        pytest.fail(f"embedded tritonserver did not start: {exc}\n--- log tail ---\n{tail}", pytrace=False)
    try:
        yield server
    finally:
        # killed (EmbeddedTriton.kill): a graceful stop unloads each python-backend instance after a 1 s health
        # check, one after another, which nothing here waits on; the tests that stop their own servers cover it
        server.kill()

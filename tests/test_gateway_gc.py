"""The gateway's collector tuning (``gateway.main.tuned_gc``) is on while the app runs and undone when it stops;
and the docstring examples of the gateway modules that have them run.

Triton is the fake client of ``tests/gateway_app_fakes.py``: this is about the process, not inference.
"""

from __future__ import annotations

import doctest
import gc
import importlib

import pytest
from fastapi.testclient import TestClient

from gateway.main import GC_GEN0_THRESHOLD, create_app
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet


@pytest.mark.parametrize("tuning", [True, False])
def test_the_collector_is_tuned_while_the_app_runs(tmp_path, tuning: bool) -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    app = create_app(Settings(triton_urls="fake:1", data_dir=tmp_path, gc_tuning=tuning), client_factory=FakeFleet())
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        if tuning:
            assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *before[1:])
            assert gc.get_freeze_count() > 1000  # the start-up heap: FastAPI, SQLAlchemy, pydicom, ...
        else:
            assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


@pytest.mark.parametrize("name", ["gateway.main", "gateway.screening", "gateway.dicom", "gateway.phi", "gateway.delivery.payloads",
                                  "gateway.web", "gateway.dicom_security", "gateway.dimse", "gateway.uids",
                                  "gateway.series", "gateway.store.store", "gateway.store.blobs", "gateway.web.labels", "gateway.web.render",
                                  "gateway.api.errors", "gateway.settings", "gateway.store.waits", "gateway.jobs",
                                  "gateway.delivery.senders", "gateway.uploads", "gateway.api.studies", "gateway.auth",
                                  "gateway.logs", "gateway.httpserver", "ctscreen.signals"])
def test_doctests(name: str) -> None:
    """The examples in these modules' docstrings (the suite does not use --doctest-modules)."""
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0

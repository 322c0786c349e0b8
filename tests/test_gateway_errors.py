"""The gateway's one error tree (gateway.errors) and its one HTTP mapping (gateway.api.errors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.errors import (
    REASONS,
    AuthBusy,
    AuthNotConfigured,
    AuthThrottled,
    AuthUnavailable,
    Busy,
    GatewayError,
    InferenceFailed,
    InferenceUnavailable,
    InstancesExpired,
    InsufficientScope,
    JobNotFound,
    NoSuchSlice,
    NotDone,
    NotFound,
    NotRescreenable,
    NotResendable,
    NotRetryable,
    OverBudget,
    SrUnavailable,
    Superseded,
    TooManyStreams,
    Unauthorized,
    Unavailable,
    error_classes,
)
from gateway.main import create_app
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet

# (error, status, reason, headers the answer must carry)
ANSWERS = [
    (Busy("Full.", 7), 429, "busy", {"retry-after": "7"}),
    (OverBudget("Too many bytes in flight.", 3), 429, "over_budget", {"retry-after": "3"}),
    (AuthBusy("Too many key checks.", 1), 429, "auth_busy", {"retry-after": "1"}),
    (AuthThrottled("Key id failed too often.", 9), 429, "auth_throttled", {"retry-after": "9"}),
    (TooManyStreams("Too many streams.", 5), 429, "too_many_streams", {"retry-after": "5"}),
    (JobNotFound("No job 'x'."), 404, "not_found", {}),
    (NotFound("No destination 'pacs'."), 404, "not_found", {}),
    (NoSuchSlice("No slice 9."), 404, "no_such_slice", {}),
    (InferenceUnavailable("No Triton endpoint answered."), 503, "triton_unavailable", {"retry-after": "5"}),
    (InferenceFailed("Triton refused the batch."), 502, "inference_failed", {}),
    (Unavailable("The blob store is full."), 503, "unavailable", {}),
    (AuthUnavailable("Keys cannot be checked now."), 503, "auth_unavailable", {"retry-after": "5"}),
    (Unauthorized("No credential.", error=None), 401, "unauthorized", {"www-authenticate": 'Bearer realm="ctscreen"'}),
    (Unauthorized("Expired."), 401, "unauthorized",
     {"www-authenticate": 'Bearer realm="ctscreen", error="invalid_token"'}),
    (InsufficientScope("Needs admin.", scope="admin"), 403, "insufficient_scope",
     {"www-authenticate": 'Bearer error="insufficient_scope", scope="admin"'}),
    (AuthNotConfigured("No auth; loopback only."), 403, "auth_not_configured", {}),
    (NotDone("Job x is queued."), 409, "not_done", {}),
    (NotRetryable("Job x is done."), 409, "not_retryable", {}),
    (Superseded("Job x screens version 1 of study 1.2, and version 2 (being received) came after it."), 409,
     "superseded", {}),
    (NotRescreenable("Version 2 of study 1.2 is queued."), 409, "not_rescreenable", {}),
    (NotResendable("Being sent."), 409, "not_resendable", {}),
    (SrUnavailable("No headers."), 409, "sr_unavailable", {}),
    (InstancesExpired("Images gone."), 410, "instances_expired", {}),
]


@pytest.mark.parametrize(("error", "status", "reason", "headers"), ANSWERS, ids=[a[2] for a in ANSWERS])
def test_every_client_error_is_in_the_tree_with_its_status_and_reason(error, status, reason, headers):
    assert isinstance(error, GatewayError)
    assert (error.http_status, error.reason) == (status, reason)
    assert {k.lower(): v for k, v in error.headers().items()} == headers
    assert error.to_dict() == {"reason": reason, "message": str(error)}


def test_the_tree_keeps_the_builtin_bases_callers_catch():
    assert issubclass(JobNotFound, KeyError) and str(JobNotFound("No job 'x'.")) == "No job 'x'."
    assert issubclass(Busy, RuntimeError) and issubclass(InferenceFailed, RuntimeError)
    assert issubclass(InferenceUnavailable, Unavailable)
    assert REASONS["not_found"] is NotFound  # the shared code maps to the general class
    assert issubclass(Superseded, NotRetryable)  # a client that knows not_retryable's class still catches it


@pytest.fixture(scope="module")
def app():
    app = create_app(Settings(triton_urls="fake:1"), client_factory=FakeFleet())
    by_index = {str(i): a[0] for i, a in enumerate(ANSWERS)}

    @app.get("/test-raise/{index}")
    async def _raise(index: str) -> None:
        raise by_index[index]

    return app


def test_one_handler_answers_the_whole_tree(app):
    handled = [k for k in app.exception_handlers if isinstance(k, type) and issubclass(k, GatewayError)]
    assert handled == [GatewayError]


@pytest.mark.parametrize(("index", "answer"), list(enumerate(ANSWERS)), ids=[a[2] for a in ANSWERS])
def test_the_handler_answers_status_body_and_headers(app, index, answer):
    error, status, reason, headers = answer
    with TestClient(app) as client:
        r = client.get(f"/test-raise/{index}")
        assert r.status_code == status
        assert r.json() == {"reason": reason, "message": error.message}
        for name, value in headers.items():
            assert r.headers[name] == value
        assert f'ctscreen_errors_total{{reason="{reason}"}}' in client.get("/metrics").text


def test_real_routes_answer_from_the_tree(app):
    with TestClient(app) as client:
        missing = "0" * 32
        for path, status, reason in [(f"/v1/jobs/{missing}", 404, "not_found"),
                                     (f"/v1/jobs/{missing}/sr", 404, "not_found"),
                                     (f"/v1/jobs/{missing}/deliveries", 404, "not_found"),
                                     ("/no/such/route", 404, "not_found")]:
            r = client.get(path)
            assert (r.status_code, r.json()["reason"]) == (status, reason), path
        r = client.post(f"/v1/jobs/{missing}/retry")
        assert (r.status_code, r.json()["reason"]) == (404, "not_found")


# Codes answered outside the GatewayError tree: the framework's (gateway/api/errors.py), the last resort, a client
# gone mid-body, and a request head over its limit (gateway/httpserver.py, before the app runs).
OUTSIDE_THE_TREE = {"unsupported_media_type": 415, "method_not_allowed": 405, "not_acceptable": 406,
                    "internal_error": 503, "client_disconnected": 499, "request_header_fields_too_large": 431}
BASES_NEVER_RAISED = {"internal", "conflict"}  # GatewayError and Conflict themselves: only their subclasses are raised


def _documented_errors() -> dict[str, set[int]]:
    """docs/gateway.md's "### Errors" table: each reason code in a row's first cell, with that row's status."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "gateway.md").read_text()
    section = text.split("\n### Errors\n", 1)[1]
    table = section[section.index("\n| reason | status |"):].strip().split("\n\n", 1)[0]
    out: dict[str, set[int]] = {}
    for row in table.splitlines()[2:]:
        first, status = row.strip("|").rsplit("|", 1)
        for code in re.findall(r"^`([a-z_]+)`|[;,] `([a-z_]+)`", first.strip()):
            out.setdefault(code[0] or code[1], set()).add(int(status))
    return out


def test_the_documented_error_table_lists_every_code_the_gateway_answers_with_its_status():
    """docs/gateway.md said "Every error ..." and listed neither 429 ``auth_busy``, ``auth_throttled`` nor
    ``too_many_streams``, nor 431 ``request_header_fields_too_large``: a client switching on the table missed
    them. Each code of the tree (gateway.errors.GatewayError's subclasses) and each answered outside it is in the table with its
    status, and the table names no code the gateway never sends."""
    documented = _documented_errors()
    sent = {reason: cls.http_status for reason, cls in REASONS.items() if reason not in BASES_NEVER_RAISED}
    sent |= OUTSIDE_THE_TREE
    missing = {reason: status for reason, status in sent.items() if status not in documented.get(reason, set())}
    assert missing == {}, f"not in docs/gateway.md's Errors table with this status: {missing}"
    assert set(documented) - set(sent) == set(), "documented, never sent"


def test_reasons_is_every_error_class_the_gateway_defines():
    """REASONS held gateway.errors' own classes: over_budget (gateway.admission), inference_failed and
    triton_unavailable (gateway.triton_pool) were missing, invalid_uid there only once gateway.uids was imported, and
    the tests that took it for every code (the statuses above, the upload and DICOM tests') skipped them. Every
    GatewayError subclass of any gateway module is gateway.errors' own, with its reason in REASONS."""
    import importlib
    import pkgutil

    import gateway

    for module in pkgutil.walk_packages(gateway.__path__, "gateway."):
        if not module.name.startswith("gateway.store.migrations"):  # Alembic's scripts run only under Alembic
            importlib.import_module(module.name)
    classes = error_classes()
    assert {cls.__qualname__: cls.__module__ for cls in classes if cls.__module__ != "gateway.errors"} == {}
    assert {cls.reason for cls in classes} == set(REASONS)
    assert all(REASONS[cls.reason] is cls or issubclass(cls, REASONS[cls.reason]) for cls in classes)

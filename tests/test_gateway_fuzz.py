"""Property-based fuzzing of the gateway's HTTP API: no input makes it answer 5xx.

Schemathesis generates requests from the app's own OpenAPI document (every route, path parameters,
the upload bodies it documents), and hypothesis sends arbitrary bytes under arbitrary content types to
the two upload routes. Every answer must be below 500, match its documented schema and content type,
and a 4xx must carry a machine-readable ``reason``.

This tests the HTTP layer alone, so Triton is the fake client of ``tests/gateway_app_fakes.py``
(a mock because the question here is the routes' input handling, not inference; the real Triton path
is ``tests/test_e2e_gateway.py``). DICOM parsing, series selection and the case rule are the real ones.
Runs are bounded (few examples, derandomized) to stay well under 30 s on 2 cores.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.main import create_app
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet, ct_series


def _app():
    return create_app(Settings(triton_urls="fake:1", stow_quiet_period_s=60), client_factory=FakeFleet())


# the worklist's event stream never ends by design (it follows every job); its handling is tested in a
# real browser (tests/test_web_page.py)
schema = schemathesis.openapi.from_asgi("/openapi.json", _app()).exclude(path="/v1/worklist/events")

FUZZ = settings(max_examples=15, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@schema.parametrize()
@FUZZ
def test_openapi_routes_never_answer_5xx(case):
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                              response_schema_conformance, content_type_conformance])
    assert response.status_code < 500, response.text
    if 400 <= response.status_code < 500 and response.headers.get("content-type", [""])[0].startswith(
            "application/json"):
        assert response.json().get("reason"), response.text


_TYPES = st.sampled_from([
    "", "application/octet-stream", "application/dicom", "application/zip", "application/json", "text/plain",
    "multipart/form-data", "multipart/form-data; boundary=b0undary",
    'multipart/related; type="application/dicom"', 'multipart/related; type="application/dicom"; boundary=b0undary',
    'multipart/related; type="image/png"; boundary=b0undary',
])
_, _SERIES = ct_series(1, size=64)
_DICOM = _SERIES[0][1]
_BODIES = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda head, cut: _DICOM[:cut] + head, st.binary(max_size=64),
              st.integers(0, len(_DICOM))),  # truncated or corrupted DICOM
    st.builds(lambda parts: b"".join(b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                                     for p in parts) + b"--b0undary--\r\n",
              st.lists(st.one_of(st.binary(max_size=64), st.just(_DICOM[:400]), st.just(_DICOM)), max_size=3)),
)


@pytest.fixture(scope="module")
def client():
    with TestClient(_app(), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("path", ["/v1/studies", "/dicomweb/studies"])
def test_upload_routes_never_answer_5xx_to_arbitrary_bodies(client, path):
    @FUZZ
    @given(body=_BODIES, content_type=_TYPES)
    def check(body: bytes, content_type: str) -> None:
        headers = {"content-type": content_type} if content_type else {}
        r = client.post(path, content=body, headers=headers)
        assert r.status_code < 500, (r.status_code, r.text)
        if r.status_code >= 400:
            assert r.json().get("reason"), r.text

    check()

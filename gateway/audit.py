"""The audit trail: one JSON line per API call and per DICOM association, without PHI.

Each record says who (token subject, API key name, calling AE@host, or ``anonymous``), how they
authenticated, which scope the action needed, what the action was (method and route template, or the
DIMSE event), which study (by Study Instance UID only) and job, when (UTC), from where (peer address)
and the outcome (HTTP status or DICOM status, and ``ok``/``denied``/``refused``/``error``, or ``aborted``
for a DICOM association ended by an A-ABORT or a dropped connection). An HTTP request's record has its request id
(``request_id``: the ``X-Request-ID`` the client got, :mod:`gateway.logs`), the one the application log's lines
of that request carry; a DICOM record has none. A DICOM association's record (action
``DICOM association to <called AE>``) says in ``reason`` what it did (``echo``, ``stored 40, discarded 2 (not
CT)``, ``nothing stored``) or why it was rejected; the instances it sent have a record per study and status.

The trail is separate from the application log: the ``ctscreen.audit`` logger does not propagate, and
writes to ``CTSCREEN_AUDIT_LOG_FILE``, or to standard output when it is not set (the state store
keeps no results folder to put it in; on Kubernetes standard output is what the log collector reads). Records carry only the fields below (never a patient's name, ID, birth date or accession
number; never a free-text message, which could quote a header), so no PHI can reach them.

Record fields: ``ts``, ``who``, ``auth``, ``scope``, ``action``, ``study_instance_uid``, ``job_id``,
``request_id``, ``client``, ``status``, ``outcome``, ``reason``. The request id is opaque (a UUID or hexadecimal
digits: a client's own that is not is replaced, never quoted), so it carries no PHI either.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from starlette.requests import ClientDisconnect

from gateway.logs import request_id_of
from gateway.settings import Settings
from gateway.uids import is_job_id, is_uid

__all__ = ["AuditLog", "AuditMiddleware", "note_reason"]

API_PREFIXES = ("/v1/", "/dicomweb/")
"""Where the API lives: every request under these is audited, and its answers are never cached."""


CLIENT_CLOSED = 499
"""The status of a request whose client left before it was read whole (nginx's 499): nobody receives the
answer; the record says ``aborted``, as for a DICOM association the peer aborted."""


def note_reason(scope: MutableMapping[str, Any], reason: str) -> None:
    """Give the audit record of the request in ``scope`` its reason (a refusal's, a stream's end)."""
    scope.setdefault("state", {})["audit_reason"] = reason


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status == CLIENT_CLOSED:
        return "aborted"
    if status in (401, 403):
        return "denied"
    return "refused" if status < 500 else "error"


class AuditLog:
    """Writes audit records as JSON lines (thread-safe: it is a :mod:`logging` handler underneath).

    Parameters
    ----------
    path : Path | None
        The JSON-lines file (appended); standard output when None.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.logger = logging.getLogger(f"ctscreen.audit.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
        else:
            self.handler = logging.StreamHandler(sys.stdout)
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(self.handler)

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditLog:
        """The audit log the settings ask for."""
        return cls(settings.audit_log_file)

    def write(self, *, who: str, auth: str, action: str, status: int, client: str | None = None,
              scope: str | None = None, study_instance_uid: str | None = None, job_id: str | None = None,
              reason: str | None = None, outcome: str | None = None, request_id: str | None = None) -> None:
        """Append one record; UIDs, job ids and request ids that are not well formed are left out, not quoted."""
        record = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
            "who": who[:160], "auth": auth, "scope": scope, "action": action[:160],
            "study_instance_uid": study_instance_uid if is_uid(study_instance_uid) else None,
            "job_id": job_id if is_job_id(job_id) else None,
            "request_id": request_id_of(request_id),
            "client": client, "status": status, "outcome": outcome or _outcome(status),
            "reason": reason,
        }
        self.logger.info(json.dumps(record, separators=(",", ":")))

    def close(self) -> None:
        """Flush and close the file."""
        self.logger.removeHandler(self.handler)
        self.handler.close()


class AuditMiddleware:
    """ASGI middleware writing one audit record per ``/v1/...`` and ``/dicomweb/...`` request, and one per refused
    credential anywhere else (``/metrics`` on the API port: a key guessed there left no trace).

    The principal and the scope come from :func:`gateway.auth.require` (``request.state``); the study and
    job from the path parameters, or from ``request.state.study_instance_uid``/``job_id`` set by a route.
    """

    def __init__(self, app: Any, audit: AuditLog) -> None:
        self.app, self.audit = app, audit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = scope["path"].startswith(API_PREFIXES)
        scope.setdefault("state", {})
        status = 0

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        broke = False
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            # the answer had begun (an event stream): its status says nothing of this (a client that left is
            # no error of ours)
            broke = status != 0 and not isinstance(exc, ClientDisconnect)
            status = status or 500
            raise
        finally:
            # elsewhere (probes, the page's files, /metrics) only a credential refused: a scrape every 15 s is no
            # access to patient data, a guessed key is
            if api or (status in (401, 403) and scope["state"].get("scope") is not None):
                self._record(scope, status, broke=broke)

    def _record(self, scope: dict[str, Any], status: int, *, broke: bool = False) -> None:
        """One record; ``broke``: the answer failed after its status was sent, so the record says ``error``
        with reason ``broken_mid_answer`` beside the status the client got."""
        state = scope.get("state") or {}
        principal = state.get("principal")
        params = scope.get("path_params") or {}
        route = scope.get("route")
        template = getattr(route, "path", None) or "(no route)"
        client = scope.get("client")
        self.audit.write(
            who=principal.subject if principal is not None else "unauthenticated",
            auth=principal.kind if principal is not None else "none",
            scope=state.get("scope"),
            action=f"{scope['method']} {template}",
            status=status or 500,
            client=client[0] if client else None,
            study_instance_uid=params.get("study_instance_uid") or state.get("study_instance_uid"),
            job_id=params.get("job_id") or state.get("job_id"),
            request_id=state.get("request_id"),
            reason="broken_mid_answer" if broke else state.get("audit_reason"),
            outcome="error" if broke else None,
        )

"""A small FHIR R4 server for the delivery tests (no FHIR server runs here): it validates each transaction
Bundle with ``fhir.resources`` and keeps one resource per identifier, as a FHIR server's conditional
interactions do: ``POST`` with ``ifNoneExist`` creates only what is missing, a conditional ``PUT
Type?identifier=...`` creates or replaces (FHIR R4 3.1.0.4.3 and 3.1.0.5.4). As a server's transaction does, it
refuses a bundle whose ``urn:uuid:`` references name no entry of it (R4 3.1.0.11.2).

With ``patients`` (a set of ``system|value``) it resolves the bundle's conditional references to patients
(``Patient?identifier=system|value``) as a RIS does: a patient it does not know yet fails the transaction with
404 and an OperationOutcome of issue code ``processing`` (what HAPI FHIR answers: ``ResourceNotFoundException``,
HAPI-1091), until the patient is added. ``answers`` are refusals it answers first (a 503 with ``Retry-After``);
``delay_s`` makes each transaction take that long, and ``most_in_flight`` counts how many overlapped.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ctscreen.embedded import free_port


class FhirReceiver:
    """A FHIR R4 endpoint at ``url``; ``resources`` maps ``Type?identifier=system|value`` to the resource held."""

    def __init__(self, patients: set[str] | None = None, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        """How long each transaction takes (a busy server): transactions overlap when sent at once."""
        self.in_flight = self.most_in_flight = 0
        """Transactions being answered now, and the most there were at once."""
        self.answers: list[tuple[int, dict[str, str], dict | None]] = []
        """Refusals to answer first, one a request: ``(status, headers, OperationOutcome or None)``."""
        self.bundles: list[dict] = []
        self.errors: list[str] = []
        self.patients = patients
        """Patients known (``system|value``), or None: conditional references to patients are not resolved."""
        self.unresolved: list[str] = []
        """Conditional patient references a transaction was refused for."""
        self.resources: dict[str, dict] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                return

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                with receiver.lock:
                    receiver.in_flight += 1
                    receiver.most_in_flight = max(receiver.most_in_flight, receiver.in_flight)
                try:
                    time.sleep(receiver.delay_s)
                    self.transaction()
                finally:
                    with receiver.lock:
                        receiver.in_flight -= 1

            def transaction(self) -> None:
                from fhir.resources.R4B.bundle import Bundle

                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    refusal = receiver.answers.pop(0) if receiver.answers else None
                if refusal is not None:
                    status, headers, outcome = refusal
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/fhir+json", **headers}.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(json.dumps(outcome).encode() if outcome else b"")
                    return
                try:
                    assert self.headers.get("Content-Type", "").startswith("application/fhir+json")
                    data = json.loads(body)
                    Bundle.parse_obj(data)
                    assert data["type"] == "transaction"
                    unknown = receiver.unknown_patients(data)
                    if unknown:
                        receiver.unresolved += unknown
                        outcome = {"resourceType": "OperationOutcome", "issue": [
                            {"severity": "error", "code": "processing",
                             "diagnostics": f"HAPI-1091: Invalid match URL \"Patient?identifier={unknown[0]}\" - "
                                            "No resources match this search"}]}
                        self.send_response(404)
                        self.send_header("Content-Type", "application/fhir+json")
                        self.end_headers()
                        self.wfile.write(json.dumps(outcome).encode())
                        return
                    statuses = receiver.apply(data)
                except Exception as exc:  # noqa: BLE001 - answered 400 and recorded
                    receiver.errors.append(f"{type(exc).__name__}: {exc}")
                    self.send_response(400)
                    self.end_headers()
                    return
                answer = json.dumps({"resourceType": "Bundle", "type": "transaction-response",
                                     "entry": [{"response": {"status": s}} for s in statuses]})
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.end_headers()
                self.wfile.write(answer.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def unknown_patients(self, bundle: dict) -> list[str]:
        """The ``system|value`` of the bundle's conditional patient references this RIS does not know."""
        if self.patients is None:
            return []
        refs = re.findall(r'"reference": "Patient\?identifier=([^"]+)"', json.dumps(bundle))
        with self.lock:
            return sorted({r for r in refs if r not in self.patients})

    def apply(self, bundle: dict) -> list[str]:
        """Carry out a transaction's entries (all or nothing: the keys and references are checked first)."""
        full_urls = {entry["fullUrl"] for entry in bundle["entry"]}
        dangling = set(re.findall(r'"reference": "(urn:uuid:[^"]+)"', json.dumps(bundle))) - full_urls
        if dangling:
            raise ValueError(f"references to no entry of the bundle: {sorted(dangling)}")
        keys = []
        for entry in bundle["entry"]:
            request, kind = entry["request"], entry["resource"]["resourceType"]
            if request["method"] == "POST":
                keys.append((f"{kind}?{request['ifNoneExist']}", False))
            elif request["method"] == "PUT" and request["url"].startswith(f"{kind}?identifier="):
                keys.append((request["url"], True))
            else:
                raise ValueError(f"unexpected request {request}")
        statuses = []
        with self.lock:
            self.bundles.append(bundle)
            for (key, replace), entry in zip(keys, bundle["entry"], strict=True):
                held = key in self.resources
                if replace or not held:
                    self.resources[key] = entry["resource"]
                statuses.append("200 OK" if held else "201 Created")
        return statuses

    def current_reports(self) -> list[str]:
        """The identifiers of the DiagnosticReports no other one replaces: what a RIS shows as current."""
        from aggregator.fhir import current_reports

        return sorted(r["identifier"][0]["value"] for r in current_reports(self.of_type("DiagnosticReport")))

    def of_type(self, kind: str) -> list[dict]:
        with self.lock:
            return [r for r in self.resources.values() if r["resourceType"] == kind]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

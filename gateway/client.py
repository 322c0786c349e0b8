"""The gateway's HTTP client: upload a study, follow its job, print verdicts.

What ``ctscreen screen``, ``ctscreen demo`` and ``ctscreen eval`` share: :func:`collect_files` picks the
files of a study (a folder, a zip or one file), :func:`screen_path` uploads them to ``POST /v1/studies``
as one streamed multipart body (retrying on 429, and on 503 with Retry-After), follows the job's server-sent events (polling if the
stream breaks) and returns an :class:`Outcome`; :func:`screen_paths` does that for several studies
against one gateway and :func:`verdict_table` prints their verdicts. The credential is
``$CTSCREEN_TOKEN`` (an OIDC access token or an API key).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_NOT_DICOM_SUFFIXES = (".json", ".png", ".jpg", ".jpeg", ".nii", ".nii.gz", ".txt", ".md", ".csv", ".html")


class CliError(Exception):
    """A one-line error for the user; the command exits non-zero."""


# --- upload, follow, result --------------------------------------------------------
@dataclass
class Outcome:
    """What screening one path gave."""

    path: str
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    job_id: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def collect_files(path: Path) -> list[Path]:
    """The files to upload for ``path``: the file itself, or every likely-DICOM file under a folder."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not p.name.startswith(".") and not p.name.lower().endswith(_NOT_DICOM_SUFFIXES)
        )
        if not files:
            raise CliError(f"{path}: no file to upload")
        return files
    if path.exists():
        raise CliError(f"{path}: not a file or a folder (a device or a socket?)")
    raise CliError(f"{path}: no such file or folder")


def _multipart(files: list[Path], root: Path, bar: Any) -> tuple[str, int, Iterator[bytes]]:
    boundary = uuid.uuid4().hex
    heads = []
    for f in files:
        name = f.relative_to(root).as_posix() if f != root else f.name
        name = name.replace('"', "_")
        heads.append(
            (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
             "Content-Type: application/octet-stream\r\n\r\n").encode()
        )
    tail = f"--{boundary}--\r\n".encode()
    sizes = [f.stat().st_size for f in files]
    total = sum(len(h) + s + 2 for h, s in zip(heads, sizes, strict=True)) + len(tail)

    def body() -> Iterator[bytes]:
        for head, f in zip(heads, files, strict=True):
            data = f.read_bytes()
            yield head
            yield data
            yield b"\r\n"
            bar.update(len(data))
        yield tail

    return f"multipart/form-data; boundary={boundary}", total, body()


def error_of(response: Any) -> dict[str, Any]:
    """The gateway's error body of ``response``; a 401 to a request that carried no credential also says how
    this client sends one (the gateway's own words name the header, which a command's user never writes)."""
    try:
        body = response.json()
        if isinstance(body, dict) and "reason" in body:
            sent = response.request.headers
            if response.status_code == 401 and "Authorization" not in sent and "X-API-Key" not in sent:
                body = {**body, "message": f"{body.get('message', '')} The ctscreen commands send $CTSCREEN_TOKEN, "
                                          "which is not set: set it to an API key (ctscreen keys add) or an "
                                          "access token."}
            return body
    except ValueError:
        pass
    return {"reason": f"http_{response.status_code}", "message": response.text[:200]}


def screen_path(client: Any, path: Path, *, quiet: bool = False, max_wait_s: float = 3600.0,
                priority: str = "routine") -> Outcome:
    """Upload one study (at ``priority``: urgent, routine or low), follow its progress and return its outcome
    (never raises for the study)."""
    import httpx
    from tqdm import tqdm

    t0 = time.monotonic()
    out = Outcome(str(path))
    try:
        files = collect_files(path)
    except CliError as exc:  # this study only: the others of the run are still screened
        out.error = {"reason": "no_files", "message": str(exc)}
        return out
    root = path if path.is_dir() else path.parent
    nbytes = sum(f.stat().st_size for f in files)
    label = path.name or str(path)
    response = None
    key = uuid.uuid4().hex  # the upload's Idempotency-Key: sent again, it is answered with the job it made
    unreachable_since = None
    for _attempt in range(100):
        with tqdm(total=nbytes, unit="B", unit_scale=True, desc=f"{label}: upload", disable=quiet,
                  leave=False, file=sys.stderr) as bar:
            content_type, length, body = _multipart(files, root, bar)
            try:
                response = client.post("/v1/studies", content=body, params={"priority": priority},
                                       headers={"Content-Type": content_type, "Content-Length": str(length),
                                                "Idempotency-Key": key})
            except httpx.TransportError as exc:  # the gateway went away during the upload, or before its answer
                # came: it may have accepted the study, so the same upload goes again under the same key (a
                # gateway that kept it answers with that job) for up to UNREACHABLE_S
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > UNREACHABLE_S:
                    out.error = {"reason": "unreachable", "message": f"the gateway has not answered the upload for "
                                 f"{UNREACHABLE_S:g} s ({type(exc).__name__}); sent again later, it is not screened "
                                 "twice only if sent under the same Idempotency-Key"}
                    out.seconds = time.monotonic() - t0
                    return out
                if not quiet:
                    print(f"{label}: the gateway did not answer ({type(exc).__name__}), sending again in 2 s",  # noqa: T201
                          file=sys.stderr)
                time.sleep(2.0)
                continue
        unreachable_since = None
        # busy (429), or unavailable for now and saying when to come back (503 + Retry-After: the database
        # restarting, the blob volume past its watermark): nothing was kept, the same upload goes again
        later = response.status_code == 503 and "Retry-After" in response.headers
        if response.status_code != 429 and not later:
            break
        try:
            wait = min(300.0, max(0.0, float(response.headers.get("Retry-After", "5"))))
        except ValueError:  # an HTTP date, which the gateway never sends: the default
            wait = 5.0
        if not quiet:
            why = "busy" if response.status_code == 429 else f"unavailable ({error_of(response).get('reason')})"
            print(f"{label}: gateway {why}, retrying in {wait:g} s", file=sys.stderr)  # noqa: T201 - beside the bars
        time.sleep(wait)
    assert response is not None
    if response.status_code != 202:
        out.error = error_of(response)
        out.seconds = time.monotonic() - t0
        return out
    job = response.json()
    out.job_id = job["job_id"]
    total = job.get("slices_total") or None
    with tqdm(total=total, unit="slice", desc=f"{label}: screen", disable=quiet, leave=False,
              file=sys.stderr) as bar:
        final = _follow(client, out.job_id, bar, max_wait_s)
    out.seconds = time.monotonic() - t0
    if final.get("state") == "done":
        out.result = final.get("result")
    else:
        out.error = final.get("error") or {"reason": "unknown", "message": f"job ended {final.get('state')}"}
    return out


UNREACHABLE_S = 120.0
"""How long ``ctscreen screen`` keeps asking for a job while the gateway does not answer (a restart)."""


def _failed(reason: str, message: str) -> dict[str, Any]:
    return {"state": "failed", "error": {"reason": reason, "message": message}}


def _job_view(client: Any, job_id: str) -> dict[str, Any] | None:
    """The job's view; a ``failed`` view when it cannot be read (no right to, gone), None when the gateway
    did not answer or answered 5xx / 429 (ask again)."""
    import httpx

    try:
        resp = client.get(f"/v1/jobs/{job_id}")
    except httpx.TransportError as exc:
        logger.debug("reading job %s: %s", job_id, exc)
        return None
    if resp.status_code == 200:
        return dict(resp.json())
    if resp.status_code >= 500 or resp.status_code == 429:
        return None
    err = error_of(resp)
    if resp.status_code == 403:
        return _failed(err["reason"], f"job {job_id} was accepted but its result cannot be read with this "
                                      f"credential (it needs the results:read scope): {err.get('message', '')}")
    if resp.status_code == 401:
        return _failed(err["reason"], f"job {job_id} was accepted but the credential is refused now (an "
                                      f"expired token?): {err.get('message', '')}")
    return _failed(err["reason"], f"job {job_id}: {err.get('message', '')}")


def _follow(client: Any, job_id: str, bar: Any, max_wait_s: float) -> dict[str, Any]:
    """Follow the job's server-sent events; fall back to polling if the stream breaks (or is refused).

    A job that cannot be read (no right to, gone) ends at once; a gateway that does not answer (a
    restart) is asked again for up to :data:`UNREACHABLE_S`."""
    import httpx

    deadline = time.monotonic() + max_wait_s
    try:
        # the gateway sends a keep-alive every 15 s: a minute of silence is a connection gone half-open
        with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(60.0, connect=10.0)) as resp:
            event = None
            for line in resp.iter_lines() if resp.status_code == 200 else ():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    view = json.loads(line[5:])
                    if view.get("slices_total") and bar.total != view["slices_total"]:
                        bar.total = view["slices_total"]
                        bar.refresh()
                    bar.update(max(0, view.get("slices_done", 0) - bar.n))
                    if event in ("done", "failed"):
                        break
                if time.monotonic() > deadline:
                    break
    except Exception as exc:  # noqa: BLE001 - a broken stream falls back to polling
        logger.debug("event stream of %s broke: %s", job_id, exc)
    silent_since = None
    while time.monotonic() < deadline:
        view = _job_view(client, job_id)
        if view is None:
            if silent_since is None:
                silent_since = time.monotonic()
            if time.monotonic() - silent_since > UNREACHABLE_S:
                return _failed("unreachable", f"the gateway has not answered for {UNREACHABLE_S:g} s; job {job_id} "
                                              f"was accepted: ask GET /v1/jobs/{job_id} later")
        else:
            silent_since = None
            if view.get("state") in ("done", "failed"):
                return view
        time.sleep(0.5)
    return _failed("timeout", f"no result within {max_wait_s:g} s (job {job_id})")


def _evidence_text(result: dict[str, Any]) -> str:
    """The run as the SR, the page and the message tell it: the patient's side, slices numbered from 1; none
    for a series that is no chest CT (its boxes are no lung lesions, and every other output leaves it out)."""
    from aggregator.schema import NOT_CHEST, quadrant_words, slice_span  # the client's own imports stay light

    ev = result.get("evidence")
    if not ev or result.get("reason") == NOT_CHEST:
        return "-"
    idx = [s["index"] for s in ev.get("slices", [])]
    span = slice_span(idx[0], idx[-1]) if idx else ""
    return f"{quadrant_words(ev['quadrant'])} x{ev['n_slices']} {span}".strip()


_TABLE_MESSAGE_CHARS = 60
"""An error's message in the table's evidence column is cut here; the whole message follows the table."""


def verdict_table(outcomes: Sequence[Outcome], truth: dict[str, str] | None = None) -> str:
    """A plain-text table, one row per study; below it, each error whose message the table cut, in full (what
    to do about it comes last in the gateway's messages: "Upload one study at a time", "set $CTSCREEN_TOKEN")."""
    head = ["study", "verdict", "reason", "slices", "evidence (quadrant, run)", "seconds"]
    if truth:
        head.insert(1, "truth")
    rows = [head]
    cut = []
    for o in outcomes:
        if o.result is not None:
            r = o.result
            row = [o.path, r["verdict"].upper() if r["verdict"] == "positive" else r["verdict"], r["reason"],
                   str(r.get("n_slices", "")), _evidence_text(r), f"{o.seconds:.1f}"]
        else:
            err = o.error or {}
            message = " ".join(str(err.get("message", "")).split())
            if len(message) > _TABLE_MESSAGE_CHARS:
                cut.append(f"{o.path}: {err.get('reason', '?')}: {message}")
                message = message[:_TABLE_MESSAGE_CHARS - 3].rstrip() + "..."
            row = [o.path, "ERROR", err.get("reason", "?"), "-", message, f"{o.seconds:.1f}"]
        if truth:
            row.insert(1, truth.get(o.path, "?"))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(o.result is not None for o in outcomes):
        from aggregator.fhir import NOTICE  # what opens the SR's, the key images' and the FHIR report's text

        lines.append(NOTICE)
    if cut:
        lines += ["", *cut]
    return "\n".join(lines)


def env_token() -> str | None:
    """``$CTSCREEN_TOKEN`` (an OIDC access token or an API key, ``ctscreen keys add``), or None when unset or blank.

    Surrounding whitespace is dropped: a key written to a file (``ctscreen keys add ... > key``) and put into a
    Kubernetes Secret ends in a newline. A token that still cannot go into an HTTP header raises
    :class:`CliError` (it would otherwise fail every request as if no gateway answered)."""
    token = (os.environ.get("CTSCREEN_TOKEN") or "").strip()
    if not token:
        return None
    bad = next((c for c in token if not " " <= c <= "~"), None)  # a control character, or not ASCII
    if bad is not None:
        raise CliError(f"$CTSCREEN_TOKEN holds a character an HTTP header cannot carry ({bad!r}); "
                       "set it to the token or API key alone")
    return token


def http_client(url: str, timeout: float) -> Any:
    """An ``httpx.Client`` for the gateway at ``url`` sending ``$CTSCREEN_TOKEN``; :class:`CliError` for a token
    no header can carry."""
    import httpx

    token = env_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, timeout=httpx.Timeout(timeout, connect=10.0), headers=headers)


def screen_paths(url: str, paths: Sequence[Path], *, quiet: bool = False, timeout: float = 600.0,
                 priority: str = "routine") -> list[Outcome]:
    """Screen each path against the gateway at ``url``."""
    import httpx

    outcomes = []
    with http_client(url, timeout) as client:
        try:
            client.get("/healthz").raise_for_status()
        except httpx.HTTPError as exc:
            raise CliError(f"no ctscreen gateway answers at {url} ({type(exc).__name__}); "
                           "start one with 'ctscreen serve'") from None
        for path in paths:
            outcomes.append(screen_path(client, path, quiet=quiet, priority=priority))
    return outcomes

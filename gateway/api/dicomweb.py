"""DICOMweb STOW-RS: ``POST /dicomweb/studies[/{StudyInstanceUID}]`` (PS3.18 section 10.5).

The request is ``multipart/related; type="application/dicom"``, one DICOM instance per part (without ``type=``,
which RFC 2387 requires and some senders omit, when each part is DICOM: declared so, or a Part 10 file). The answer
is a Store Instances Response in ``application/dicom+json`` (PS3.18 Annex I): ``ReferencedSOPSequence``
for the stored instances, ``FailedSOPSequence`` (with ``FailureReason``) for the others, and the status
PS3.18 asks for: 200 every instance stored, 202 some stored, 409 none stored, 503 none stored because the
gateway cannot keep more now (every failure 0xA700: a watermark, the receiving limits, the state store
away; with ``Retry-After``), 415 a media type other than ``application/dicom``. Retrieve URL (Type 2) is
present and empty, at the top and in each stored item: the gateway keeps instances only until they are
screened and offers no WADO-RS retrieval. Stored instances are screened when their study is complete: after
``CTSCREEN_STOW_QUIET_PERIOD_S`` without a new instance, or on ``POST /v1/studies/{uid}/complete``.
Each stored study's progress and result are at ``GET /v1/studies/{uid}`` (``Content-Location``).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from gateway.admission import client_key
from gateway.api.deps import MetricsDep, PriorityQuery, SettingsDep, StowDep
from gateway.audit import note_reason
from gateway.auth import AUTH_RESPONSES, studies_write
from gateway.dicom import part10_transfer_syntax, read_dataset
from gateway.errors import (
    GatewayError,
    InvalidInput,
    OutOfResources,
    PatientMismatch,
    StoreUnavailable,
    UploadError,
)
from gateway.jobs import PRIORITIES, ROUTINE
from gateway.metrics import Metrics
from gateway.stow import CT_STORAGE, PATIENT_MISMATCH, Intake, read_header
from gateway.uids import check_uid
from gateway.uploads import media_parameters, new_spool, spool_multipart, spooling_failed

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(studies_write)],
                   responses=AUTH_RESPONSES)

DICOM_JSON = "application/dicom+json"
# Failure reasons (PS3.4 Annex B / PS3.18 Store Instances Response)
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
NO_RETRIEVE_URL = {"vr": "UR"}  # Type 2, empty: no WADO-RS here


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]}


UNREAD_CLASS, UNREAD_INSTANCE = "1.2.840.10008.5.1.4.1.1.7", "0"
"""What a failure item names when nothing could be read of the part (both attributes are Type 1)."""

_PRINTABLE_UID = re.compile(r"[ -~]{1,64}")


def _item(sop_class: str, sop_instance: str, failure: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00081150": _ui(sop_class or UNREAD_CLASS),
                            "00081155": _ui(sop_instance or UNREAD_INSTANCE)}
    if failure is None:
        item["00081190"] = NO_RETRIEVE_URL
    else:
        item["00081197"] = {"vr": "US", "Value": [failure]}
    return item


def _uids_read(content: Path) -> tuple[str, str]:
    """The SOP Class and Instance UIDs of a part that could not be taken, as it gives them (a client matches
    the failure items to its instances by them), read leniently; ``""`` for what cannot be read (or is not a
    printable value of at most 64 characters). A CT whose UIDs break the grammar was named as a Secondary
    Capture of instance "0"."""
    try:
        ds = read_dataset(content)  # deflated data sets inflated within bounds, large values left unread
        found = (str(ds.get("SOPClassUID", "") or "").strip(), str(ds.get("SOPInstanceUID", "") or "").strip())
    except Exception:  # noqa: BLE001 - whatever the part is, the answer names what it can
        return "", ""
    return tuple(v if _PRINTABLE_UID.fullmatch(v) else "" for v in found)  # type: ignore[return-value]


def _dicom_json(status: int, body: dict[str, Any], studies: list[str], retry_after_s: int) -> JSONResponse:
    headers = {}
    if len(studies) == 1:
        headers["Content-Location"] = f"/v1/studies/{studies[0]}"
    if status == 503:
        headers["Retry-After"] = str(retry_after_s)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=headers)


def store_status(referenced: list[dict[str, Any]], failed: list[dict[str, Any]]) -> int:
    """The HTTP status of a Store Instances Response (PS3.18 10.5.3) from its two sequences."""
    if not failed:
        return 200
    if referenced:
        return 202
    busy = all(item["00081197"]["Value"][0] == OUT_OF_RESOURCES for item in failed)
    return 503 if busy else 409


def _media_error(metrics: Metrics, message: str) -> JSONResponse:
    metrics.error("unsupported_media_type")  # counted as every refused request is (ctscreen_errors_total)
    body = {"reason": "unsupported_media_type", "message": message}
    return JSONResponse(body, status_code=415)


async def _store(request: Request, settings: SettingsDep, stow: StowDep, metrics: MetricsDep,
                 study_instance_uid: str | None, priority: int = ROUTINE) -> JSONResponse:
    """Spool the body's parts to files as it arrives (no instance is held in memory whole), then store them."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "multipart/related":
        return _media_error(metrics, f'STOW-RS needs multipart/related; type="application/dicom", got {media or "none"!r}.')
    found = media_parameters(content_type).get("type")
    if found is not None and found.strip().lower() != "application/dicom":
        named = repr(found) if found.strip() else "an empty type="
        return _media_error(metrics, f'Only type="application/dicom" is supported (not {named}); send DICOM Part 10 files.')
    try:
        spool = await run_in_threadpool(new_spool, settings.spool_dir())
    except OSError as exc:
        raise spooling_failed(exc, "The instances") from exc
    try:  # the admission's reservation is held until the instances are in the stores
        async with request.app.state.admission.stream(request, settings.max_upload_bytes, client_key(request)) as body:
            try:
                parts = await spool_multipart(body, content_type, spool)
            except OSError as exc:
                raise spooling_failed(exc, "The instances") from exc
            if found is None:  # RFC 2387 requires type=; some senders omit it (Orthanc and dcm4chee take such bodies)
                other = await run_in_threadpool(_not_dicom, parts)
                if other is not None:
                    return _media_error(metrics, "multipart/related without type= is read as type=\"application/dicom\" "
                                                 f"only when each part is DICOM: {other}; send DICOM Part 10 files.")
            return await _keep(parts, stow, metrics, study_instance_uid, settings.retry_after_s, priority,
                               request.scope)
    finally:
        with anyio.CancelScope(shield=True):  # removed even when the request is cancelled (a shut-down)
            await run_in_threadpool(shutil.rmtree, spool, True)


def _part_type(headers: dict[str, str]) -> str | None:
    """A part's own media type (lower case, without parameters), or None when it declares none."""
    declared = headers.get("content-type")
    return None if declared is None else declared.split(";", 1)[0].strip().lower()


def _not_dicom(parts: list[tuple[dict[str, str], Path]]) -> str | None:
    """Of a body sent without ``type=``: the first part that is not DICOM, in words (one that declares another
    media type, or declares none and is no Part 10 file), or None when every part is."""
    for i, (headers, content) in enumerate(parts):
        declared = _part_type(headers)
        if declared is None and part10_transfer_syntax(content) is None:
            return f"part {i + 1} declares no Content-Type and is no DICOM Part 10 file"
        if declared not in (None, "application/dicom"):
            return f"part {i + 1} is {declared!r}"
    return None


async def _keep(parts: list[tuple[dict[str, str], Path]], stow: Intake, metrics: Metrics,
                study_instance_uid: str | None, retry_after_s: int, priority: int = ROUTINE,
                scope: MutableMapping[str, Any] | None = None) -> JSONResponse:
    """Store each spooled part; the Store Instances Response. An instance refused because its study names another
    patient gives the request's audit record (``scope``) its reason."""
    if not parts:  # the media type was right, the body is malformed: 400, not 415
        raise UploadError("The multipart/related body holds no part.")
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    studies: list[str] = []
    for i, (headers, content) in enumerate(parts):
        name = f"part-{i + 1}"
        if _part_type(headers) not in (None, "application/dicom"):
            metrics.error("unsupported_media_type")
            failed.append(_item("", "", CANNOT_UNDERSTAND))
            continue
        try:
            header = await run_in_threadpool(read_header, content, name)  # a file: off the event loop
        except InvalidInput as exc:  # not DICOM, a UID off the grammar, a deflated data set inflating past the bounds
            metrics.error(exc.reason)
            failed.append(_item(*await run_in_threadpool(_uids_read, content), CANNOT_UNDERSTAND))
            continue
        if study_instance_uid is not None and header.study_instance_uid != study_instance_uid:
            failed.append(_item(header.sop_class_uid, header.sop_instance_uid, DOES_NOT_MATCH))
            continue
        if header.sop_class_uid not in CT_STORAGE:
            metrics.error("not_ct")
            failed.append(_item(header.sop_class_uid, header.sop_instance_uid, SOP_CLASS_NOT_SUPPORTED))
            continue
        nbytes = content.stat().st_size
        refusal = await stow.refusal(header.study_instance_uid, nbytes)
        if refusal is not None:  # the sender keeps it and retries (too_large: over the worker's per-file limit)
            metrics.error(refusal)
            failed.append(_item(header.sop_class_uid, header.sop_instance_uid, OUT_OF_RESOURCES))
            continue
        try:
            await stow.add(header, name, content, nbytes, priority)  # blob fsynced and row committed before the answer
        except (StoreUnavailable, OutOfResources) as exc:  # the state store or the blob volume cannot take it now:
            # the sender retries
            metrics.error(exc.reason)
            failed.append(_item(header.sop_class_uid, header.sop_instance_uid, OUT_OF_RESOURCES))
            continue
        except PatientMismatch as exc:  # the study names another patient: nothing kept, its reading untouched
            metrics.error(exc.reason)
            if scope is not None:
                note_reason(scope, exc.reason)
            failed.append(_item(header.sop_class_uid, header.sop_instance_uid, PATIENT_MISMATCH))
            continue
        except GatewayError as exc:  # could not be stored durably
            metrics.error(exc.reason)
            failed.append(_item(header.sop_class_uid, header.sop_instance_uid, PROCESSING_FAILURE))
            continue
        referenced.append(_item(header.sop_class_uid, header.sop_instance_uid))
        if header.study_instance_uid not in studies:
            studies.append(header.study_instance_uid)
    body_json: dict[str, Any] = {"00081190": NO_RETRIEVE_URL}
    if referenced:
        body_json["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body_json["00081198"] = {"vr": "SQ", "Value": failed}
    return _dicom_json(store_status(referenced, failed), body_json, studies, retry_after_s)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored", "content": {DICOM_JSON: {}}},
    202: {"description": "some instances stored, see FailedSOPSequence", "content": {DICOM_JSON: {}}},
    409: {"description": "no instance stored, see FailedSOPSequence", "content": {DICOM_JSON: {}}},
    400: {"description": "the Study Instance UID in the URL is not a DICOM UID"},
    401: {"description": "no or bad credential"},
    403: {"description": "the credential lacks studies:write"},
    413: {"description": "body too large"},
    415: {"description": "not multipart/related of application/dicom: a type= naming another, or, without type=, a "
                         "part that is not DICOM"},
    429: {"description": "too many bytes or bodies in flight; see Retry-After"},
    503: {"description": "no instance stored: the gateway cannot keep more now (each failure 0xA700); see Retry-After",
          "content": {DICOM_JSON: {}}},
}


@router.post("/studies", summary="STOW-RS: store instances of any study", responses=_RESPONSES)
async def stow_studies(request: Request, settings: SettingsDep, stow: StowDep, metrics: MetricsDep,
                       priority: PriorityQuery = "routine") -> JSONResponse:
    """Store instances; each study is screened once complete."""
    return await _store(request, settings, stow, metrics, None, PRIORITIES[priority])


@router.post("/studies/{study_instance_uid}", summary="STOW-RS: store instances of one study",
             responses=_RESPONSES)
async def stow_study(study_instance_uid: str, request: Request, settings: SettingsDep, stow: StowDep,
                     metrics: MetricsDep, priority: PriorityQuery = "routine") -> JSONResponse:
    """Store instances of ``study_instance_uid``; instances of another study fail with 0xA900."""
    check_uid(study_instance_uid)
    return await _store(request, settings, stow, metrics, study_instance_uid, PRIORITIES[priority])

"""``/v1/studies``: upload a study, trigger a STOW study, read a study's latest result."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import queue
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from aggregator.schema import CaseResult
from gateway.admission import client_key, drop_pages
from gateway.api.deps import BlobsDep, PriorityQuery, ScreenerDep, SettingsDep, StoreDep, StowDep, WorkerDep
from gateway.auth import AUTH_RESPONSES, RESULTS_READ, Principal, ReadAccess, WriteAccess
from gateway.errors import (
    InvalidInput,
    NotRescreenable,
    OutOfResources,
    TooLarge,
    Unavailable,
    UploadError,
)
from gateway.jobs import (
    PRIORITIES,
    Busy,
    JobAccepted,
    JobError,
    JobNotFound,
    JobView,
    Priority,
    answer_of,
    priority_name,
    triton_priority,
)
from gateway.screening import Prepared, Screener
from gateway.settings import Settings
from gateway.store import KeyTaken, Store, new_keys
from gateway.store.blobs import delete_each
from gateway.uids import check_uid
from gateway.uploads import (
    FilePart,
    MultipartSplitter,
    UploadLimits,
    gathered,
    in_thread,
    iter_upload,
    media_parameters,
    new_spool,
    spooling_failed,
)

router = APIRouter(prefix="/v1/studies", tags=["studies"], responses=AUTH_RESPONSES)

_QUERY_OPTIONS = frozenset({"priority"})
"""The upload's query parameters: a form field of one of these names is refused (it would not be read)."""


class StudyReading(BaseModel):
    """The study's reading while its latest job has none: the done job of the newest version that has one, and
    whether a later version supersedes it."""

    job_id: str
    version: int | None = None
    superseded_by: int | None = Field(None, description="a later version not failed (being received or screened): "
                                                        "its reading will replace this one")
    result: CaseResult | None = None


class StudyView(BaseModel):
    """Where a study is: still being received (STOW), screening, or its latest result."""

    study_instance_uid: str
    state: str = Field(description="receiving, or the state of its latest job")
    instances_received: int | None = Field(None, description="STOW instances held, while receiving")
    job_id: str | None = Field(None, description="its latest job; while a later version is being received, the "
                                                 "previous version's, whose result stays the study's latest "
                                                 "until the new version is screened")
    error: JobError | None = None
    result: CaseResult | None = Field(None, description="that job's result (null until it is done)")
    version: int | None = Field(None, description="the version of the study that job screens")
    reading: StudyReading | None = Field(
        None, description="while that job has no result (a later version queued, screening or failed): the reading "
                          "of the newest version that has one, the study's reading (the one its destinations were "
                          "sent) until a later version is done; a failed version supersedes none")


def _reading(view: JobView | None) -> StudyReading | None:
    return None if view is None else StudyReading(job_id=view.job_id, version=view.version,
                                                  superseded_by=view.superseded_by, result=view.result)


def _part_upload(i: int, headers: dict[str, str], content: Path) -> tuple[str, Path] | None:
    """The file of the ``i``-th multipart part (from 1): its name from Content-Disposition, else ``part-<i>``;
    None for an empty part without a filename (a form field).

    Raises
    ------
    gateway.errors.UploadError
        A form field named as one of the route's query parameters (``-F priority=urgent``): it was taken for a
        file (then refused as not DICOM) and the study screened as routine, without a word.
    """
    disposition = headers.get("content-disposition", "")
    parameters = media_parameters(disposition, "content-disposition")
    filename, field = parameters.get("filename"), parameters.get("name")
    if filename is None and field in _QUERY_OPTIONS:
        raise UploadError(f"The form field {field!r} is not read: {field} is a query parameter "
                          f"(POST /v1/studies?{field}=...).")
    if filename is None and not content.stat().st_size:
        return None
    return filename or f"part-{i}", content


def _files_of(name: str, content: Path, limits: UploadLimits, spool: Path,
              files: list[tuple[str, Path]]) -> Iterator[tuple[str, Path]]:
    """The files of one uploaded file (a zip's members, each written to ``spool``), appended to ``files``
    as they are yielded; :class:`~gateway.errors.TooLarge` past ``limits.max_files`` in all."""
    for member, data in iter_upload(name, content, limits):
        files.append((member, data if isinstance(data, Path) else _spool_bytes(data, spool)))
        del data
        if len(files) > limits.max_files:
            raise TooLarge(f"The upload holds more than {limits.max_files} files.")
        yield files[-1]


def _expand(body: Any, filename: str, limits: UploadLimits, spool: Path) -> list[tuple[str, Path]]:
    """The files of a body that is not multipart (one file, or a zip), written to files in ``spool``: no file
    of the upload is held in memory whole (a zip member while it is read)."""
    return list(_files_of(filename, _spool_bytes(body, spool), limits, spool, []))  # parsed once, by ingest (which also refuses CT images of several studies)


_END = object()


class _Abandoned(Exception):
    """The upload stopped being read (a malformed body, a limit, the client left): the parse stops."""


async def prepare_streamed(chunks: AsyncIterator[bytes], content_type: str, limits: UploadLimits, spool: Path,
                            screener: Screener, speculate: bool, priority: int = 0) -> tuple[list[tuple[str, Path]], Prepared]:
    """Split a multipart upload into files as it arrives and parse (and, with ``speculate``, screen) each one
    as soon as its part ends; returns the files and the prepared study once the body is over.

    The parts are written to ``spool`` once, as they are read (no copy of the whole body first), and handed
    to :meth:`~gateway.screening.Screener.prepare` through a queue, so the first slices reach Triton while
    the rest of the study is still on the wire. A study refused on what arrived so far (e.g. a zip bomb in
    a part) stops the reading; a body refused half-way (malformed, over a limit, the client gone) stops
    the parse, and what it decoded or sent is dropped.
    """
    splitter = MultipartSplitter(content_type, functools.partial(FilePart, spool), max_parts=limits.max_files)
    handoff: queue.SimpleQueue[Any] = queue.SimpleQueue()
    files: list[tuple[str, Path]] = []

    def sources() -> Iterator[tuple[str, Path]]:  # iterated by the parse, in its own thread
        i = 0
        while (item := handoff.get()) is not _END:
            if isinstance(item, _Abandoned):
                raise item
            i += 1
            upload = _part_upload(i, *item)
            if upload is not None:
                try:
                    yield from _files_of(*upload, limits, spool, files)
                except OSError as exc:
                    raise spooling_failed(exc) from exc
        if not files:
            raise UploadError("The upload holds no file.")

    task = asyncio.ensure_future(screener.prepare(sources(), speculate=speculate, streamed=True, priority=priority))
    try:
        async for piece in gathered(chunks):  # parsed and written in a thread, a megabyte at a time
            try:
                parts = await in_thread(splitter.feed, piece)  # ended before an abort below
            except OSError as exc:
                raise spooling_failed(exc) from exc
            for part in parts:
                handoff.put(part)
            if task.done():  # refused on what arrived (or failed): read no more, its error is the answer
                break
        else:
            splitter.close()
        handoff.put(_END)
        return files, await task
    except BaseException:
        splitter.abort()
        handoff.put(_Abandoned())  # (nobody reads it when the parse has ended)
        try:
            prepared = await asyncio.shield(task)
        except BaseException:  # noqa: BLE001 - _Abandoned, or its own error: the first error is the answer
            pass
        else:  # it ended (e.g. the request was cancelled as it did): nothing it holds goes on
            await run_in_threadpool(prepared.release)
        raise


def _spool_bytes(data: Any, spool: Path) -> Path:
    """``data`` (bytes, or the admission's mapped body) written to a new file in ``spool``, 1 MiB at a time."""
    fd, name = tempfile.mkstemp(prefix="file-", dir=spool)
    with os.fdopen(fd, "wb") as fh:
        for pos in range(0, len(data), 1 << 20):
            fh.write(data[pos : pos + (1 << 20)])
    drop_pages(data)
    return Path(name)


def _spool_dir(settings: Settings) -> Path:
    """A new folder for one upload's files, under ``data_dir/spool`` (the blob store links them from there)."""
    return new_spool(settings.spool_dir())


_WATERMARKS = {
    "out_of_resources_disk_full": "The gateway's blob volume is nearly full; retry later.",
    "out_of_resources_backlog": "Too many slices are waiting to be screened; retry later.",
}


IDEMPOTENCY_KEY = "Idempotency-Key"


def idempotency(request: Request, caller: Principal, scope: str = "") -> str | None:
    """The digest under which an upload's ``Idempotency-Key`` header is kept (with the caller's identity, so one
    caller's key never answers another's upload), or None without the header. ``scope``: what else the request
    names (a rescreen: its route and study), so that its key never answers another request (an upload, or the
    rescreen of another study); empty for an upload (the digests its jobs were kept under).

    >>> from types import SimpleNamespace as NS
    >>> from gateway.auth import ANONYMOUS
    >>> len(idempotency(NS(headers={"idempotency-key": "study-42-try"}), ANONYMOUS))
    64
    >>> from gateway.auth import Principal
    >>> reader = Principal("reading-room", "api_key", frozenset())
    >>> idempotency(NS(headers={"idempotency-key": "k"}), ANONYMOUS) != idempotency(NS(headers={"idempotency-key": "k"}), reader)
    True
    >>> k = NS(headers={"idempotency-key": "k"})
    >>> len({idempotency(k, ANONYMOUS), idempotency(k, ANONYMOUS, "rescreen 1.2"), idempotency(k, ANONYMOUS, "rescreen 1.3")})
    3
    >>> idempotency(NS(headers={"idempotency-key": ""}), ANONYMOUS)
    Traceback (most recent call last):
    gateway.errors.InvalidInput: The Idempotency-Key header must be 1 to 255 printable ASCII characters.

    Raises
    ------
    gateway.errors.InvalidInput
        An empty key, or one longer than 255 characters or with other than printable ASCII characters.
    """
    key = request.headers.get(IDEMPOTENCY_KEY.lower())
    if key is None:
        return None
    if not 0 < len(key) <= 255 or not all(" " <= c <= "~" for c in key):
        raise InvalidInput(f"The {IDEMPOTENCY_KEY} header must be 1 to 255 printable ASCII characters.")
    return hashlib.sha256("\0".join((caller.kind, caller.subject, *((scope,) if scope else ()), key)).encode()).hexdigest()


def _accepted(view: JobView, caller: Principal, **headers: str) -> JSONResponse:
    """202 with the job (``Location``): its result only for a caller who may read results (a ``studies:write``-only
    key, a PACS router's, never sees a verdict)."""
    return JSONResponse(answer_of(view, caller.has(RESULTS_READ)), status_code=202,
                        headers={"Location": f"/v1/jobs/{view.job_id}", **headers})


def _replayed(view: JobView, caller: Principal) -> JSONResponse:
    """The answer to a request sent again under its key: the job it made, as it is now (:func:`_accepted`)."""
    return _accepted(view, caller, **{"Idempotent-Replayed": "true"})


def limits_of(settings: SettingsDep) -> UploadLimits:
    """Upload limits from the settings."""
    return UploadLimits(max_upload_bytes=settings.max_upload_bytes,
                        max_total_bytes=max(settings.max_upload_bytes, 4096 * 1024**2))


async def check_capacity(store: Store, settings: Settings, priority: Priority = "routine") -> None:
    """Refuse an upload (429) while the cluster's active jobs (queued or running, of every origin: they wait
    for the same slots) reach the sum of the live replicas' ``max_concurrent_studies + max_queued_studies``.

    Each live replica (:meth:`~gateway.store.Store.live_replicas`) brings its slots and its queue
    allowance, taken to be this replica's settings (the replicas of a deployment share them): one gateway
    refuses at its own limit, as before; two take twice as much, and a killed one's share goes with it.

    An urgent upload counts only the urgent jobs against that limit: a backlog of routine work never turns
    away an emergency department's study (it is claimed before them), while urgent uploads alone are refused
    at that limit plus the replicas' ``urgent_slots`` (the slots only they take), so the cluster holds at most
    twice its limit and those slots.
    """
    urgent = priority == "urgent"
    queued, running, _ = await store.counts(priority=PRIORITIES["urgent"] if urgent else None)
    replicas = await store.live_replicas(settings.replica_alive_s)
    limit = replicas * (settings.max_concurrent_studies + settings.max_queued_studies
                        + (settings.urgent_slots if urgent else 0))
    if queued + running >= limit:
        where = "" if replicas == 1 else f" on {replicas} gateways"
        what = "urgent studies" if urgent else "studies"
        raise Busy(f"{limit} {what} are being screened or waiting{where}; retry later.", settings.retry_after_s)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView | JobAccepted,
    summary="Upload one study (multipart files, one zip, or one raw DICOM file)",
    responses={
        400: {"description": "bad upload, unsafe path in a zip"},
        413: {"description": "upload too large, zip bomb"},
        415: {"description": "not DICOM"},
        409: {"description": "the study's earlier versions name another patient (patient_mismatch)"},
        422: {"description": "not CT, no pixel data, undecodable, no usable series, mixed studies, mixed patients"},
        429: {"description": "too many studies in progress, or too many bytes in flight; see Retry-After"},
        503: {"description": "the blob volume or the backlog is past its watermark; see Retry-After"},
    },
    openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/zip": {"schema": {"type": "string", "format": "binary"}},
        "application/dicom": {"schema": {"type": "string", "format": "binary"}},
    }}},
)
async def upload_study(request: Request, store: StoreDep, settings: SettingsDep, blobs: BlobsDep,
                       screener: ScreenerDep, worker: WorkerDep, stow: StowDep, caller: WriteAccess,
                       priority: PriorityQuery = "routine") -> JSONResponse:
    """Accept a study; answers 202 with the job once it is decoded and stored, screening continues.

    With an ``Idempotency-Key`` header (1 to 255 printable ASCII characters, a new one per study, e.g. a UUID),
    an upload sent again under the same key by the same caller (its first answer lost: a cut connection, a
    proxy's timeout) is answered with the first upload's job (202, ``Idempotent-Replayed: true``; its result only
    with ``results:read``), its body not read: a key names one upload, whatever is sent under it again. A key is kept as long as its job
    (``CTSCREEN_RESULT_RETENTION_S``)."""
    key = idempotency(request, caller)
    if key is not None and (first := await store.job_by_key(key)) is not None:
        return _replayed(first, caller)  # before the capacity: the study was accepted once, whatever the load now
    await check_capacity(store, settings, priority)  # before reading the body: a full gateway holds no more uploads
    level = triton_priority(PRIORITIES[priority])  # of its batches screened ahead (then of its job's)
    refusal = await stow.upload_refusal()  # the watermarks C-STORE and STOW-RS obey
    if refusal is not None:
        raise OutOfResources(_WATERMARKS[refusal], settings.retry_after_s)
    content_type = request.headers.get("content-type", "application/octet-stream")
    filename = request.headers.get("x-filename", "upload")[:255]
    # streamed to disk under the in-flight budget (429 before reading when over it); held until the
    # instances are in the blob store (fsynced) and the job is committed
    # the files are spooled to disk (under data_dir/spool) as the body is parsed; the study keeps only their
    # headers in memory (pixels are read from the files when decoded), until its worker has screened it
    admission = request.app.state.admission
    multipart = content_type.lower().lstrip().startswith("multipart/")
    receive = admission.stream if multipart else admission.body  # a multipart body is split as it arrives
    async with receive(request, settings.max_upload_bytes, client_key(request)) as body:
        try:
            spool = await run_in_threadpool(_spool_dir, settings)
        except OSError as exc:
            raise spooling_failed(exc) from exc
        kept = False
        prepared = None
        try:
            # a study that cannot be screened is refused here, with its 4xx; while the worker has room, its
            # slices are screened as they are parsed (gateway.speculation), before the job is accepted
            ahead = settings.screen_ahead and worker.has_room(urgent=priority == "urgent")
            if multipart:  # split and parsed as it arrives
                files, prepared = await prepare_streamed(body, content_type, limits_of(settings), spool, screener,
                                                          ahead, level)
            else:
                try:
                    files = await run_in_threadpool(_expand, body, filename, limits_of(settings), spool)
                except OSError as exc:
                    raise spooling_failed(exc) from exc
                drop_pages(body)
                prepared = await screener.prepare(files, speculate=ahead, priority=level)
            prepared.on_release(functools.partial(shutil.rmtree, spool, ignore_errors=True))
            # another patient's images under this study's UID: refused before anything is stored (and in the commit)
            await store.check_patient(prepared.study_instance_uid, prepared.patient_key)
            keyed = [(name, key, path) for (name, path), key in zip(files, new_keys(len(files)), strict=True)]
            try:
                await run_in_threadpool(blobs.put_many, [(key, path) for _, key, path in keyed])
                sizes = [(n, k, p.stat().st_size) for n, k, p in keyed]
            except OSError as exc:
                refused = Unavailable(f"The study could not be stored durably: {exc.strerror or exc}.")
                refused.retry_after_s = settings.retry_after_s  # a full or failing volume: not this study's fault
                raise refused from exc
            del files
            job_id = uuid.uuid4().hex
            await worker.remember(job_id, prepared)  # before the job is visible: this replica's worker need not read it again
            kept = True
            try:
                view = await store.accept_upload(prepared.study_instance_uid, sizes, settings.job_deadline_s,
                                                 slices_total=prepared.n_slices, job_id=job_id,
                                                 priority=PRIORITIES[priority], patient_key=prepared.patient_key,
                                                 idempotency_key=key)
            except KeyTaken as taken:  # the same key accepted meanwhile (sent twice at once): nothing recorded
                await worker.forget(job_id)
                # the second copy's blobs: one the store fails to delete is left to the orphan sweep
                await run_in_threadpool(delete_each, blobs, [k for _, k, _ in keyed])
                return _replayed(taken.view, caller)
            except BaseException:
                await worker.forget(job_id)  # a cache: were the job committed after all, the worker reads the blobs
                # the blobs stay: the commit may have landed (a failed or cancelled COMMIT has no known
                # outcome); the sweeper removes them once it reads that nothing names them (sweep_orphans)
                raise
            del keyed
        finally:
            if not kept:  # the prepared study's release cancels what it screens ahead and removes the spool
                await run_in_threadpool(prepared.release if prepared is not None
                                        else functools.partial(shutil.rmtree, spool, True))
    request.state.study_instance_uid, request.state.job_id = view.study_instance_uid, view.job_id  # audit
    return JSONResponse(
        view.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{view.job_id}"}
    )


@router.post("/{study_instance_uid}/complete", status_code=202, response_model=JobView | JobAccepted,
             summary="Declare a STOW-RS study complete and screen it now",
             responses={202: {"description": "the job (a finished study: its latest); with results:read the whole "
                                             "job, result included, else its id and state only"},
                        400: {"description": "not a DICOM UID"},
                        404: {"description": "no instance of this study is waiting"},
                        429: {"description": "the job store is full; see Retry-After"}})
async def complete_study(study_instance_uid: str, stow: StowDep, caller: WriteAccess) -> JSONResponse:
    """Screen the instances received for this study now (instead of after the quiet period).

    Without a receiving version the answer is the study's latest job, which may be done: its result is in
    the answer only for a caller who also holds ``results:read`` (a write-only key reads no verdict here)."""
    check_uid(study_instance_uid)
    return _accepted(await stow.complete(study_instance_uid), caller)


_RESCREEN_ANSWERS: dict[int | str, dict[str, Any]] = {
    202: {"description": "the new version's job, queued; with results:read the whole job, else its id and state only"},
    400: {"description": "not a DICOM UID, or a bad Idempotency-Key"},
    404: {"description": "no such study received"},
    409: {"description": "not_rescreenable: its latest version is being received, queued or screened (the message "
                         "names it and its job), or retention removed its instances (send the study again)"},
    429: {"description": "too many studies in progress; see Retry-After"},
}


@router.post("/{study_instance_uid}/rescreen", status_code=202, response_model=JobView | JobAccepted,
             summary="Screen a done study again, with the models served now, as a new version",
             responses=_RESCREEN_ANSWERS)
async def rescreen_study(study_instance_uid: str, request: Request, store: StoreDep, settings: SettingsDep,
                         caller: WriteAccess, priority: Annotated[Priority | None, Query(
                             description="the new version's priority (urgent, routine, low); by default the "
                                         "screened version's")] = None) -> JSONResponse:
    """Screen the study's latest version again from the instances the gateway keeps, without sending it from the
    PACS again (the models were updated, a reading is doubted): a new version (``version`` + 1) and job, whose
    reading supersedes the earlier one at every destination, as a study sent again does. Its latest version must
    be done or failed, and retention must not have removed its instances. ``Idempotency-Key`` as for an upload:
    the same key again from the same caller for the same study is answered with the job it made (202,
    ``Idempotent-Replayed``); an upload's key, or another study's rescreen's, answers nothing here."""
    check_uid(study_instance_uid)
    key = idempotency(request, caller, f"rescreen {study_instance_uid}")  # never an upload's, nor another study's
    view = None if key is None else await store.job_by_key(key)
    replayed = view is not None
    if view is None:
        current = await store.latest_priority(study_instance_uid)  # 404 before 429: nothing to queue
        if current is None:
            raise JobNotFound(f"No study {study_instance_uid!r} has been received.")
        # admitted at the priority it is queued at: an urgent study's (by default) counts urgent jobs only
        await check_capacity(store, settings, priority or priority_name(current))
        try:
            view = await store.rescreen(study_instance_uid, settings.job_deadline_s, idempotency_key=key,
                                        priority=None if priority is None else PRIORITIES[priority])
        except KeyTaken as taken:  # the same key used at the same moment: its job
            view, replayed = taken.view, True
        except ValueError as exc:
            raise NotRescreenable(str(exc)) from None
    request.state.job_id = view.job_id  # audit (the study is the path's)
    return _replayed(view, caller) if replayed else _accepted(view, caller)


@router.get("/{study_instance_uid}", response_model=StudyView, summary="The latest result of a study",
            responses={400: {"description": "not a DICOM UID"}, 404: {"description": "no such study received"}})
async def get_study(study_instance_uid: str, store: StoreDep, _: ReadAccess) -> StudyView:
    """The study's latest job (with its result once done), or ``receiving`` while STOW instances arrive."""
    check_uid(study_instance_uid)
    study = await store.study(study_instance_uid)
    if study is None or (study.state != "receiving" and study.job is None):
        raise JobNotFound(f"No study {study_instance_uid!r} has been received.")
    job, reading = study.job, _reading(study.reading)
    if study.state == "receiving":  # a later version arriving: the previous one's result is still the latest
        return StudyView(study_instance_uid=study_instance_uid, state="receiving", instances_received=study.instances,
                         job_id=job.job_id if job else None, error=job.error if job else None,
                         result=job.result if job else None, version=job.version if job else None, reading=reading)
    assert job is not None
    return StudyView(study_instance_uid=study_instance_uid, state=job.state.value, job_id=job.job_id,
                     error=job.error, result=job.result, version=job.version, reading=reading)

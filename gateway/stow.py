"""Studies arriving instance by instance (DICOMweb STOW-RS and DICOM C-STORE), into the stores.

Each instance is written to the blob store (fsynced) and recorded in the state store before it is
acknowledged (200 / 0x0000): :meth:`Intake.add`. The instances of a study go to its *receiving*
version, whichever replica received them; the sweeper of any replica closes a version once no
instance has arrived for ``stow_quiet_period_s`` (or ``POST /v1/studies/{uid}/complete`` closes it now)
and queues its job, exactly once. An instance arriving after that opens the next version, which holds
every instance of the study, and is screened again: never a silent drop.

Disk is bounded: at most ``max_pending_studies`` receiving studies and ``max_pending_bytes`` bytes in
them, across the cluster; above the watermarks (the backlog of slices waiting to be screened, the blob
volume's free space) and while the state store cannot answer, an instance is refused too. Either way
the refusal is 0xA700, "out of resources" (a STOW-RS failure item, a C-STORE status): the sender keeps
the instance and sends it again later. :meth:`Intake.refusal` decides it, once for both protocols.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import io
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from gateway.dicom import (
    CT_SOP_CLASSES,
    DEFLATED,
    part10_transfer_syntax,
    read_dataset,
    read_failed,
    same_instance,
    unreadable,
)
from gateway.errors import NotDicom, OutOfResources, PatientMismatch, StoreUnavailable, Unavailable
from gateway.jobs import ROUTINE, JobView
from gateway.phi import patient_key_of
from gateway.store import BlobStore, Store, StoreError, StoreUnreachable, new_key
from gateway.uids import is_uid
from gateway.uploads import UploadLimits

logger = logging.getLogger(__name__)

CT_STORAGE = CT_SOP_CLASSES  # the CT storage classes the decoder accepts
_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"]
_PATIENT_TAGS = ["PatientID", "IssuerOfPatientID"]  # read for patient_key alone: never kept, logged or answered

VOLUME_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
"""A blob write failing so is for now, not for good: the instance is refused as out of resources (the sender
retries); it was a processing failure (0x0110), which senders may not retry, and the instance was lost there."""
PATIENT_MISMATCH = 0xA901
"""The STOW-RS ``FailureReason`` and C-STORE status of an instance whose study names another patient
(:class:`~gateway.errors.PatientMismatch`): an error of the "does not match" family (A9xx, PS3.4 Annex B),
its own code so that senders and the audit tell it from 0xA900."""


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The three UIDs STOW-RS needs from an instance, and the patient it names."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    patient_key: str | None = None
    """:func:`gateway.phi.patient_key` of its Patient ID and issuer (None: not read, not compared)."""


def read_header(data: bytes | Path, filename: str = "instance") -> InstanceHeader:
    """Read the SOP Class, SOP Instance and Study Instance UIDs of one DICOM instance (its bytes, or a file:
    only its header is read).

    A deflated data set (Deflated Explicit VR Little Endian) is inflated whole first, with the bounds of
    :func:`gateway.dicom.inflate_deflated` (pydicom's readers inflate it without any, even for three UIDs).

    Raises
    ------
    gateway.errors.NotDicom
        When ``data`` is not a DICOM data set holding the three UIDs.
    gateway.errors.ZipBomb, gateway.errors.TooLarge
        When it is a deflated one that inflates past those bounds (the callers answer "cannot understand"
        to any :class:`~gateway.errors.InvalidInput`, and count it by its reason).
    """
    if part10_transfer_syntax(data) == DEFLATED:
        inflated = read_dataset(data, filename)  # NotDicom, ZipBomb, TooLarge
        return _check_uids(_uids_of(inflated, filename), filename, patient_key_of(inflated))
    tags = _TAGS + _PATIENT_TAGS
    try:
        source = data if isinstance(data, Path) else io.BytesIO(data)
        try:
            ds: pydicom.Dataset = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=tags)
        except InvalidDicomError:
            if not isinstance(source, Path):
                source.seek(0)
            ds = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=tags, force=True)
        values = [str(ds.get(t, "") or "").strip() for t in _TAGS]
    except Exception:  # pydicom raises many types; the decoder's reader knows the hard cases
        # (e.g. explicit VR big endian with undefined-length UN sequences, which pydicom 3.0 cannot read)
        ds = read_dataset(data.read_bytes() if isinstance(data, Path) else data, filename)  # NotDicom, with why
        values = _uids_of(ds, filename)
    return _check_uids(values, filename, patient_key_of(ds))


def _uids_of(ds: pydicom.Dataset, filename: str) -> list[str]:
    """The values of :data:`_TAGS` in ``ds`` (an absent one empty); one pydicom cannot convert in the VR it was
    written with (a SOP Class UID written as FL) is refused, named (:func:`gateway.dicom.unreadable`): its
    BytesLengthException answered STOW-RS 503 internal_error and C-STORE 0x0110, for an instance only its sender
    can fix."""
    values = []
    for tag in _TAGS:
        try:
            values.append(str(ds.get(tag, "") or "").strip())
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a value that does not fit its VR
            if read_failed(exc):
                raise
            raise unreadable(ds, tag, filename) from None
    return values


def _check_uids(values: list[str], filename: str, patient_key: str | None = None) -> InstanceHeader:
    if not all(values):
        missing = [t for t, v in zip(_TAGS, values, strict=True) if not v]
        raise NotDicom(f"DICOM data set without {', '.join(missing)}.", filename=filename)
    for tag, value in zip(_TAGS, values, strict=True):  # grammar first, before a UID reaches a row or a log (issue 14)
        if not is_uid(value):
            raise NotDicom(f"{tag} {value[:70]!r} is not a DICOM UID.", filename=filename)
    return InstanceHeader(values[0], values[1], values[2], patient_key)


class Watermark:
    """Whether the gateway can keep more now: the blob volume's free space and the backlog of slices.

    The disk is measured in a worker thread (a slow network volume never stalls the event loop), at
    most once per ``disk_every_s`` and one measurement at a time: a burst of instances shares one. A
    volume that does not answer within ``disk_timeout_s`` counts as full (senders retry later).

    Parameters
    ----------
    backlog : Callable[[], int] | None
        Slices waiting to be screened now.
    max_backlog_slices : int | None
        Above this backlog: refuse.
    disk : Path | None
        A folder on the volume that keeps accepted instances.
    min_free_bytes : int | None
        Below this free space on ``disk``: refuse.
    disk_every_s : float
        How long one measurement of the free space stands.
    disk_timeout_s : float
        Longest wait for a measurement.
    """

    def __init__(self, backlog: Callable[[], int] | None = None, max_backlog_slices: int | None = None,
                 disk: Path | None = None, min_free_bytes: int | None = None, disk_every_s: float = 1.0,
                 disk_timeout_s: float = 5.0) -> None:
        self.backlog, self.max_backlog_slices = backlog, max_backlog_slices
        self.disk, self.min_free_bytes = disk, min_free_bytes
        self.disk_every_s, self.disk_timeout_s = disk_every_s, disk_timeout_s
        self._disk_full: tuple[float, bool] | None = None  # (measured at, full)
        self._measuring: asyncio.Future[bool] | None = None

    async def refusal(self, may_finish: Callable[[], Awaitable[bool]] | None = None) -> str | None:
        """None when more may be kept, else the reason: ``disk_full`` (always), ``backlog`` (unless
        ``may_finish()`` says the sender is finishing a study already being received: cut off, it would be
        screened in part)."""
        if await self.disk_full():
            return "disk_full"
        if self.max_backlog_slices is not None and self.backlog is not None and self.backlog() > self.max_backlog_slices:
            if may_finish is None or not await may_finish():
                return "backlog"
        return None

    async def disk_full(self) -> bool:
        """Whether the blob volume has less free space than ``min_free_bytes`` (or cannot be measured)."""
        if self.min_free_bytes is None or self.disk is None:
            return False
        if self._disk_full is not None and time.monotonic() - self._disk_full[0] < self.disk_every_s:
            return self._disk_full[1]
        if self._measuring is None:
            self._measuring = asyncio.ensure_future(asyncio.to_thread(self._measure, self.disk, self.min_free_bytes))
            self._measuring.add_done_callback(self._measured)
        try:
            async with asyncio.timeout(self.disk_timeout_s):
                return await asyncio.shield(self._measuring)
        except TimeoutError:
            logger.warning("the blob volume's free space could not be measured in %.0f s: counted as full",
                           self.disk_timeout_s)
            return True

    def _measured(self, future: asyncio.Future[bool]) -> None:
        full = future.result() if not future.cancelled() and future.exception() is None else True
        self._disk_full, self._measuring = (time.monotonic(), full), None

    @staticmethod
    def _measure(disk: Path, min_free_bytes: int) -> bool:
        folder = disk
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            return shutil.disk_usage(folder).free < min_free_bytes
        except OSError:
            return True


class Intake:
    """Puts received instances into the blob store and the state store.

    Parameters
    ----------
    store : Store
        The state store.
    blobs : BlobStore
        Where instance bytes go.
    max_pending_studies : int
        Receiving studies allowed at once (cluster-wide).
    max_pending_bytes : int
        Bytes of receiving studies allowed at once (cluster-wide).
    deadline_s : float
        Deadline of the jobs ``complete`` queues.
    watermark : Watermark | None
        When set, instances are refused while it refuses.
    max_instance_bytes : int
        The largest instance kept: the worker reads no larger file of a study (the upload path's per-file
        limit). C-STORE also cuts one off as it arrives (:attr:`gateway.dimse.StorageScp.max_instance_bytes`).
    """

    def __init__(self, store: Store, blobs: BlobStore, *, max_pending_studies: int = 16,
                 max_pending_bytes: int = 4 * 1024**3, deadline_s: float = 86400.0,
                 watermark: Watermark | None = None, max_instance_bytes: int = UploadLimits.max_file_bytes) -> None:
        self.store, self.blobs = store, blobs
        self.max_pending_studies = max_pending_studies
        self.max_pending_bytes = max_pending_bytes
        self.deadline_s = deadline_s
        self.watermark = watermark
        self.max_instance_bytes = max_instance_bytes

    async def refusal(self, study_instance_uid: str, nbytes: int) -> str | None:
        """Why an instance of ``nbytes`` for this study cannot be kept now, or None when it can.

        Each reason is a "try again later" (0xA700), and its name is the error counted:
        ``out_of_resources_backlog`` / ``out_of_resources_disk_full`` above a watermark (a study already
        being received is let finish past the backlog one: cut off, it would be screened in part),
        ``store_unavailable`` while the state store cannot answer (a fail-over), ``out_of_resources``
        when the receiving studies fill their limits; and ``too_large`` for an instance over
        :attr:`max_instance_bytes` (kept, it failed its whole study ``too_large`` after the sender was told it
        was stored).
        """
        if nbytes > self.max_instance_bytes:
            return "too_large"
        try:
            mark = None if self.watermark is None else await self.watermark.refusal(
                functools.partial(self.store.is_receiving, study_instance_uid))
            if mark is not None:
                return f"out_of_resources_{mark}"
            return None if await self.room_for(study_instance_uid, nbytes) else "out_of_resources"
        except StoreError as exc:  # nothing was kept: the sender retries
            logger.warning("an instance not taken: the state store cannot answer (%s)", type(exc).__name__)
            return "store_unavailable"

    async def upload_refusal(self) -> str | None:
        """Why a whole study uploaded at once cannot be kept now (a watermark; named as in
        :meth:`refusal`), or None when it can."""
        mark = None if self.watermark is None else await self.watermark.refusal()
        return None if mark is None else f"out_of_resources_{mark}"

    async def room_for(self, study_instance_uid: str, nbytes: int) -> bool:
        """Whether an instance of ``nbytes`` for this study fits the limits now."""
        studies, held = await self.store.pending()
        if studies >= self.max_pending_studies and not await self.store.is_receiving(study_instance_uid):
            return False
        return held + nbytes <= self.max_pending_bytes

    async def add(self, header: InstanceHeader, filename: str, data: bytes | Path, nbytes: int,
                  priority: int = ROUTINE) -> None:
        """Store one instance of ``nbytes`` (its bytes, or a file that stays the caller's) durably (blob
        fsynced, row committed); replaces one with the same UID. ``priority``: its study's rank
        (:data:`gateway.jobs.PRIORITIES`; a version takes the highest of its instances').

        Raises
        ------
        gateway.errors.StoreUnavailable
            When the state store cannot take it now (it is not acknowledged; answer "out of resources": the
            sender retries).
        gateway.errors.OutOfResources
            When the blob volume is full (:data:`VOLUME_FULL`; not acknowledged; answer "out of resources").
        gateway.errors.Unavailable
            When the instance could not be stored otherwise (it is not acknowledged; answer failure).
        gateway.errors.PatientMismatch
            When its study's earlier instances name another patient (nothing kept; answer
            :data:`PATIENT_MISMATCH`).
        """
        key = new_key()
        try:
            await asyncio.to_thread(self.blobs.put_many, [(key, data)])
        except OSError as exc:
            logger.error("instance %s not stored: cannot write its blob: %s", header.sop_instance_uid, exc)
            if exc.errno in VOLUME_FULL:  # for now: the sender retries (0xA700), as below the disk watermark
                raise OutOfResources(f"The blob volume is full ({exc.strerror}); send the instance again later.",
                                     StoreUnavailable.retry_after_s) from exc
            raise Unavailable(f"The instance could not be stored durably: {exc.strerror or exc}.",
                              filename=filename) from exc
        try:
            same_as, changed = await self._screened_copy(header, data)
            replaced = await self.store.add_instance(header.study_instance_uid, header.sop_instance_uid,
                                                     filename, key, nbytes, changed=changed, same_as=same_as,
                                                     priority=priority, patient_key=header.patient_key)
        except PatientMismatch:  # refused before the commit: nothing names the blob just written
            await asyncio.to_thread(self.blobs.delete, key)
            raise
        except StoreUnreachable as exc:  # a fail-over, a read-only standby, a full disk: the sender retries
            logger.warning("instance %s not stored: %s", header.sop_instance_uid, exc)
            raise StoreUnavailable("The state store cannot record the instance now; send it again later.",
                                   filename=filename) from exc
        except Exception as exc:  # its blob stays: the commit may have landed (the orphan sweep checks)
            logger.error("instance %s not stored: the state store failed: %s", header.sop_instance_uid,
                         type(exc).__name__)
            raise Unavailable("The instance could not be recorded; retry later.", filename=filename) from exc
        if replaced is not None:
            await asyncio.to_thread(self.blobs.delete, replaced)

    async def _screened_copy(self, header: InstanceHeader, data: bytes | Path) -> tuple[str | None, bool]:
        """``(blob key of the copy the study was screened with, when this instance holds the same data set;
        whether it holds another)``, both empty when the study has no screened copy of it. The same data set
        (the bytes again, or another transfer syntax of them: :func:`gateway.dicom.same_instance`) is kept
        once; another (pixels corrected, a header fixed, a lossy re-encoding) opens the next version. Judged
        by the size alone, a changed instance of the same size was acknowledged and dropped, and a forward in
        another transfer syntax was screened again. A copy that cannot be read counts as changed (screened
        again, never dropped). After retention no copy is left: the store recognises an instance of a done version by
        its SOP Instance UID alone (:meth:`Store.add_instance`)."""
        copy = await self.store.screened_copy(header.study_instance_uid, header.sop_instance_uid)
        if copy is None:
            return None, False

        def same() -> bool:
            try:
                stored = self.blobs.get(copy)
            except OSError:
                return False
            new = data.read_bytes() if isinstance(data, Path) else bytes(data)
            return same_instance(new, stored)

        kept = await asyncio.to_thread(same)
        return (copy, False) if kept else (None, True)

    async def transfer_ended(self, sent: Mapping[str, Collection[str]], note: str | None) -> None:
        """A C-STORE association that stored these instances (SOP Instance UIDs by study) ended: without a release
        (``note``, what their results will say) or released (None: clears it where it sent the whole study).
        See :meth:`Store.mark_interrupted`."""
        await self.store.mark_interrupted(sent, note)

    async def complete(self, study_instance_uid: str) -> JobView:
        """Screen a study now (explicit trigger); without a receiving version, its latest job.

        Raises
        ------
        gateway.jobs.JobNotFound
            When no instance of the study was received.
        """
        return await self.store.complete_now(study_instance_uid, self.deadline_s)

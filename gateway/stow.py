"""Studies arriving instance by instance (DICOMweb STOW-RS), held until they are complete.

A study is complete when the client says so (:meth:`StowBuffer.complete`, ``POST
/v1/studies/{uid}/complete``) or when no instance of it has arrived for ``quiet_period_s``. It is
then submitted to the :class:`~gateway.jobs.JobStore`; when the store is full the study simply waits
(it was accepted, so it is never dropped) and is submitted as soon as a slot frees.

Memory is bounded: at most ``max_pending_studies`` studies and ``max_pending_bytes`` bytes are held;
an instance past either limit is refused (STOW failure 0xA700, "out of resources"). Once a study is
submitted its instances are kept (and counted) until its job finishes, so instances that arrive late
make the study pending again with all its instances, and it is screened again.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from dataclasses import dataclass, field

import pydicom
from pydicom.errors import InvalidDicomError

from gateway.dicom import CT_SOP_CLASSES, read_dataset
from gateway.errors import NotDicom
from gateway.jobs import TERMINAL, Busy, Job, JobNotFound, JobStore

logger = logging.getLogger(__name__)

CT_STORAGE = CT_SOP_CLASSES  # the CT storage classes the decoder accepts
_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"]


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The three UIDs STOW-RS needs from an instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str


def read_header(data: bytes, filename: str = "instance") -> InstanceHeader:
    """Read the SOP Class, SOP Instance and Study Instance UIDs of one DICOM instance.

    Raises
    ------
    gateway.errors.NotDicom
        When ``data`` is not a DICOM data set holding the three UIDs.
    """
    try:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=_TAGS)
        except InvalidDicomError:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=_TAGS, force=True)
        values = [str(ds.get(t, "") or "").strip() for t in _TAGS]
    except Exception:  # pydicom raises many types; the decoder's reader knows the hard cases
        # (e.g. explicit VR big endian with undefined-length UN sequences, which pydicom 3.0 cannot read)
        ds = read_dataset(data, filename)  # raises NotDicom with the reason
        values = [str(ds.get(t, "") or "").strip() for t in _TAGS]
    if not all(values):
        missing = [t for t, v in zip(_TAGS, values, strict=True) if not v]
        raise NotDicom(f"DICOM data set without {', '.join(missing)}.", filename=filename)
    return InstanceHeader(*values)


@dataclass
class _Pending:
    uid: str
    instances: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    nbytes: int = 0
    last_rx: float = field(default_factory=time.monotonic)
    dirty: bool = True  # instances arrived since the last submission
    job: Job | None = None
    force: bool = False


class StowBuffer:
    """Instances of studies being received, and the trigger that screens them.

    Parameters
    ----------
    store : JobStore
        Where complete studies are submitted.
    quiet_period_s : float
        A study is complete after this long without a new instance.
    max_pending_studies : int
        Studies held at once.
    max_pending_bytes : int
        Bytes held at once.
    """

    def __init__(self, store: JobStore, *, quiet_period_s: float = 10.0, max_pending_studies: int = 16,
                 max_pending_bytes: int = 4 * 1024**3) -> None:
        self.store = store
        self.quiet_period_s = quiet_period_s
        self.max_pending_studies = max_pending_studies
        self.max_pending_bytes = max_pending_bytes
        self._studies: dict[str, _Pending] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(p.nbytes for p in self._studies.values())

    def pending(self, study_instance_uid: str) -> tuple[int, bool, Job | None] | None:
        """``(instances held, still receiving, last job)`` of a held study, or None."""
        p = self._studies.get(study_instance_uid)
        return None if p is None else (len(p.instances), p.dirty, p.job)

    def room_for(self, study_instance_uid: str, nbytes: int) -> bool:
        """Whether an instance of ``nbytes`` for this study fits the limits now."""
        if study_instance_uid not in self._studies and len(self._studies) >= self.max_pending_studies:
            return False
        return self.nbytes + nbytes <= self.max_pending_bytes

    def add(self, header: InstanceHeader, filename: str, data: bytes) -> None:
        """Hold one instance (the caller checked :meth:`room_for`); replaces one with the same UID."""
        p = self._studies.get(header.study_instance_uid)
        if p is None:
            p = self._studies[header.study_instance_uid] = _Pending(header.study_instance_uid)
        old = p.instances.pop(header.sop_instance_uid, None)
        if old is not None:
            p.nbytes -= len(old[1])
        p.instances[header.sop_instance_uid] = (filename, data)
        p.nbytes += len(data)
        p.last_rx = time.monotonic()
        p.dirty = True
        self._wake.set()

    def complete(self, study_instance_uid: str) -> Job:
        """Screen a study now (explicit trigger).

        Raises
        ------
        JobNotFound
            When no instance of the study is held.
        Busy
            When the job store is full (the study stays held and is screened when a slot frees).
        """
        p = self._studies.get(study_instance_uid)
        if p is None or not p.instances:
            raise JobNotFound(f"No instance of study {study_instance_uid!r} is waiting to be screened.")
        if not p.dirty and p.job is not None:
            return p.job
        try:
            return self._submit(p)
        except Busy:
            p.force = True
            raise

    def _submit(self, p: _Pending) -> Job:
        job = self.store.submit(list(p.instances.values()), origin="stow", study_instance_uid=p.uid)
        p.job, p.dirty, p.force = job, False, False
        logger.info("STOW study %s complete: %d instances, job %s", p.uid, len(p.instances), job.id)
        return job

    def _tick(self) -> float:
        """Submit every study that is due; drop finished ones. Returns seconds until the next due."""
        now = time.monotonic()
        nxt = 1.0
        for uid, p in list(self._studies.items()):
            if p.dirty:
                due = p.last_rx + self.quiet_period_s
                if p.force or now >= due:
                    try:
                        self._submit(p)
                    except Busy:
                        nxt = min(nxt, 0.5)
                    except Exception as exc:  # noqa: BLE001 - the loop must survive
                        logger.warning("STOW study %s could not be submitted: %s", uid, exc)
                        del self._studies[uid]
                else:
                    nxt = min(nxt, due - now)
            elif p.job is not None and p.job.state in TERMINAL:
                del self._studies[uid]
        return max(0.01, nxt)

    async def _loop(self) -> None:
        while True:
            delay = self._tick()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    def start(self) -> None:
        """Start the quiet-period trigger."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="stow-trigger")

    async def close(self) -> None:
        """Stop the trigger; studies still held are logged (they were not screened)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        waiting = [p.uid for p in self._studies.values() if p.dirty]
        if waiting:
            logger.warning("stopping with %d STOW studies not yet screened: %s", len(waiting), waiting)

"""Studies arriving instance by instance (DICOMweb STOW-RS), held until they are complete.

A study is complete when the client says so (:meth:`StowBuffer.complete`, ``POST
/v1/studies/{uid}/complete``) or when no instance of it has arrived for ``quiet_period_s``. It is
then submitted to the :class:`~gateway.jobs.JobStore`; when the store is full the study simply waits
(it was accepted, so it is never dropped) and is submitted as soon as a slot frees.

Memory is bounded: at most ``max_pending_studies`` studies and ``max_pending_bytes`` bytes are held;
an instance past either limit is refused (STOW failure 0xA700, "out of resources"). Once a study is
submitted its instances are kept (and counted) until its job finishes, so instances that arrive late
make the study pending again with all its instances, and it is screened again.

Durability: with ``spool_dir`` set (``<CTSCREEN_RESULTS_DIR>/stow``), every instance is written to
``<spool_dir>/<study>/<sop>.dcm`` (temp file + rename) before it is acknowledged, and a study's files
are removed once its job has finished (the job spool of :class:`~gateway.jobs.JobStore` owns them from
submission on). :meth:`StowBuffer.reload` puts the studies a previous process left back in the buffer,
so they are screened after the quiet period as usual; a half-received study is never screened at
shut-down. A study whose submission fails unexpectedly stays pending and is retried with back-off.
Without ``spool_dir``, instances waiting at shut-down are lost (logged at WARNING).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from gateway.dicom import CT_SOP_CLASSES, read_dataset
from gateway.errors import NotDicom, Unavailable
from gateway.jobs import TERMINAL, Busy, Job, JobNotFound, JobStore, _safe
from gateway.uids import is_uid

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
    for tag, value in zip(_TAGS, values, strict=True):  # they name spool files: grammar first (issue 14)
        if not is_uid(value):
            raise NotDicom(f"{tag} {value[:70]!r} is not a DICOM UID.", filename=filename)
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
    failures: int = 0  # unexpected submission errors in a row
    retry_at: float = 0.0  # monotonic time before which no submission is retried


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
    spool_dir : Path | None
        Where accepted instances are written before they are acknowledged (``<results_dir>/stow``);
        None keeps them in memory only (lost at shut-down).
    """

    max_retry_s = 60.0
    """Longest wait between two tries of a study whose submission failed unexpectedly."""

    def __init__(self, store: JobStore, *, quiet_period_s: float = 10.0, max_pending_studies: int = 16,
                 max_pending_bytes: int = 4 * 1024**3, spool_dir: Path | None = None) -> None:
        self.store = store
        self.spool_dir = spool_dir
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
        """Hold one instance (the caller checked :meth:`room_for`); replaces one with the same UID.

        With ``spool_dir`` set the instance is on disk when this returns.

        Raises
        ------
        gateway.errors.Unavailable
            When the instance cannot be written to ``spool_dir`` (it is not held; answer failure).
        """
        if self.spool_dir is not None:
            path = self._path(header.study_instance_uid, header.sop_instance_uid)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError as exc:
                logger.error("STOW instance %s not stored: cannot write %s: %s", header.sop_instance_uid, path, exc)
                raise Unavailable(f"The instance could not be stored durably: {exc.strerror or exc}.",
                                  filename=filename) from exc
        self._hold(header, filename, data)

    def _hold(self, header: InstanceHeader, filename: str, data: bytes) -> None:
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
                due = max(p.retry_at, p.last_rx + self.quiet_period_s)
                if now >= p.retry_at and (p.force or now >= due):
                    try:
                        self._submit(p)
                        p.failures = 0
                    except Busy:
                        nxt = min(nxt, 0.5)
                    except Exception:  # noqa: BLE001 - the loop must survive; the study stays pending
                        p.failures += 1
                        wait = min(self.max_retry_s, 0.5 * 2 ** (p.failures - 1))
                        p.retry_at = now + wait
                        logger.exception("STOW study %s could not be submitted (try %d); retrying in %g s",
                                         uid, p.failures, wait)
                        nxt = min(nxt, wait)
                else:
                    nxt = min(nxt, due - now)
            elif p.job is not None and p.job.state in TERMINAL:
                del self._studies[uid]
                self._unspool(uid)
        return max(0.01, nxt)

    # --- durability --------------------------------------------------------------------------
    def _path(self, study_instance_uid: str, sop_instance_uid: str) -> Path:
        assert self.spool_dir is not None
        return self.spool_dir / _safe(study_instance_uid) / f"{_safe(sop_instance_uid)}.dcm"

    def _unspool(self, study_instance_uid: str) -> None:
        if self.spool_dir is None:
            return
        folder = self.spool_dir / _safe(study_instance_uid)
        try:
            if folder.is_dir():
                for f in folder.iterdir():
                    f.unlink(missing_ok=True)
                folder.rmdir()
        except OSError as exc:  # a leftover is screened again at the next start, never lost
            logger.warning("could not remove the STOW files of study %s: %s", study_instance_uid, exc)

    def reload(self) -> int:
        """Hold again the instances a previous process accepted and did not see screened.

        Each study is screened after the quiet period, as if its last instance had just arrived (a
        study whose job the store resumed, with the same instances, is attached to that job instead).
        Unreadable files are left in place and logged. Returns the number of instances reloaded.
        """
        if self.spool_dir is None or not self.spool_dir.is_dir():
            return 0
        n = 0
        for folder in sorted(d for d in self.spool_dir.iterdir() if d.is_dir()):
            for path in sorted(folder.glob("*.dcm")):
                try:
                    data = path.read_bytes()
                    header = read_header(data, path.name)
                except (OSError, NotDicom) as exc:
                    logger.warning("STOW file %s not reloaded: %s", path, exc)
                    continue
                self._hold(header, f"stow:{path.name}", data)
                n += 1
        for uid, p in self._studies.items():
            job = self._resumed_job(uid)
            if job is not None and job.files == len(p.instances):
                p.job, p.dirty = job, False
        if n:
            logger.warning("reloaded %d accepted STOW instances of %d studies left by a previous run",
                           n, len(self._studies))
        return n

    def _resumed_job(self, study_instance_uid: str) -> Job | None:
        try:
            job = self.store.job(self.store.latest_for_study(study_instance_uid).job_id)
        except JobNotFound:
            return None
        return job if job.state not in TERMINAL and job.origin == "stow" else None

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
        """Stop the trigger; studies still held are not screened (they may be incomplete).

        With ``spool_dir`` they stay on disk for :meth:`reload`; without it they are lost, and the
        loss is logged at WARNING.
        """
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        waiting = [p for p in self._studies.values() if p.dirty]
        if not waiting:
            return
        instances = sum(len(p.instances) for p in waiting)
        uids = [p.uid for p in waiting]
        if self.spool_dir is not None:
            logger.info("stopping with %d STOW studies (%d instances) not yet screened; kept in %s for the "
                        "next start: %s", len(waiting), instances, self.spool_dir, uids)
        else:
            logger.warning("stopping: %d accepted STOW/C-STORE instances of %d studies are LOST (not yet "
                           "screened; set CTSCREEN_RESULTS_DIR to keep them): %s", instances, len(waiting), uids)

"""The tables of the state store (SQLAlchemy 2 declarative models).

=======================  ==========================================================================================
``studies``              one row per *version* of a study: ``receiving`` while STOW-RS / C-STORE instances arrive,
                         ``complete`` once the quiet period (or ``POST .../complete``) closed it; an upload is a
                         complete version at once. An instance arriving after completion opens version n + 1,
                         and so does a study screened again (``Store.rescreen``: complete at once).
``instances``            the files of a version (idempotent by SOP Instance UID within a version), each pointing
                         to its bytes in the blob store; a new version starts with a copy of the previous rows.
``expired_instances``    the SOP Instance UIDs of a done version's instances that retention removed (revision 0012):
                         an instance the study was screened with, sent again after retention, is recognised by its UID.
``jobs``                 one per complete version: the state machine, attempts, next attempt time, deadline,
                         the replica that accepted it (its metrics count it while queued) and the lease (owner
                         and expiry) of the replica screening it.
``results``              the CaseResult of a done job and the headers its DICOM SR needs.
``events``               progress of a job (state and slices done), read by the SSE stream of any replica.
``replicas``             when each gateway replica's sweeper last ran (revision 0008): the queued jobs of a replica
                         not seen for a while (killed, not shut down) are adopted by a live one, so that the
                         replicas' backlog gauges still sum to the cluster's backlog.
=======================  ==========================================================================================

Times are seconds since the epoch (``float``): the same comparison on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID = String(64)
"""A DICOM UID (at most 64 characters)."""


FILENAME_LENGTH = 512
"""The longest file name an instance row keeps (:func:`gateway.store.store.fit_filename` cuts longer ones)."""

class Base(DeclarativeBase):
    """Base of the store's tables."""


class Study(Base):
    """One version of a study."""

    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("study_instance_uid", "version"),
        # at most one receiving version per study (migration 0005): two replicas cannot both open one
        Index("ux_studies_receiving", "study_instance_uid", unique=True,
              postgresql_where=text("state = 'receiving'"), sqlite_where=text("state = 'receiving'")),
        # the worklist's urgent-first order and priority filter (migration 0015), read backwards for DESC
        Index("ix_studies_priority_created_at", "priority", "created_at", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    version: Mapped[int] = mapped_column(Integer)
    origin: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    last_rx_at: Mapped[float] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # revision 0010
    interrupted: Mapped[str | None] = mapped_column(String(256), nullable=True)  # revision 0009
    """Set while the last C-STORE association that stored into this version ended without a release (an
    A-ABORT, a dropped connection): what the result then says; cleared by one that released."""
    patient_key: Mapped[str | None] = mapped_column(String(64), nullable=True)  # revision 0011
    """The patient the version names (:func:`gateway.phi.patient_key`: a digest, never the ID); None for a
    version an earlier release wrote, or one recorded without it. Every version of a study names the same."""


class Instance(Base):
    """One received file of a study version."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("study_id", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    filename: Mapped[str] = mapped_column(String(FILENAME_LENGTH))
    blob_key: Mapped[str] = mapped_column(String(128), index=True)
    nbytes: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)


class ExpiredInstance(Base):
    """A SOP Instance UID a done study version was screened with, whose instance retention removed (revision 0012).

    Only the UID is kept (no file name, size or bytes), as long as the version's result: a PACS that sends the
    study again later (a re-route, a prefetch) must not have it screened on what it re-sent alone."""

    __tablename__ = "expired_instances"

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)


class Job(Base):
    """The screening of one complete study version."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "state", "next_attempt_at"),
                      Index("ux_jobs_idempotency_key", "idempotency_key", unique=True))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    origin: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    files: Mapped[int] = mapped_column(Integer)
    slices_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    slices_done: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    takeovers: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # revision 0006
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # revision 0010
    next_attempt_at: Mapped[float] = mapped_column(Float)
    deadline_at: Mapped[float] = mapped_column(Float)
    accepted_by: Mapped[str | None] = mapped_column(String(128), nullable=True)  # revision 0002
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # revision 0014: the digest of an upload's Idempotency-Key with its caller (gateway.api.studies.idempotency)
    idempotency_key: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Result(Base):
    """The outcome of a done job."""

    __tablename__ = "results"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    sr_context: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class Event(Base):
    """A change of a job (revision 0002)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    slices_done: Mapped[int] = mapped_column(Integer)
    slices_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class Replica(Base):
    """A gateway replica and when its sweeper last said it was alive (revision 0008)."""

    __tablename__ = "replicas"

    owner: Mapped[str] = mapped_column(String(128), primary_key=True)
    seen_at: Mapped[float] = mapped_column(Float)

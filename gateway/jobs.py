"""Jobs as the API shows them: states and views (the job errors live in :mod:`gateway.errors`).

A job screens one complete study version. Its state lives in the state store (:mod:`gateway.store`),
never only in memory; any replica answers for it. A job goes::

    queued -> decoding -> inferring -> aggregating -> done
       ^          |           |             |
       +----------+-----------+-------------+   no Triton could take it: back to queued, next try later
                                                (``next_attempt_at``); past the deadline: failed

and ``failed`` (bad study, deadline passed) -> ``queued`` again on ``POST /v1/jobs/{id}/retry``.
``decoding``, ``inferring`` and ``aggregating`` are held under a lease by one replica; a lease that
expires (the replica died) makes the job claimable by any other.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

from aggregator.schema import CaseResult
from ctscreen.contracts import DEFAULT_PRIORITY_LEVEL
from gateway.errors import Busy as Busy  # re-exported: the API's job errors
from gateway.errors import JobNotFound as JobNotFound


class JobState(StrEnum):
    """Where a job is."""

    queued = "queued"
    decoding = "decoding"
    inferring = "inferring"
    aggregating = "aggregating"
    done = "done"
    failed = "failed"


TERMINAL = frozenset({JobState.done, JobState.failed})
RUNNING = frozenset({JobState.decoding, JobState.inferring, JobState.aggregating})
"""States held under a lease by one replica."""


class JobError(BaseModel):
    """Why a job failed (or why its last try did not finish): a machine-readable reason and a sentence."""

    reason: str
    message: str
    detail: dict[str, Any] | None = None


Priority = Literal["low", "routine", "urgent"]
PRIORITIES: dict[Priority, int] = {"low": 0, "routine": 1, "urgent": 2}
"""A study's priority and its rank in the store: a worker takes the highest due first, the oldest first within
one (``POST /v1/studies?priority=``, STOW-RS ``?priority=``, the C-STORE request's Priority, an urgent AE title)."""
ROUTINE = PRIORITIES["routine"]
URGENT = PRIORITIES["urgent"]
_NAMES: dict[int, Priority] = {rank: name for name, rank in PRIORITIES.items()}
DIMSE_PRIORITIES: dict[int, int] = {0x0002: 0, 0x0000: 1, 0x0001: 2}
"""The C-STORE request's Priority (0000,0700): LOW, MEDIUM, HIGH (PS3.7 9.1.1.1)."""


def triton_priority(rank: int | None) -> int:
    """The Triton priority level (:data:`ctscreen.contracts.PRIORITY_LEVELS`) of a study's requests, by its rank:
    urgent 1 (Triton's most urgent), any other 2 (the models' default level: a low study, claimed last, is not
    starved once screened).

    >>> [triton_priority(PRIORITIES[p]) for p in ("urgent", "routine", "low")], triton_priority(None)
    ([1, 2, 2], 2)
    """
    return 1 if rank is not None and rank >= URGENT else DEFAULT_PRIORITY_LEVEL


def priority_name(rank: int | None) -> Priority:
    """The name of a stored rank (a row written before ranks were: routine).

    >>> priority_name(2), priority_name(None)
    ('urgent', 'routine')
    """
    return _NAMES.get(ROUTINE if rank is None else rank, "routine")


class JobAccepted(BaseModel):
    """A job as a caller without ``results:read`` sees it in a write route's answer: which job, and its state
    (its result and error are read with ``results:read``, ``GET /v1/jobs/{id}``)."""

    job_id: str
    state: JobState


def answer_of(view: JobView, reads_results: bool) -> dict[str, Any]:
    """The JSON a write route answers with ``view``: all of it for a caller who may read results, else
    only the job's id and state (a ``studies:write``-only key, e.g. a PACS router, never sees a verdict).

    >>> from datetime import datetime, timezone
    >>> v = JobView(job_id="a" * 32, state=JobState.done, origin="upload", files=1,
    ...             created_at=datetime(2026, 1, 1, tzinfo=timezone.utc))
    >>> answer_of(v, False)
    {'job_id': 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'state': 'done'}
    >>> "result" in answer_of(v, True)
    True
    """
    if reads_results:
        return view.model_dump(mode="json")
    return JobAccepted(job_id=view.job_id, state=view.state).model_dump(mode="json")


class JobView(BaseModel):
    """A job as the API shows it."""

    job_id: str
    state: JobState
    origin: str = Field(description="upload or stow (STOW-RS and C-STORE)")
    priority: Priority = Field("routine", description="taken before every lower one due (upload or STOW-RS "
                                                      "?priority=, C-STORE Priority, an urgent AE title)")
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    files: int = Field(description="files received")
    slices_total: int | None = Field(None, description="slices to screen, known once decoded")
    slices_done: int = 0
    attempts: int = Field(0, description="tries so far (a try ends when no Triton could take the study)")
    next_attempt_at: datetime | None = Field(None, description="while queued after a failed try: next try")
    created_at: datetime
    finished_at: datetime | None = None
    error: JobError | None = None
    result: CaseResult | None = None
    version: int | None = Field(None, description="the version of the study this job screens (GET /v1/jobs/{id} and its events)")
    superseded_by: int | None = Field(
        None, description="a newer version of the same study (instances received after this one's) that has not "
                          "failed: this job's result is not the study's latest, or will not be once that one is "
                          "screened; a failed later version supersedes nothing (GET /v1/jobs/{id} and its events)")
    newest_version: int | None = Field(
        None, description="the study's newest version, whatever its state (being received, screened, done or "
                          "failed): above ``version``, this job is not retried (409 superseded), that version is "
                          "the one to screen (GET /v1/jobs/{id} and its events)")

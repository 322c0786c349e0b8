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
from typing import Any

from pydantic import BaseModel, Field

from aggregator.schema import CaseResult
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


class JobView(BaseModel):
    """A job as the API shows it."""

    job_id: str
    state: JobState
    origin: str = Field(description="upload or stow (STOW-RS and C-STORE)")
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
    version: int | None = Field(None, description="the version of the study this job screens (GET /v1/jobs/{id})")
    superseded_by: int | None = Field(
        None, description="a newer version of the same study (instances received after this one's): this job's "
                          "result is not the study's latest (GET /v1/jobs/{id})")

"""jobs.idempotency_key: an upload sent again under its Idempotency-Key gets its first job, not a second version

A client that lost the 202 of an upload (a connection cut after the gateway committed the job, a proxy's timeout)
could not know whether the study was accepted: sent again, it became a second version, screened again, and a
second report reached the RIS. ``POST /v1/studies`` with an ``Idempotency-Key`` header now records the key's
digest (with the caller's identity) on the job; the same key again answers that job. Expand-only: a release
before this one ignores the column (and screens a repeated upload as a new version).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("idempotency_key", sa.String(64), nullable=True))  # in place on SQLite too
    op.create_index("ux_jobs_idempotency_key", "jobs", ["idempotency_key"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_jobs_idempotency_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("idempotency_key")

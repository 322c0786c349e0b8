"""jobs.takeovers: how many times in a row a job's holder was lost with it (its lease lapsed)

A study whose screening kills its process (a decoder killed for memory, a crash) used to be taken over
by the next replica at once, and killed that one too, every lease, until its deadline a day later. The
count lets the store set such a job aside (Store.claim). Expand-only: a release before this one ignores
the column.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("takeovers", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("takeovers")

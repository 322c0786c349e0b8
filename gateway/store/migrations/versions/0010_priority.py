"""studies.priority, jobs.priority: an urgent study is taken before routine ones

Workers took the oldest due job: a 40-slice emergency study sent with C-STORE Priority HIGH waited behind
three 120-slice studies (a review's run: 20 s queued, 38 s to its verdict against 11 s alone). A study
version now carries a rank (0 low, 1 routine, 2 urgent: the highest of its instances' C-STORE Priority, an
urgent AE title, or the upload's or STOW-RS request's ``?priority=``) and its job takes it; the claim takes
the highest due first. Expand-only: a release before this one ignores the columns (and claims by age).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("studies", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    for table in ("jobs", "studies"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("priority")

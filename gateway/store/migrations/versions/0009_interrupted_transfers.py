"""studies.interrupted: a study version whose C-STORE transfer ended without a release

A scanner's association aborted after 9 of 60 slices: the version closed on its quiet period and the 9
slices were screened as the whole study, negative, with nothing to say it was incomplete (the positive
study sent again later was version 2: a negative then a positive for one patient). The version now
records the abort; its result says so, and a negative one is indeterminate. Expand-only: a release before
this one ignores the column.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("interrupted", sa.String(256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("interrupted")

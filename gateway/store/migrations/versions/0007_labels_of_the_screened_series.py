"""study_labels read again from the screened series.

The worklist took a study version's labels from its first stored instance, whose series (a scout or
topogram, sent first) is often not the screened one, and recorded them while the study was still being
received. Labels are now recorded once the job is done, from an instance of the screened series; the rows
recorded before are removed so that the worklist reads them again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM study_labels")


def downgrade() -> None:
    pass  # the labels are read again on demand either way

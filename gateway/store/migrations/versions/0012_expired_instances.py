"""expired_instances: the SOP Instance UIDs of a done version's instances, kept when retention removes them

Retention deleted a screened version's ``instances`` rows with their blobs, and with them the only record of what
the study was screened with: a PACS that sent one of those instances again a week later (a re-route, a prefetch)
opened a version of that one slice, screened indeterminate, whose delivery retracted the study's positive reading
at the PACS and replaced it at the RIS. Retention now keeps each such instance's SOP Instance UID (nothing else)
as long as the version's result, and an instance sent again under one of them screens nothing. Expand-only: a
release before this one ignores the table (and keeps none).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    study = sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True)
    op.create_table("expired_instances", study, sa.Column("sop_instance_uid", sa.String(64), primary_key=True))


def downgrade() -> None:
    op.drop_table("expired_instances")

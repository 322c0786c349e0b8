"""replicas: when each gateway replica was last seen alive

A replica shut down cleanly leaves its queued jobs to no one, and the next sweep of a live replica counts
them (Store.adopt). A replica killed (OOM, node lost) left them named as its own: no live replica's
``ctscreen_backlog_slices`` counted them until one was claimed, and the autoscaler read a shorter backlog
than the cluster held. Each sweeper now records when it ran; the jobs of a replica not seen for a while
are adopted like those of one that shut down. Expand-only: a release before this one ignores the table.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("owner", sa.String(128), primary_key=True),
        sa.Column("seen_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("replicas")

"""ix_studies_priority_created_at: the worklist's urgent-first order and its priority filter read an index

``GET /v1/worklist?order=priority`` ordered by ``coalesce(priority, 1)``, which no index serves: every page load
sorted the whole studies table (a regional centre's 100 000 versions). ``studies.priority`` is NOT NULL (0010 gave
the rows before it routine's 1), so the order is now the plain columns ``priority DESC, created_at DESC, id DESC``,
which this index serves read backwards on both SQLite and PostgreSQL (every key descending: no DESC index needed;
``id`` is the order's tie-breaker, stored in the index so PostgreSQL sorts nothing either). ``?priority=`` is an
equality on its first column, newest first within it. Expand-only: a release before this one leaves it unused.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_studies_priority_created_at", "studies", ["priority", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_studies_priority_created_at", table_name="studies")

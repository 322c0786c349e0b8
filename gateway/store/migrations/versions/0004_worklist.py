"""worklist: patient-free study labels and the indexes of the web worklist (issue 16)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study_labels",
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("study_date", sa.String(8), nullable=True),
        sa.Column("accession_number", sa.String(16), nullable=True),
        sa.Column("series_description", sa.String(64), nullable=True),
        sa.Column("read_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_studies_created_at", "studies", ["created_at"])
    # the verdict filter reads the verdict out of the result document: an expression index per dialect,
    # the same expression gateway.store.worklist.verdict_of emits
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE INDEX ix_results_verdict ON results ((result->>'verdict'))")
    else:
        op.execute("CREATE INDEX ix_results_verdict ON results (json_extract(result, '$.verdict'))")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_results_verdict")
    op.drop_index("ix_studies_created_at", table_name="studies")
    op.drop_table("study_labels")

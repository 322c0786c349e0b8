"""deliveries.held: what a destination acknowledged before a forced re-send, kept through it

A forced re-send cleared ``sent``, the only record of what the destination acknowledged, so that every object
went again; when that round failed (the PACS stopped meanwhile), the record stayed empty, and the study's next
reading retracted nothing (no Rejection Note for the objects the PACS still held; at a RIS, no report replacing
one its rule leaves out). The force now moves ``sent`` into ``held``, read with ``sent`` as what the destination
holds. Expand-only: a release before this one ignores the column. A downgrade folds ``held`` back into ``sent``
(the older schema's only record of it; a forced round under way then sends only what was not acknowledged).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("held", sa.JSON(), nullable=True))  # SQLite adds a nullable column in place


def downgrade() -> None:
    deliveries = sa.table("deliveries", sa.column("id", sa.Integer()), sa.column("sent", sa.JSON()),
                          sa.column("held", sa.JSON()))
    bind = op.get_bind()
    for row in bind.execute(sa.select(deliveries.c.id, deliveries.c.sent, deliveries.c.held)
                            .where(deliveries.c.held.is_not(None))).all():
        sent, held = (json.loads(v) if isinstance(v, str) else v for v in (row.sent, row.held))
        bind.execute(deliveries.update().where(deliveries.c.id == row.id)
                     .values(sent=sorted({*(sent or ()), *(held or ())})))
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("held")

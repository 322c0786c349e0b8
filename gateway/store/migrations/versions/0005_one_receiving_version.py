"""one receiving version per study: a partial unique index closes the race of two replicas opening one

Without it, under READ COMMITTED two replicas could both miss the receiving version of a new study
(their SELECT ran before either committed), and the second, whose max(version) ran after the first
committed, opened version n + 1 beside it. With the index its INSERT fails and Store.add_instance
retries into the version the first replica opened.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

WHERE = sa.text("state = 'receiving'")


def upgrade() -> None:
    op.create_index("ux_studies_receiving", "studies", ["study_instance_uid"], unique=True,
                    postgresql_where=WHERE, sqlite_where=WHERE)


def downgrade() -> None:
    op.drop_index("ux_studies_receiving", table_name="studies")

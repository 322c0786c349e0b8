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
    merge_receiving_duplicates(op.get_bind())
    op.create_index("ux_studies_receiving", "studies", ["study_instance_uid"], unique=True,
                    postgresql_where=WHERE, sqlite_where=WHERE)


def merge_receiving_duplicates(conn: sa.engine.Connection) -> int:
    """The race this index closes may have left a study with two receiving versions, and the index cannot
    be made over them: move the older ones' instances into the newest (an instance it holds already
    stays there; the older copy's blob is then named by nothing, and the orphan sweep sets it aside) and
    drop the older, now empty, versions. No job hangs on a receiving version. Returns the versions merged."""
    dupes = conn.execute(sa.text(
        "SELECT study_instance_uid, MAX(version) FROM studies WHERE state = 'receiving' "
        "GROUP BY study_instance_uid HAVING COUNT(*) > 1")).all()
    merged = 0
    for uid, newest in dupes:
        keep = conn.execute(sa.text("SELECT id FROM studies WHERE study_instance_uid = :u AND version = :v"),
                            {"u": uid, "v": newest}).scalar_one()
        older = conn.execute(sa.text("SELECT id FROM studies WHERE study_instance_uid = :u AND state = 'receiving' "
                                     "AND id != :k"), {"u": uid, "k": keep}).scalars().all()
        for sid in older:
            conn.execute(sa.text(
                "UPDATE instances SET study_id = :k WHERE study_id = :s AND (sop_instance_uid IS NULL OR "
                "sop_instance_uid NOT IN (SELECT sop_instance_uid FROM instances WHERE study_id = :k "
                "AND sop_instance_uid IS NOT NULL))"), {"k": keep, "s": sid})
            conn.execute(sa.text("DELETE FROM instances WHERE study_id = :s"), {"s": sid})
            conn.execute(sa.text("DELETE FROM studies WHERE id = :s"), {"s": sid})
            merged += 1
    return merged


def downgrade() -> None:
    op.drop_index("ux_studies_receiving", table_name="studies")

"""studies.patient_key: the patient a study version names, so that another patient's cannot follow it

A CT slice of patient B relabelled with patient A's Study Instance UID opened version 2 of A's study, was
screened and superseded A's positive reading (the RIS got a report replacing it, the PACS an SR filed under
A's study naming B); one upload holding two patients' series was screened as one study. A version now
records a digest of the Patient ID and its issuer (gateway.phi.patient_key, never the ID), and an instance
or upload naming another patient than the study's earlier versions is refused. Expand-only: a release before
this one ignores the column; a version it wrote (NULL) names no patient and is not compared.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("patient_key", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("patient_key")

"""Key store: wrapped data keys, wrapped node secrets, authoritative tombstones, audit anchor.

Revision ID: k0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "k0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "keystore_data_keys",
        sa.Column("user_id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("uid_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "keystore_secrets",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "keystore_tombstones",
        sa.Column("uid_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False, unique=True),
        sa.Column("erased_at", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "keystore_audit_anchor",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    for name in ("keystore_audit_anchor", "keystore_tombstones", "keystore_secrets", "keystore_data_keys"):
        op.drop_table(name)

"""Owner binding: data keys rewrapped with both ids in the wrap's AAD; tombstones and the audit
anchor get a MAC (and tombstones the KEK version of the shredded key); a MAC key is added.

Needs the KEK for stores that hold keys: run through `Store.open` (it passes the KEK in), never
from a bare `alembic` command. The contexts are frozen here as they were at this revision.

Revision ID: k0002
Revises: k0001
"""

import os

import sqlalchemy as sa
from alembic import op

from privacy import RecordMac, WrappedKey

revision = "k0002"
down_revision = "k0001"
branch_labels = None
depends_on = None

MAC_KEY = "record-mac-key"


def _v1_context(user_id: int) -> bytes:
    return b"data-key|user=%d" % user_id


def _v2_context(user_id: int, uid_hash: str) -> bytes:
    return b"data-key|v2|user=%d|uid=%s" % (user_id, uid_hash.encode())


def upgrade() -> None:
    with op.batch_alter_table("keystore_tombstones") as b:
        b.add_column(sa.Column("kek_version", sa.Integer(), nullable=True))
        b.add_column(sa.Column("mac", sa.String(64), nullable=True))
    with op.batch_alter_table("keystore_audit_anchor") as b:
        b.add_column(sa.Column("prior_seq", sa.BigInteger(), nullable=True))
        b.add_column(sa.Column("prior_hash", sa.String(64), nullable=True))
        b.add_column(sa.Column("mac", sa.String(64), nullable=True))
    conn = op.get_bind()
    keys = sa.table(
        "keystore_data_keys",
        sa.column("user_id"),
        sa.column("uid_hash"),
        sa.column("kek_version"),
        sa.column("wrapped"),
    )
    secrets = sa.table(
        "keystore_secrets", sa.column("name"), sa.column("kek_version"), sa.column("wrapped")
    )
    tombs = sa.table(
        "keystore_tombstones",
        sa.column("uid_hash"),
        sa.column("user_id"),
        sa.column("version"),
        sa.column("erased_at"),
        sa.column("kek_version"),
        sa.column("mac"),
    )
    anchor = sa.table(
        "keystore_audit_anchor",
        sa.column("id"),
        sa.column("seq"),
        sa.column("entry_hash"),
        sa.column("prior_seq"),
        sa.column("prior_hash"),
        sa.column("mac"),
    )
    if conn.execute(sa.select(sa.func.count()).select_from(secrets)).scalar_one():
        kek = op.get_context().config.attributes.get("kek")
        if kek is None:
            raise RuntimeError(
                "this key store predates owner binding and needs its KEK to upgrade: open it with userllm"
            )
        for r in conn.execute(
            sa.select(keys.c.user_id, keys.c.uid_hash, keys.c.kek_version, keys.c.wrapped)
        ).all():
            key = kek.unwrap(WrappedKey(r.kek_version, r.wrapped), _v1_context(r.user_id))
            w = kek.wrap(key, _v2_context(r.user_id, r.uid_hash))
            conn.execute(
                keys.update()
                .where(keys.c.user_id == r.user_id)
                .values(kek_version=w.kek_version, wrapped=w.blob)
            )
        mac_key = os.urandom(32)
        w = kek.wrap(mac_key, b"secret|" + MAC_KEY.encode())
        conn.execute(
            secrets.insert().values(name=MAC_KEY, kek_version=w.kek_version, wrapped=w.blob)
        )
        mac = RecordMac(mac_key)
        # The shredded keys' KEK versions were not recorded: assume the current one (the
        # backup warning then holds until the next `rotate-kek --remove-old`).
        kv = kek.current_version()
        for t in conn.execute(
            sa.select(tombs.c.uid_hash, tombs.c.user_id, tombs.c.version, tombs.c.erased_at)
        ).all():
            tag = mac.tag("tombstone", t.uid_hash, t.user_id, t.version, t.erased_at, kv)
            conn.execute(
                tombs.update().where(tombs.c.uid_hash == t.uid_hash).values(kek_version=kv, mac=tag)
            )
        for a in conn.execute(sa.select(anchor.c.id, anchor.c.seq, anchor.c.entry_hash)).all():
            tag = mac.tag("audit-anchor", a.seq, a.entry_hash, a.seq, a.entry_hash)
            conn.execute(
                anchor.update()
                .where(anchor.c.id == a.id)
                .values(prior_seq=a.seq, prior_hash=a.entry_hash, mac=tag)
            )
    with op.batch_alter_table("keystore_tombstones") as b:
        b.alter_column("kek_version", existing_type=sa.Integer(), nullable=False)
        b.alter_column("mac", existing_type=sa.String(64), nullable=False)
    with op.batch_alter_table("keystore_audit_anchor") as b:
        b.alter_column("prior_seq", existing_type=sa.BigInteger(), nullable=False)
        b.alter_column("prior_hash", existing_type=sa.String(64), nullable=False)
        b.alter_column("mac", existing_type=sa.String(64), nullable=False)


def downgrade() -> None:
    raise NotImplementedError(
        "owner binding is not reversible: restore the pre-upgrade backup instead"
    )

"""Per-user event identity and owner binding: events are unique per (user, event id) (primary
key (user_id, id); the separate user index goes, the key's prefix serves it); every personal
field is resealed with AAD naming its owner's keyed id; tombstone copies get their MAC.

Needs the upgraded key store for stores that hold users: run through `Store.open` (it passes the
key store in). Rows of users without a key (erased, from a restored backup) are copied as they
are: they are noise, and restore-check removes them.

Revision ID: d0002
Revises: d0001
"""

import sqlalchemy as sa
from alembic import op

from privacy import associated_data, owner_aad

revision = "d0002"
down_revision = "d0001"
branch_labels = None
depends_on = None


def _resealer(keys, uid: int, uid_hash: str):  # noqa: ANN001, ANN202
    key = keys.user_key(uid_hash, user_id=uid)
    if key is None:
        return None

    def reseal(sealed: bytes, table: str, column: str, row: str) -> bytes:
        plain = key.cipher.open(
            sealed, associated_data(table, column, uid, row), where=f"{table}.{column}"
        )
        return key.cipher.seal(plain, owner_aad(table, column, uid, uid_hash, row))

    return reseal


def upgrade() -> None:
    conn = op.get_bind()
    keys = op.get_context().config.attributes.get("keystore")
    users = sa.table(
        "users", sa.column("id"), sa.column("uid_hash"), sa.column("external_id_sealed")
    )
    old_events = sa.table("events", sa.column("id"), sa.column("user_id"), sa.column("payload"))
    embeddings = sa.table(
        "embeddings", sa.column("user_id"), sa.column("encoder_version"), sa.column("vector")
    )
    tombs = sa.table(
        "tombstones",
        sa.column("uid_hash"),
        sa.column("user_id"),
        sa.column("version"),
        sa.column("erased_at"),
        sa.column("kek_version"),
        sa.column("mac"),
    )
    all_users = conn.execute(
        sa.select(users.c.id, users.c.uid_hash, users.c.external_id_sealed)
    ).all()
    has_tombs = conn.execute(sa.select(sa.func.count()).select_from(tombs)).scalar_one()
    if (all_users or has_tombs) and keys is None:
        raise RuntimeError(
            "this data database predates owner binding and needs its key store to upgrade: open it with userllm"
        )

    op.create_table(
        "events_v2",
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id"), primary_key=True),
        sa.Column("id", sa.LargeBinary(), primary_key=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
    )
    new_events = sa.table("events_v2", sa.column("user_id"), sa.column("id"), sa.column("payload"))
    for uid, uid_hash, sealed in all_users:
        reseal = _resealer(keys, uid, uid_hash)
        rows = conn.execute(
            sa.select(old_events.c.id, old_events.c.payload).where(old_events.c.user_id == uid)
        ).all()
        if reseal is not None:
            rows = [(rid, reseal(p, "events", "payload", rid.hex())) for rid, p in rows]
            conn.execute(
                users.update()
                .where(users.c.id == uid)
                .values(external_id_sealed=reseal(sealed, "users", "external_id_sealed", str(uid)))
            )
            for version, vec in conn.execute(
                sa.select(embeddings.c.encoder_version, embeddings.c.vector).where(
                    embeddings.c.user_id == uid
                )
            ).all():
                resealed = reseal(vec, "embeddings", "vector", f"{uid}.{version}")
                conn.execute(
                    embeddings.update()
                    .where(embeddings.c.user_id == uid, embeddings.c.encoder_version == version)
                    .values(vector=resealed)
                )
        if rows:
            conn.execute(
                new_events.insert(), [{"user_id": uid, "id": rid, "payload": p} for rid, p in rows]
            )
    op.drop_index("ix_events_user_id", table_name="events")
    op.drop_table("events")
    op.rename_table("events_v2", "events")
    if conn.dialect.name == "postgresql":
        op.execute("ALTER TABLE events RENAME CONSTRAINT events_v2_pkey TO events_pkey")
        op.execute(
            "ALTER TABLE events RENAME CONSTRAINT events_v2_user_id_fkey TO events_user_id_fkey"
        )

    with op.batch_alter_table("tombstones") as b:
        b.add_column(sa.Column("kek_version", sa.Integer(), nullable=True))
        b.add_column(sa.Column("mac", sa.String(64), nullable=True))
    if has_tombs:
        authoritative = keys.tombstones()
        kv = keys.kek.current_version()
        for t in conn.execute(
            sa.select(tombs.c.uid_hash, tombs.c.user_id, tombs.c.version, tombs.c.erased_at)
        ).all():
            k = authoritative.get(t.uid_hash)
            version = k.kek_version if k is not None else kv
            tag = keys.mac.tag("tombstone", t.uid_hash, t.user_id, t.version, t.erased_at, version)
            conn.execute(
                tombs.update()
                .where(tombs.c.uid_hash == t.uid_hash)
                .values(kek_version=version, mac=tag)
            )
    with op.batch_alter_table("tombstones") as b:
        b.alter_column("kek_version", existing_type=sa.Integer(), nullable=False)
        b.alter_column("mac", existing_type=sa.String(64), nullable=False)


def downgrade() -> None:
    raise NotImplementedError(
        "owner binding is not reversible: restore the pre-upgrade backup instead"
    )

"""Pieces shared by erasure and restore-check: what is left of a user, chunked row deletion,
the data database's tombstone copy."""

from __future__ import annotations

from sqlalchemy import delete, func, or_, select

from store.db import batch_pause
from store.keystore import Tombstone, tombstone_row
from store.models import EmbeddingRow, EventRow, Tombstone as DataTombstone, User

STEPS = ("tombstone", "data_key", "events", "embeddings", "index", "artefacts", "user_row")


def remaining(store, uid_hash: str, user_id: int | None) -> dict[str, int]:  # noqa: ANN001
    """What is left of a user, by either id, in every store (all zero after a completed erasure)."""
    out = {"users": 0, "events": 0, "embeddings": 0, "index": 0, "data_key": 0, "artefacts": 0}
    with store.data.connect() as conn:
        named = (
            User.uid_hash == uid_hash
            if user_id is None
            else or_(User.uid_hash == uid_hash, User.id == user_id)
        )
        out["users"] = conn.execute(
            select(func.count()).select_from(User).where(named)
        ).scalar_one()
        if user_id is not None:
            for name, model in (("events", EventRow), ("embeddings", EmbeddingRow)):
                out[name] = conn.execute(
                    select(func.count()).select_from(model).where(model.user_id == user_id)
                ).scalar_one()
    if user_id is not None:
        out["index"] = store.index.count_of(user_id)
    out["data_key"] = store.keys.key_rows(user_id, uid_hash)
    out["artefacts"] = int(store.artefact_dir(uid_hash).exists())
    return out


def delete_rows(store, step: str, uid: int, batch_size: int, on_progress) -> int:  # noqa: ANN001
    """Delete the user's rows of one table (by the authenticated internal id only), at most
    batch_size per transaction."""
    if step == "user_row":
        with store.data.begin() as conn:
            return conn.execute(delete(User).where(User.id == uid)).rowcount
    model, key_col = (
        (EventRow, EventRow.id)
        if step == "events"
        else (EmbeddingRow, EmbeddingRow.encoder_version)
    )
    total = 0
    while True:
        chunk = select(key_col).where(model.user_id == uid).limit(batch_size).scalar_subquery()
        with store.data.begin() as conn:
            n = conn.execute(delete(model).where(model.user_id == uid, key_col.in_(chunk))).rowcount
            if n:
                batch_pause()  # tests only: a kill lands inside this chunk's transaction
        total += n
        if n < batch_size:
            return total
        if on_progress:
            on_progress(f"{model.__tablename__}-chunk", total)


def write_data_tombstone(store, t: Tombstone) -> bool:  # noqa: ANN001
    """Copy a tombstone into the data database (with its MAC) unless it is there."""
    with store.data.begin() as conn:
        if (
            conn.execute(
                select(DataTombstone.uid_hash).where(DataTombstone.uid_hash == t.uid_hash)
            ).first()
            is not None
        ):
            return False
        conn.execute(
            DataTombstone.__table__.insert().values(**tombstone_row(store.keys.mac, t))
        )
        return True


def data_tombstones(store) -> tuple[dict[str, Tombstone], int]:  # noqa: ANN001
    """The data database's tombstone copies that authenticate, and how many do not."""
    c = DataTombstone
    good, bad = {}, 0
    with store.data.connect() as conn:
        for r in conn.execute(
            select(c.uid_hash, c.user_id, c.version, c.erased_at, c.kek_version, c.mac)
        ):
            t = Tombstone(r.uid_hash, r.user_id, r.version, r.erased_at, r.kek_version)
            if store.keys.mac.check(r.mac, "tombstone", *t.fields()):
                good[t.uid_hash] = t
            else:
                bad += 1
    return good, bad

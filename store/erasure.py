"""Erasure: one request per user, idempotent resumable steps, tombstone, audit before and after.

Steps run in this order and each is safe to repeat, so a killed run is finished by running it
again (the open request is found by the user's keyed hash):
  tombstone  - keyed hash into the key store (authoritative) and the data database; from here on
               ingest refuses the user and training excludes them
  data_key   - delete the wrapped data key: crypto-shredding, every ciphertext is now noise,
               backups included
  events, embeddings - delete rows in chunks, one transaction each
  index      - remove the vector from every FAISS file
  artefacts  - USERLLM_HOME/cache/<keyed hash>/ (per-user caches other parts may keep)
  user_row   - the users row itself
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field

from sqlalchemy import delete, func, select, update

from store.models import EmbeddingRow, ErasureRequest, EventRow, Tombstone, User
from store.store import Store, batch_pause

log = logging.getLogger("userllm.store.erasure")
STEPS = ("tombstone", "data_key", "events", "embeddings", "index", "artefacts", "user_row")


@dataclass(slots=True)
class ErasureReport:
    request_id: int
    uid_hash: str
    before: dict[str, int]
    deleted: dict[str, int] = field(default_factory=dict)
    resumed: bool = False
    already_erased: bool = False


def artefact_dir(store: Store, uid_hash: str):  # noqa: ANN201
    """Where other parts may cache per-user artefacts (Store.artefact_dir); erasure removes it."""
    return store.home / "cache" / uid_hash


def _tombstone_of(store: Store, uid_hash: str) -> tuple[int, int, int] | None:
    return store.keys.tombstones().get(uid_hash)


def resolve_user_id(store: Store, uid_hash: str) -> int | None:
    """The internal id from any place that still knows it."""
    with store.data.connect() as conn:
        for q in (
            select(User.id).where(User.uid_hash == uid_hash),
            select(ErasureRequest.user_id).where(ErasureRequest.uid_hash == uid_hash),
            select(Tombstone.user_id).where(Tombstone.uid_hash == uid_hash),
        ):
            uid = conn.execute(q.limit(1)).scalar()
            if uid is not None:
                return uid
    t = _tombstone_of(store, uid_hash)
    return t[0] if t else store.keys.find_user(uid_hash)


def remaining(store: Store, uid_hash: str, user_id: int | None) -> dict[str, int]:
    """What is left of a user in every store (all zero after a completed erasure)."""
    out = {"users": 0, "events": 0, "embeddings": 0, "index": 0, "data_key": 0, "artefacts": 0}
    with store.data.connect() as conn:
        out["users"] = conn.execute(select(func.count()).select_from(User).where(User.uid_hash == uid_hash)).scalar_one()
        if user_id is not None:
            out["users"] += conn.execute(select(func.count()).select_from(User).where(User.id == user_id, User.uid_hash != uid_hash)).scalar_one()
            out["events"] = conn.execute(select(func.count()).select_from(EventRow).where(EventRow.user_id == user_id)).scalar_one()
            out["embeddings"] = conn.execute(select(func.count()).select_from(EmbeddingRow).where(EmbeddingRow.user_id == user_id)).scalar_one()
    if user_id is not None:
        out["index"] = store.index.count_of(user_id)
    out["data_key"] = store.keys.has_key(user_id, uid_hash)
    out["artefacts"] = int(artefact_dir(store, uid_hash).exists())
    return out


def _open_request(store: Store, uid_hash: str):  # noqa: ANN202
    """(id, user_id, steps) of the unfinished request for this user, if any."""
    with store.data.connect() as conn:
        return conn.execute(
            select(ErasureRequest.id, ErasureRequest.user_id, ErasureRequest.steps)
            .where(ErasureRequest.uid_hash == uid_hash, ErasureRequest.status != "done")
            .order_by(ErasureRequest.id)
        ).first()


def delete_user(store: Store, external_id: str, batch_size: int = 10_000, on_progress=None) -> ErasureReport:  # noqa: ANN001
    """Erase one user everywhere. Unknown user: ValueError and nothing changes."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    h = store.hasher.user(external_id)
    req = _open_request(store, h)
    resumed = req is not None
    if req is None:
        uid = resolve_user_id(store, h)
        if uid is None:
            raise ValueError("unknown user: no record for this external id in any store")
        before = remaining(store, h, uid)
        if _tombstone_of(store, h) and not any(before.values()):
            return ErasureReport(0, h, before, already_erased=True)
        with store.data.begin() as conn:
            req_id = conn.execute(
                ErasureRequest.__table__.insert().values(
                    uid_hash=h, user_id=uid, status="running", steps=json.dumps({s: "pending" for s in STEPS}), created_at=int(time.time())
                )
            ).inserted_primary_key[0]
        store.audit("erasure.requested", {"request": req_id, "uid_hash": h, "counts": before})
        req = _open_request(store, h)
    else:
        before = remaining(store, h, req.user_id)
    uid, steps = req.user_id, json.loads(req.steps)
    report = ErasureReport(req.id, h, before, resumed=resumed)
    for step in STEPS:
        if steps[step] == "done":
            continue
        report.deleted[step] = _run_step(store, step, h, uid, batch_size, on_progress)
        steps[step] = "done"
        with store.data.begin() as conn:
            conn.execute(update(ErasureRequest).where(ErasureRequest.id == req.id).values(steps=json.dumps(steps)))
        if on_progress:
            on_progress(step, report.deleted[step])
    left = remaining(store, h, uid)
    if any(left.values()):
        # Rows written by an ingest that was already past its tombstone check: sweep once more.
        for step in STEPS[1:]:
            report.deleted[step] = report.deleted.get(step, 0) + _run_step(store, step, h, uid, batch_size, None)
        left = remaining(store, h, uid)
        if any(left.values()):
            raise RuntimeError(f"erasure request {req.id} is not complete ({left}); stop writers for this user and run delete-user again")
    with store.data.begin() as conn:
        conn.execute(update(ErasureRequest).where(ErasureRequest.id == req.id).values(status="done", finished_at=int(time.time())))
    store.audit("erasure.completed", {"request": req.id, "uid_hash": h, "deleted": report.deleted, "remaining": left, "resumed": resumed})
    log.info("erasure %d complete for %s…: %s", req.id, h[:12], report.deleted)
    return report


def _delete_chunked(store: Store, model, uid: int, key_col, batch_size: int, on_progress) -> int:  # noqa: ANN001
    """Delete the user's rows, at most batch_size per transaction (one statement each)."""
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


def _run_step(store: Store, step: str, h: str, uid: int, batch_size: int, on_progress) -> int:  # noqa: ANN001
    if step == "tombstone":
        version, at = store.keys.add_tombstone(h, uid)
        with store.data.begin() as conn:
            if conn.execute(select(Tombstone.uid_hash).where(Tombstone.uid_hash == h)).first() is None:
                conn.execute(Tombstone.__table__.insert().values(uid_hash=h, user_id=uid, version=version, erased_at=at))
        return 1
    if step == "data_key":
        return store.keys.shred(uid, h)
    if step == "events":
        return _delete_chunked(store, EventRow, uid, EventRow.id, batch_size, on_progress)
    if step == "embeddings":
        return _delete_chunked(store, EmbeddingRow, uid, EmbeddingRow.encoder_version, batch_size, on_progress)
    if step == "index":
        return store.index.remove_everywhere(uid)
    if step == "artefacts":
        d = artefact_dir(store, h)
        if d.exists():
            shutil.rmtree(d)
            return 1
        return 0
    if step == "user_row":
        with store.data.begin() as conn:
            return conn.execute(delete(User).where((User.id == uid) | (User.uid_hash == h))).rowcount
    raise AssertionError(step)


def verify_deleted(store: Store, external_id: str) -> tuple[bool, dict[str, int], bool]:
    """(clean, what remains per store, tombstone present)."""
    h = store.hasher.user(external_id)
    left = remaining(store, h, resolve_user_id(store, h))
    return not any(left.values()), left, _tombstone_of(store, h) is not None


def restore_check(store: Store) -> dict[str, int]:
    """After restoring a backup (of either database): re-apply every tombstone known to either
    database, and remove whatever the backup brought back for those users."""
    with store.data.connect() as conn:
        data_tombs = {r.uid_hash: (r.user_id, r.version, r.erased_at) for r in conn.execute(select(Tombstone.uid_hash, Tombstone.user_id, Tombstone.version, Tombstone.erased_at))}
    key_tombs = store.keys.tombstones()
    counts = {"tombstones": len(set(data_tombs) | set(key_tombs)), "reapplied_keys": 0, "reapplied_data": 0, "users_cleaned": 0}
    for h in sorted(set(data_tombs) | set(key_tombs)):
        uid, version, at = key_tombs.get(h) or data_tombs[h]
        counts["reapplied_keys"] += store.keys.put_tombstone(h, uid, version, at)
        if h not in data_tombs:
            with store.data.begin() as conn:
                conn.execute(Tombstone.__table__.insert().values(uid_hash=h, user_id=uid, version=version, erased_at=at))
            counts["reapplied_data"] += 1
        if any(remaining(store, h, uid).values()):
            for step in STEPS[1:]:
                _run_step(store, step, h, uid, 10_000, None)
            counts["users_cleaned"] += 1
    store.audit("restore-check", counts)
    return counts

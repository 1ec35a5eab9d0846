"""Erasure: one request per user, idempotent resumable steps, tombstone, audit before and after.

The user is resolved only through authenticated records: their key-store row (the wrap binds
their keyed id to their internal id) or their tombstone (MAC). Before anything changes, every
record that names them must agree with that, and (while their key exists) every row filed under
them must authenticate as theirs: a swapped mapping or a row moved in from another user stops
the erasure with an integrity error, never erases the other user.

Steps run in this order and each is safe to repeat, so a killed run is finished by running it
again (the open request is found by the user's keyed id):
  tombstone  - into the key store (authoritative, MAC) and the data database; from here on
               ingest refuses the user and training excludes them
  data_key   - delete the wrapped data key: crypto-shredding, every ciphertext is now noise
  events, embeddings - delete rows in chunks, one transaction each
  index      - remove the vector from every FAISS file
  artefacts  - USERLLM_HOME/cache/<keyed id>/ (per-user caches other parts may keep)
  user_row   - the users row itself
Then the storage layer is compacted (Store.compact_after_erasure).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field

from sqlalchemy import func, select, update

from privacy import DecryptionError, owner_aad
from store.errors import StoreIntegrityError
from store.erasure_steps import STEPS, delete_rows, remaining, write_data_tombstone
from store.keystore import Tombstone, UserKey
from store.models import EmbeddingRow, ErasureRequest, EventRow, Tombstone as DataTombstone, User
from store.store import Store

log = logging.getLogger("userllm.store.erasure")


@dataclass(slots=True)
class ErasureReport:
    request_id: int
    uid_hash: str
    before: dict[str, int]
    deleted: dict[str, int] = field(default_factory=dict)
    resumed: bool = False
    already_erased: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class Authenticated:
    user_id: int
    key: UserKey | None
    tombstone: Tombstone | None


def authenticate(store: Store, uid_hash: str) -> Authenticated | None:
    """The user's internal id from authenticated records only; None when nothing names them."""
    key, tomb = store.keys.user_key(uid_hash), store.keys.tombstone(uid_hash)
    if key is not None and tomb is not None and key.user_id != tomb.user_id:
        raise StoreIntegrityError(
            "this user's key and tombstone name different internal ids (the key store was altered)"
        )
    if key is not None or tomb is not None:
        return Authenticated(key.user_id if key else tomb.user_id, key, tomb)
    with store.data.connect() as conn:
        for model in (User, ErasureRequest, DataTombstone):
            if conn.execute(
                select(func.count()).select_from(model).where(model.uid_hash == uid_hash)
            ).scalar_one():
                raise StoreIntegrityError(
                    f"the data database names this user ({model.__tablename__}) but the key store holds neither their key nor their tombstone "
                    "(key store altered or older than the data); nothing was changed"
                )
    return None


def _preflight(store: Store, h: str, who: Authenticated) -> None:
    """Every record naming this user agrees with the authenticated id; while the key exists,
    every row filed under them opens as theirs. Raises before anything changes."""
    uid = who.user_id
    with store.data.connect() as conn:
        for model, id_col in (
            (User, User.id),
            (ErasureRequest, ErasureRequest.user_id),
            (DataTombstone, DataTombstone.user_id),
        ):
            for rid, rh in conn.execute(
                select(id_col, model.uid_hash).where((model.uid_hash == h) | (id_col == uid))
            ):
                if (rid, rh) != (uid, h):
                    raise StoreIntegrityError(
                        f"a {model.__tablename__} row maps this user to another internal id or keyed id (altered); nothing was changed"
                    )
        if who.key is None:
            return
        k, aad = who.key, store.event_aad
        try:
            for rid, payload in conn.execute(
                select(EventRow.id, EventRow.payload).where(EventRow.user_id == uid)
            ):
                k.cipher.open(payload, aad(uid, h, rid.hex()))
            for version, vec in conn.execute(
                select(EmbeddingRow.encoder_version, EmbeddingRow.vector).where(
                    EmbeddingRow.user_id == uid
                )
            ):
                k.cipher.open(vec, owner_aad("embeddings", "vector", uid, h, f"{uid}.{version}"))
        except DecryptionError:
            raise StoreIntegrityError(
                "a row filed under this user does not authenticate as theirs (moved from another user, or altered); nothing was changed"
            ) from None


def _open_request(store: Store, uid_hash: str):  # noqa: ANN202
    """(id, user_id, steps) of the unfinished request for this user, if any."""
    with store.data.connect() as conn:
        return conn.execute(
            select(ErasureRequest.id, ErasureRequest.user_id, ErasureRequest.steps)
            .where(ErasureRequest.uid_hash == uid_hash, ErasureRequest.status != "done")
            .order_by(ErasureRequest.id)
        ).first()


def _insert_request(store: Store, h: str, uid: int, before: dict[str, int]) -> int:
    with store.data.begin() as conn:
        steps = json.dumps({s: "pending" for s in STEPS})
        values = dict(
            uid_hash=h, user_id=uid, status="running", steps=steps, created_at=int(time.time())
        )
        req_id = conn.execute(
            ErasureRequest.__table__.insert().values(**values)
        ).inserted_primary_key[0]
    store.audit("erasure.requested", {"request": req_id, "uid_hash": h, "counts": before})
    return req_id


def request_erasure(store: Store, external_id: str) -> tuple[int, bool]:
    """Open (or find) the erasure request for a user without running it: (request id, already
    erased). The caller then runs `delete_user`, which continues this request; until then the
    request is listed as running. Unknown user: ValueError and nothing changes."""
    h = store.hasher.user(external_id)
    who = authenticate(store, h)
    if who is None:
        raise ValueError("unknown user: no record for this external id in any store")
    _preflight(store, h, who)
    req = _open_request(store, h)
    if req is not None:
        return req.id, False
    before = remaining(store, h, who.user_id)
    if who.tombstone is not None and not any(before.values()):
        with store.data.connect() as conn:
            last = conn.execute(
                select(func.max(ErasureRequest.id)).where(ErasureRequest.uid_hash == h)
            ).scalar()
        return int(last or 0), True
    return _insert_request(store, h, who.user_id, before), False


def erasure_status(store: Store, request_id: int) -> dict | None:
    """A request's state for operators: status, steps, times and the keyed id's first 16
    characters (never the external id); None when there is no such request."""
    with store.data.connect() as conn:
        r = conn.execute(
            select(*ErasureRequest.__table__.c).where(ErasureRequest.id == request_id)
        ).first()
    if r is None:
        return None
    return {
        "request_id": r.id,
        "status": r.status,
        "steps": json.loads(r.steps),
        "keyed_id_prefix": r.uid_hash[:16],
        "created_at": r.created_at,
        "finished_at": r.finished_at,
    }


def delete_user(
    store: Store,
    external_id: str,
    batch_size: int = 10_000,
    on_progress=None,
    compact: bool = False,
) -> ErasureReport:  # noqa: ANN001
    """Erase one user everywhere. Unknown user: ValueError and nothing changes."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    h = store.hasher.user(external_id)
    who = authenticate(store, h)
    if who is None:
        raise ValueError("unknown user: no record for this external id in any store")
    _preflight(store, h, who)
    uid = who.user_id
    req = _open_request(store, h)
    # Resumed: an earlier run got past at least one step (a request opened by request_erasure
    # and run here for the first time is not a resumption).
    resumed = req is not None and "done" in json.loads(req.steps).values()
    before = remaining(store, h, uid)
    if req is None:
        if who.tombstone is not None and not any(before.values()):
            return ErasureReport(0, h, before, already_erased=True)
        _insert_request(store, h, uid, before)
        req = _open_request(store, h)
    steps = json.loads(req.steps)
    kek_version = (
        who.key.kek_version
        if who.key
        else (who.tombstone.kek_version if who.tombstone else store.keys.kek.current_version())
    )
    report = ErasureReport(req.id, h, before, resumed=resumed)
    for step in STEPS:
        if steps[step] == "done":
            continue
        report.deleted[step] = _run_step(store, step, h, uid, kek_version, batch_size, on_progress)
        steps[step] = "done"
        with store.data.begin() as conn:
            conn.execute(
                update(ErasureRequest)
                .where(ErasureRequest.id == req.id)
                .values(steps=json.dumps(steps))
            )
        if on_progress:
            on_progress(step, report.deleted[step])
    left = remaining(store, h, uid)
    if any(left.values()):
        # Rows written by an ingest that was already past its tombstone check: sweep once more.
        for step in STEPS[1:]:
            report.deleted[step] = report.deleted.get(step, 0) + _run_step(
                store, step, h, uid, kek_version, batch_size, None
            )
        left = remaining(store, h, uid)
        if any(left.values()):
            raise RuntimeError(
                f"erasure request {req.id} is not complete ({left}); stop writers for this user and run delete-user again"
            )
    with store.data.begin() as conn:
        conn.execute(
            update(ErasureRequest)
            .where(ErasureRequest.id == req.id)
            .values(status="done", finished_at=int(time.time()))
        )
    store.audit(
        "erasure.completed",
        {
            "request": req.id,
            "uid_hash": h,
            "deleted": report.deleted,
            "remaining": left,
            "resumed": resumed,
        },
    )
    report.notes = store.compact_after_erasure(
        full=compact
    )  # last: no later write re-fills the WAL
    log.info("erasure %d complete for %s…: %s", req.id, h[:12], report.deleted)
    return report


def _run_step(
    store: Store, step: str, h: str, uid: int, kek_version: int, batch_size: int, on_progress
) -> int:  # noqa: ANN001
    if step == "tombstone":
        write_data_tombstone(store, store.keys.add_tombstone(h, uid, kek_version))
        return 1
    if step == "data_key":
        return store.keys.shred(uid)
    if step in ("events", "embeddings", "user_row"):
        return delete_rows(store, step, uid, batch_size, on_progress)
    if step == "index":
        return store.index.remove_everywhere(uid)
    if step == "artefacts":
        d = store.artefact_dir(h)
        if d.exists():
            shutil.rmtree(d)
            return 1
        return 0
    raise ValueError(f"unknown erasure step {step}")


@dataclass(slots=True)
class Verification:
    clean: bool
    remaining: dict[str, int]
    tombstone: bool
    known: (
        bool  # False: no authenticated record of this user at all (never stored, or not verifiable)
    )


def verify_deleted(store: Store, external_id: str) -> Verification:
    """Clean only when an authenticated tombstone exists, the key is gone, and nothing is filed
    under the user's authenticated internal id or keyed id anywhere."""
    h = store.hasher.user(external_id)
    who = authenticate(store, h)
    if who is None:
        return Verification(False, remaining(store, h, None), False, False)
    _preflight(store, h, Authenticated(who.user_id, None, who.tombstone))
    left = remaining(store, h, who.user_id)
    clean = who.tombstone is not None and who.key is None and not any(left.values())
    return Verification(clean, left, who.tombstone is not None, True)

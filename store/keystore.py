"""The key store: per-user data keys and node secrets, only ever stored wrapped by the KEK.

Each user gets a fresh random AES-256 data key on first write. The wrap's AAD names both the
user's internal id and keyed id, so the key-store row *authenticates* the mapping from a user to
their id and key: a row moved to another user, or a keyed id swapped between rows, fails to
unwrap. Deleting the wrapped key is crypto-shredding: every ciphertext of that user becomes noise.
Tombstones and the audit anchor carry a MAC under a node secret, so edits to them are seen.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from privacy import (
    DataKeyCipher,
    DecryptionError,
    KekProvider,
    KeyedHasher,
    RecordMac,
    WrappedKey,
    new_data_key,
)
from store.db import batch_pause
from store.errors import StoreIntegrityError, StoreStateError
from store.keystore_models import AuditAnchor, DataKey, KeyTombstone, Secret

PEPPER = "keyed-hash-pepper"  # keyed ids; must outlive every KEK rotation
INDEX_KEY = "index-file-key"  # seals FAISS files at rest
MAC_KEY = "record-mac-key"  # MACs of tombstones and the audit anchor
NODE_SECRETS = (PEPPER, INDEX_KEY, MAC_KEY)
SQL_IN_CHUNK = 900  # stay under every backend's bound-parameter limit


def data_key_context(user_id: int, uid_hash: str) -> bytes:
    return b"data-key|v2|user=%d|uid=%s" % (user_id, uid_hash.encode())


def secret_context(name: str) -> bytes:
    return b"secret|" + name.encode()


@dataclass(slots=True, frozen=True)
class UserKey:
    """A user's authenticated identity: internal id, keyed id, and their unwrapped key."""

    user_id: int
    uid_hash: str
    cipher: DataKeyCipher
    kek_version: int


@dataclass(slots=True, frozen=True)
class Tombstone:
    uid_hash: str
    user_id: int
    version: int
    erased_at: int
    kek_version: int

    def fields(self) -> tuple:
        return (self.uid_hash, self.user_id, self.version, self.erased_at, self.kek_version)


def tombstone_mac(mac: RecordMac, t: Tombstone) -> str:
    return mac.tag("tombstone", *t.fields())


def tombstone_row(mac: RecordMac, t: Tombstone) -> dict:
    """The columns of a tombstone row, MAC included (the key store's and the data store's
    tombstone tables share them)."""
    return dict(uid_hash=t.uid_hash, user_id=t.user_id, version=t.version,
                erased_at=t.erased_at, kek_version=t.kek_version, mac=tombstone_mac(mac, t))


class KeyStore:
    def __init__(self, engine: Engine, kek: KekProvider, create: bool = False):
        self.engine = engine
        self.kek = kek
        self._keys: dict[str, UserKey] = {}  # uid_hash -> unwrapped key, this process only
        got = {name: self._secret(name, create) for name in NODE_SECRETS}
        self.hasher = KeyedHasher(got[PEPPER])
        self.index_key = got[INDEX_KEY]
        self.mac = RecordMac(got[MAC_KEY])

    # -- node secrets -------------------------------------------------------------------------
    def _secret(self, name: str, create: bool) -> bytes:
        """A node secret; created (random, wrapped) only for a new store."""
        for _ in range(3):
            with self.engine.connect() as conn:
                row = conn.execute(
                    select(Secret.kek_version, Secret.wrapped).where(Secret.name == name)
                ).first()
            if row is not None:
                try:
                    return self.kek.unwrap(
                        WrappedKey(row.kek_version, row.wrapped), secret_context(name)
                    )
                except DecryptionError as err:
                    raise StoreStateError(
                        f"the KEK does not open the key store's {name} ({err}); is this the KEK of this store?"
                    ) from None
            if not create:
                raise StoreIntegrityError(
                    f"the key store lacks its {name}: it was altered or is not this store's; restore keys.db from a backup"
                )
            w = self.kek.wrap(os.urandom(32), secret_context(name))
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        Secret.__table__.insert().values(
                            name=name, kek_version=w.kek_version, wrapped=w.blob
                        )
                    )
            except IntegrityError:
                pass  # another process made it first: read theirs
        raise StoreStateError(f"could not create the node secret {name}")

    # -- per-user data keys -------------------------------------------------------------------
    def _unwrap(self, user_id: int, uid_hash: str, kek_version: int, wrapped: bytes) -> UserKey:
        try:
            key = self.kek.unwrap(
                WrappedKey(kek_version, wrapped), data_key_context(user_id, uid_hash)
            )
        except DecryptionError:
            raise StoreIntegrityError(
                "a key-store entry does not authenticate for the user it is looked up for (moved, swapped or altered); nothing was read or changed"
            ) from None
        return UserKey(user_id, uid_hash, DataKeyCipher(key), kek_version)

    def user_keys(self, uid_hashes: list[str]) -> dict[str, UserKey]:
        """Authenticated keys of the users that have one (erased and unknown users are absent)."""
        out = {h: self._keys[h] for h in uid_hashes if h in self._keys}
        missing = [h for h in uid_hashes if h not in out]
        if not missing:  # the read path's common case: no connection checked out for nothing
            return out
        with self.engine.connect() as conn:
            for i in range(0, len(missing), SQL_IN_CHUNK):
                q = select(DataKey.user_id, DataKey.uid_hash, DataKey.kek_version, DataKey.wrapped)
                for r in conn.execute(q.where(DataKey.uid_hash.in_(missing[i : i + SQL_IN_CHUNK]))):
                    out[r.uid_hash] = self._keys[r.uid_hash] = self._unwrap(
                        r.user_id, r.uid_hash, r.kek_version, r.wrapped
                    )
        return out

    def user_key(self, uid_hash: str, user_id: int | None = None) -> UserKey | None:
        """The user's authenticated key (None when they have none). With `user_id`, also
        checks that this internal id is theirs: a mapping taken from the data database is
        trusted only once its key row agrees and unwraps."""
        key = self.user_keys([uid_hash]).get(uid_hash)
        if key is None and user_id is not None:
            with self.engine.connect() as conn:
                other = conn.execute(
                    select(DataKey.uid_hash).where(DataKey.user_id == user_id)
                ).scalar()
            if other is not None:
                raise StoreIntegrityError(
                    "a user row names a key that belongs to another keyed id (the mapping was altered); nothing was read or changed"
                )
        if key is not None and user_id is not None and key.user_id != user_id:
            raise StoreIntegrityError(
                "a user row's internal id differs from the one its key authenticates (the mapping was altered); nothing was read or changed"
            )
        return key

    def get_or_create_many(self, uid_hashes: list[str]) -> dict[str, UserKey]:
        """Authenticated keys for these users, creating id and key for new ones. Committed here,
        before any data write, so a crash never leaves data under a key that was not saved."""
        for _ in range(3):
            found = self.user_keys(uid_hashes)
            missing = [h for h in uid_hashes if h not in found]
            if not missing:
                return found
            rows, made, now = [], {}, int(time.time())
            for h in missing:
                uid, key = (
                    secrets.randbits(62) or 1,
                    new_data_key(),
                )  # fits int64 (FAISS ids, BIGINT)
                w = self.kek.wrap(key, data_key_context(uid, h))
                rows.append(
                    {
                        "user_id": uid,
                        "uid_hash": h,
                        "kek_version": w.kek_version,
                        "wrapped": w.blob,
                        "created_at": now,
                    }
                )
                made[h] = UserKey(uid, h, DataKeyCipher(key), w.kek_version)
            try:
                with self.engine.begin() as conn:
                    conn.execute(DataKey.__table__.insert(), rows)
            except IntegrityError:
                continue  # a concurrent writer made some of them, or an id collided: look again
            self._keys.update(made)
            found.update(made)
            return found
        raise StoreStateError(
            "could not allocate user ids (concurrent writers kept colliding); retry"
        )

    def shred(self, user_id: int) -> int:
        """Delete the user's wrapped key (by the authenticated internal id only)."""
        self._keys = {h: k for h, k in self._keys.items() if k.user_id != user_id}
        with self.engine.begin() as conn:
            return conn.execute(delete(DataKey).where(DataKey.user_id == user_id)).rowcount

    def key_rows(self, user_id: int | None, uid_hash: str) -> int:
        """Key rows naming this user by either id (verify-deleted)."""
        cond = (
            DataKey.uid_hash == uid_hash
            if user_id is None
            else or_(DataKey.uid_hash == uid_hash, DataKey.user_id == user_id)
        )
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(DataKey).where(cond)).scalar_one()

    # -- KEK rotation -------------------------------------------------------------------------
    def rewrap_all(
        self, batch: int = 500, on_batch: Callable[[int], None] | None = None
    ) -> dict[str, int]:
        """Rewrap every data key and secret not at the current KEK version, one transaction per
        batch. Record ciphertexts are untouched (data keys do not change). Resumable: a re-run
        skips keys already at the current version, so each key is rewrapped exactly once."""
        target = self.kek.current_version()
        counts = {"data_keys": 0, "secrets": 0}
        while True:
            with self.engine.begin() as conn:
                q = select(DataKey.user_id, DataKey.uid_hash, DataKey.kek_version, DataKey.wrapped)
                rows = conn.execute(
                    q.where(DataKey.kek_version != target).order_by(DataKey.user_id).limit(batch)
                ).all()
                for r in rows:
                    ctx = data_key_context(r.user_id, r.uid_hash)
                    try:
                        key = self.kek.unwrap(WrappedKey(r.kek_version, r.wrapped), ctx)
                    except DecryptionError:
                        raise StoreIntegrityError(
                            "a key-store entry does not authenticate (altered or moved); rotation stopped, nothing in this batch changed"
                        ) from None
                    w = self.kek.wrap(key, ctx)
                    conn.execute(
                        update(DataKey)
                        .where(DataKey.user_id == r.user_id)
                        .values(kek_version=w.kek_version, wrapped=w.blob)
                    )
                if rows:
                    batch_pause()  # tests only: a kill lands inside this batch's transaction
            counts["data_keys"] += len(rows)
            if rows and on_batch:
                on_batch(counts["data_keys"])
            if len(rows) < batch:
                break
        with self.engine.begin() as conn:
            for r in conn.execute(
                select(Secret.name, Secret.kek_version, Secret.wrapped).where(
                    Secret.kek_version != target
                )
            ).all():
                ctx = secret_context(r.name)
                w = self.kek.wrap(self.kek.unwrap(WrappedKey(r.kek_version, r.wrapped), ctx), ctx)
                conn.execute(
                    update(Secret)
                    .where(Secret.name == r.name)
                    .values(kek_version=w.kek_version, wrapped=w.blob)
                )
                counts["secrets"] += 1
        self._keys.clear()
        return counts

    def kek_versions_in_use(self) -> dict[int, int]:
        with self.engine.connect() as conn:
            out: dict[int, int] = {}
            for model in (DataKey, Secret):
                for v, n in conn.execute(
                    select(model.kek_version, func.count()).group_by(model.kek_version)
                ).all():
                    out[v] = out.get(v, 0) + n
            return out

    # -- tombstones (authoritative copy) ------------------------------------------------------
    def _verified(self, rows) -> dict[str, Tombstone]:  # noqa: ANN001
        out = {}
        for r in rows:
            t = Tombstone(r.uid_hash, r.user_id, r.version, r.erased_at, r.kek_version)
            if not self.mac.check(r.mac, "tombstone", *t.fields()):
                raise StoreIntegrityError(
                    "a key-store tombstone does not authenticate (edited outside userllm); run `userllm admin audit-verify` and restore keys.db"
                )
            out[t.uid_hash] = t
        return out

    def _tombstone_rows(self):  # noqa: ANN202
        c = KeyTombstone
        return select(c.uid_hash, c.user_id, c.version, c.erased_at, c.kek_version, c.mac)

    def tombstones(self) -> dict[str, Tombstone]:
        with self.engine.connect() as conn:
            return self._verified(conn.execute(self._tombstone_rows()).all())

    def tombstone(self, uid_hash: str) -> Tombstone | None:
        return self.tombstoned_among([uid_hash]).get(uid_hash)

    def tombstoned_among(self, uid_hashes: list[str]) -> dict[str, Tombstone]:
        out: dict[str, Tombstone] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(uid_hashes), SQL_IN_CHUNK):
                q = self._tombstone_rows().where(
                    KeyTombstone.uid_hash.in_(uid_hashes[i : i + SQL_IN_CHUNK])
                )
                out.update(self._verified(conn.execute(q).all()))
        return out

    def add_tombstone(self, uid_hash: str, user_id: int, kek_version: int) -> Tombstone:
        """The user's tombstone, creating it once (idempotent)."""
        for _ in range(5):
            found = self.tombstone(uid_hash)
            if found is not None:
                return found
            try:
                with self.engine.begin() as conn:
                    version = (
                        conn.execute(select(func.max(KeyTombstone.version))).scalar() or 0
                    ) + 1
                    return self._insert_tombstone(
                        conn, Tombstone(uid_hash, user_id, version, int(time.time()), kek_version)
                    )
            except IntegrityError:
                continue  # a concurrent erasure took this version number; try the next
        raise StoreStateError(
            "could not write the tombstone (concurrent erasures); run delete-user again"
        )

    def _insert_tombstone(self, conn, t: Tombstone) -> Tombstone:  # noqa: ANN001
        conn.execute(
            KeyTombstone.__table__.insert().values(**tombstone_row(self.mac, t))
        )
        return t

    def put_tombstone(self, t: Tombstone) -> bool:
        """Re-apply a (verified) tombstone known elsewhere (restore-check). True when it was missing."""
        with self.engine.begin() as conn:
            if conn.execute(
                select(KeyTombstone.uid_hash).where(KeyTombstone.uid_hash == t.uid_hash)
            ).first():
                return False
            if conn.execute(
                select(KeyTombstone.uid_hash).where(KeyTombstone.version == t.version)
            ).first():
                version = (conn.execute(select(func.max(KeyTombstone.version))).scalar() or 0) + 1
                t = Tombstone(t.uid_hash, t.user_id, version, t.erased_at, t.kek_version)
            self._insert_tombstone(conn, t)
            return True

    # -- audit anchor -------------------------------------------------------------------------
    def audit_anchor(self) -> tuple[tuple[int, str], tuple[int, str]] | None:
        """((prior seq, hash), (latest seq, hash)), verified; None before the first entry."""
        with self.engine.connect() as conn:
            r = conn.execute(select(*AuditAnchor.__table__.c).where(AuditAnchor.id == 1)).first()
        if r is None:
            return None
        if not self.mac.check(
            r.mac, "audit-anchor", r.prior_seq, r.prior_hash, r.seq, r.entry_hash
        ):
            raise StoreIntegrityError(
                "the key store's audit anchor does not authenticate (edited outside userllm)"
            )
        return (r.prior_seq, r.prior_hash), (r.seq, r.entry_hash)

    def set_audit_anchor(self, prior: tuple[int, str], latest: tuple[int, str]) -> None:
        values = dict(prior_seq=prior[0], prior_hash=prior[1], seq=latest[0], entry_hash=latest[1])
        values["mac"] = self.mac.tag("audit-anchor", prior[0], prior[1], latest[0], latest[1])
        with self.engine.begin() as conn:
            if (
                conn.execute(
                    update(AuditAnchor).where(AuditAnchor.id == 1).values(**values)
                ).rowcount
                == 0
            ):
                conn.execute(AuditAnchor.__table__.insert().values(id=1, **values))

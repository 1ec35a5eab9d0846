"""The key store: per-user data keys and node secrets, only ever stored wrapped by the KEK.

Each user gets a fresh random AES-256 data key on first write (never shared: the wrap is bound
to the user's internal id, so a wrapped key copied to another user fails to unwrap). Deleting the
wrapped key is crypto-shredding: every ciphertext of that user becomes noise, backups included.
"""
from __future__ import annotations

import os
import secrets
import time

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError

from privacy import DataKeyCipher, KekProvider, KeyedHasher, WrappedKey, new_data_key
from store.keystore_models import AuditAnchor, DataKey, KeyTombstone, Secret

PEPPER = "keyed-hash-pepper"  # HMAC key for keyed hashes; must outlive every KEK rotation
INDEX_KEY = "index-file-key"  # seals FAISS files at rest


def _data_key_context(user_id: int) -> bytes:
    return b"data-key|user=%d" % user_id


def _secret_context(name: str) -> bytes:
    return b"secret|" + name.encode()


class KeyStore:
    def __init__(self, engine: Engine, kek: KekProvider):
        self.engine = engine
        self.kek = kek
        self._ciphers: dict[int, DataKeyCipher] = {}  # unwrapped keys, this process only
        self.hasher = KeyedHasher(self.secret(PEPPER))

    # -- node secrets -------------------------------------------------------------------------
    def secret(self, name: str) -> bytes:
        """Get a node secret, creating it (random, wrapped) the first time."""
        for _ in range(3):
            with self.engine.connect() as conn:
                row = conn.execute(select(Secret.kek_version, Secret.wrapped).where(Secret.name == name)).first()
            if row is not None:
                return self.kek.unwrap(WrappedKey(row.kek_version, row.wrapped), _secret_context(name))
            value = os.urandom(32)
            w = self.kek.wrap(value, _secret_context(name))
            try:
                with self.engine.begin() as conn:
                    conn.execute(Secret.__table__.insert().values(name=name, kek_version=w.kek_version, wrapped=w.blob))
                return value
            except IntegrityError:
                continue  # another process made it first: read theirs
        raise RuntimeError(f"could not create secret {name}")

    # -- per-user data keys -------------------------------------------------------------------
    def find_user(self, uid_hash: str) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(DataKey.user_id).where(DataKey.uid_hash == uid_hash)).scalar()

    def get_or_create(self, uid_hash: str) -> int:
        """The user's internal id, creating id and data key on first sight. Committed here, before
        any data write, so a crash never leaves data under a key that was not saved."""
        user_id = self.find_user(uid_hash)
        if user_id is not None:
            return user_id
        key = new_data_key()
        for _ in range(3):
            candidate = secrets.randbits(62) or 1  # fits int64 (FAISS ids, BIGINT)
            w = self.kek.wrap(key, _data_key_context(candidate))
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        DataKey.__table__.insert().values(
                            user_id=candidate, uid_hash=uid_hash, kek_version=w.kek_version, wrapped=w.blob, created_at=int(time.time())
                        )
                    )
                self._ciphers[candidate] = DataKeyCipher(key)
                return candidate
            except IntegrityError:
                existing = self.find_user(uid_hash)
                if existing is not None:  # a concurrent writer created this user
                    return existing
        raise RuntimeError("could not allocate a user id")

    def get_or_create_many(self, uid_hashes: list[str]) -> dict[str, int]:
        """get_or_create for a batch: one lookup and one key-store transaction per batch."""
        found: dict[str, int] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(uid_hashes), 900):
                found.update(conn.execute(select(DataKey.uid_hash, DataKey.user_id).where(DataKey.uid_hash.in_(uid_hashes[i : i + 900]))).all())
        missing = [h for h in uid_hashes if h not in found]
        if not missing:
            return found
        rows, ciphers, now = [], {}, int(time.time())
        for h in missing:
            uid, key = secrets.randbits(62) or 1, new_data_key()
            w = self.kek.wrap(key, _data_key_context(uid))
            rows.append({"user_id": uid, "uid_hash": h, "kek_version": w.kek_version, "wrapped": w.blob, "created_at": now})
            ciphers[uid] = DataKeyCipher(key)
        try:
            with self.engine.begin() as conn:
                conn.execute(DataKey.__table__.insert(), rows)
        except IntegrityError:  # a concurrent writer or an id collision: fall back to one by one
            return {h: self.get_or_create(h) for h in uid_hashes}
        self._ciphers.update(ciphers)
        found.update((r["uid_hash"], r["user_id"]) for r in rows)
        return found

    def cipher(self, user_id: int) -> DataKeyCipher:
        """The user's cipher; raises LookupError when the key is gone (erased)."""
        c = self._ciphers.get(user_id)
        if c is None:
            with self.engine.connect() as conn:
                row = conn.execute(select(DataKey.kek_version, DataKey.wrapped).where(DataKey.user_id == user_id)).first()
            if row is None:
                raise LookupError("no data key for this user (erased, or the key store does not match the data)")
            c = self._ciphers[user_id] = DataKeyCipher(self.kek.unwrap(WrappedKey(row.kek_version, row.wrapped), _data_key_context(user_id)))
        return c

    def shred(self, user_id: int, uid_hash: str) -> int:
        self._ciphers.pop(user_id, None)
        with self.engine.begin() as conn:
            return conn.execute(delete(DataKey).where((DataKey.user_id == user_id) | (DataKey.uid_hash == uid_hash))).rowcount

    def has_key(self, user_id: int | None, uid_hash: str) -> int:
        with self.engine.connect() as conn:
            cond = DataKey.uid_hash == uid_hash
            if user_id is not None:
                cond = cond | (DataKey.user_id == user_id)
            return conn.execute(select(func.count()).select_from(DataKey).where(cond)).scalar_one()

    # -- KEK rotation -------------------------------------------------------------------------
    def rewrap_all(self, batch: int = 500) -> dict[str, int]:
        """Rewrap every data key and secret not at the current KEK version. Record ciphertexts are
        untouched (they are under data keys, which do not change). Resumable: re-running skips
        keys already at the current version."""
        target = self.kek.current_version()
        counts = {"data_keys": 0, "secrets": 0}
        while True:
            with self.engine.begin() as conn:
                rows = conn.execute(
                    select(DataKey.user_id, DataKey.kek_version, DataKey.wrapped).where(DataKey.kek_version != target).limit(batch)
                ).all()
                for r in rows:
                    ctx = _data_key_context(r.user_id)
                    w = self.kek.wrap(self.kek.unwrap(WrappedKey(r.kek_version, r.wrapped), ctx), ctx)
                    conn.execute(update(DataKey).where(DataKey.user_id == r.user_id).values(kek_version=w.kek_version, wrapped=w.blob))
            counts["data_keys"] += len(rows)
            if len(rows) < batch:
                break
        with self.engine.begin() as conn:
            for r in conn.execute(select(Secret.name, Secret.kek_version, Secret.wrapped).where(Secret.kek_version != target)).all():
                ctx = _secret_context(r.name)
                w = self.kek.wrap(self.kek.unwrap(WrappedKey(r.kek_version, r.wrapped), ctx), ctx)
                conn.execute(update(Secret).where(Secret.name == r.name).values(kek_version=w.kek_version, wrapped=w.blob))
                counts["secrets"] += 1
        return counts

    def kek_versions_in_use(self) -> dict[int, int]:
        with self.engine.connect() as conn:
            out: dict[int, int] = {}
            for model in (DataKey, Secret):
                for v, n in conn.execute(select(model.kek_version, func.count()).group_by(model.kek_version)).all():
                    out[v] = out.get(v, 0) + n
            return out

    # -- tombstones (authoritative copy) ------------------------------------------------------
    def tombstones(self) -> dict[str, tuple[int, int, int]]:
        """uid_hash -> (user_id, version, erased_at)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(KeyTombstone.uid_hash, KeyTombstone.user_id, KeyTombstone.version, KeyTombstone.erased_at)).all()
        return {r.uid_hash: (r.user_id, r.version, r.erased_at) for r in rows}

    def tombstoned_among(self, uid_hashes: list[str]) -> set[str]:
        out: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(uid_hashes), 900):
                out.update(conn.execute(select(KeyTombstone.uid_hash).where(KeyTombstone.uid_hash.in_(uid_hashes[i : i + 900]))).scalars())
        return out

    def add_tombstone(self, uid_hash: str, user_id: int) -> tuple[int, int]:
        """(version, erased_at) of the tombstone, creating it once (idempotent)."""
        for _ in range(5):
            try:
                with self.engine.begin() as conn:
                    row = conn.execute(select(KeyTombstone.version, KeyTombstone.erased_at).where(KeyTombstone.uid_hash == uid_hash)).first()
                    if row is not None:
                        return row.version, row.erased_at
                    version = (conn.execute(select(func.max(KeyTombstone.version))).scalar() or 0) + 1
                    at = int(time.time())
                    conn.execute(KeyTombstone.__table__.insert().values(uid_hash=uid_hash, user_id=user_id, version=version, erased_at=at))
                    return version, at
            except IntegrityError:
                continue  # a concurrent erasure took this version number; try the next
        raise RuntimeError("could not write the tombstone")

    def put_tombstone(self, uid_hash: str, user_id: int, version: int, erased_at: int) -> bool:
        """Re-apply a tombstone known elsewhere (restore-check). True when it was missing."""
        with self.engine.begin() as conn:
            if conn.execute(select(KeyTombstone.uid_hash).where(KeyTombstone.uid_hash == uid_hash)).first():
                return False
            taken = conn.execute(select(KeyTombstone.uid_hash).where(KeyTombstone.version == version)).first()
            if taken:
                version = (conn.execute(select(func.max(KeyTombstone.version))).scalar() or 0) + 1
            conn.execute(KeyTombstone.__table__.insert().values(uid_hash=uid_hash, user_id=user_id, version=version, erased_at=erased_at))
            return True

    # -- audit anchor -------------------------------------------------------------------------
    def audit_anchor(self) -> tuple[int, str] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(AuditAnchor.seq, AuditAnchor.entry_hash).where(AuditAnchor.id == 1)).first()
        return (row.seq, row.entry_hash) if row else None

    def set_audit_anchor(self, seq: int, entry_hash: str) -> None:
        with self.engine.begin() as conn:
            if conn.execute(update(AuditAnchor).where(AuditAnchor.id == 1).values(seq=seq, entry_hash=entry_hash)).rowcount == 0:
                conn.execute(AuditAnchor.__table__.insert().values(id=1, seq=seq, entry_hash=entry_hash))

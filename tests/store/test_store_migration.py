"""Alembic migration of a store written before owner binding (revisions d0001/k0001): data keys
wrapped with the internal id only, fields sealed with v1 AAD, events keyed by event id alone,
tombstones and anchor without MACs. The rows are written here in that exact format; opening
the store upgrades it in place, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time

import sqlalchemy as sa

from privacy import DataKeyCipher, KeyedHasher, LocalKek, associated_data, new_data_key
from store import Store, verify_deleted
from store.db import make_engine
from store.migrations import upgrade
from userenc.events import Event


def _legacy_store(data_url: str, keys_url: str, kek: LocalKek) -> dict:
    data, keys = make_engine(data_url), make_engine(keys_url)
    upgrade(data, "data", revision="d0001")
    upgrade(keys, "keys", revision="k0001")
    t = {
        n: sa.table(n, *[sa.column(c) for c in cols])
        for n, cols in {
            "keystore_secrets": ("name", "kek_version", "wrapped"),
            "keystore_data_keys": ("user_id", "uid_hash", "kek_version", "wrapped", "created_at"),
            "keystore_tombstones": ("uid_hash", "user_id", "version", "erased_at"),
            "keystore_audit_anchor": ("id", "seq", "entry_hash"),
            "users": ("id", "uid_hash", "external_id_sealed", "created_at"),
            "events": ("id", "user_id", "payload"),
            "embeddings": ("user_id", "encoder_version", "dim", "vector", "computed_at"),
            "tombstones": ("uid_hash", "user_id", "version", "erased_at"),
            "audit_log": ("seq", "at", "action", "details", "prev_hash", "entry_hash"),
        }.items()
    }
    pepper = os.urandom(32)
    hasher = KeyedHasher(pepper)
    with keys.begin() as kc, data.begin() as dc:
        for name, value in (("keyed-hash-pepper", pepper), ("index-file-key", os.urandom(32))):
            w = kek.wrap(value, b"secret|" + name.encode())
            kc.execute(
                t["keystore_secrets"]
                .insert()
                .values(name=name, kek_version=w.kek_version, wrapped=w.blob)
            )
        users = {}
        for ext in ("alice", "bob"):
            uid, key = secrets.randbits(62) or 1, new_data_key()
            w = kek.wrap(key, b"data-key|user=%d" % uid)  # v1: the internal id only
            kc.execute(
                t["keystore_data_keys"]
                .insert()
                .values(
                    user_id=uid,
                    uid_hash=hasher.user(ext),
                    kek_version=1,
                    wrapped=w.blob,
                    created_at=1,
                )
            )
            c = DataKeyCipher(key)
            dc.execute(
                t["users"]
                .insert()
                .values(
                    id=uid,
                    uid_hash=hasher.user(ext),
                    external_id_sealed=c.seal(
                        ext.encode(), associated_data("users", "external_id_sealed", uid, uid)
                    ),
                    created_at=1,
                )
            )
            for i in range(3):
                eid = f"{ext}:{i}"
                rid = hasher.event(eid)
                payload = json.dumps(
                    [eid, f"item{i}", 100 + i, {"owner": ext}], separators=(",", ":")
                ).encode()
                dc.execute(
                    t["events"]
                    .insert()
                    .values(
                        id=rid,
                        user_id=uid,
                        payload=c.seal(
                            payload, associated_data("events", "payload", uid, rid.hex())
                        ),
                    )
                )
            vec = b"".join(float(x).hex().encode()[:4] for x in range(4)).ljust(16, b"\0")
            dc.execute(
                t["embeddings"]
                .insert()
                .values(
                    user_id=uid,
                    encoder_version="v1",
                    dim=4,
                    vector=c.seal(vec, associated_data("embeddings", "vector", uid, f"{uid}.v1")),
                    computed_at=1,
                )
            )
            users[ext] = (uid, vec)
        gone = hasher.user("carol")  # erased before the upgrade
        kc.execute(
            t["keystore_tombstones"]
            .insert()
            .values(uid_hash=gone, user_id=777, version=1, erased_at=int(time.time()))
        )
        dc.execute(
            t["tombstones"]
            .insert()
            .values(uid_hash=gone, user_id=777, version=1, erased_at=int(time.time()))
        )
        prev = "0" * 64
        for seq, action in enumerate(("ingest", "erasure.completed"), start=1):
            body = json.dumps({"n": seq}, sort_keys=True, separators=(",", ":"))
            h = hashlib.sha256(
                json.dumps([seq, 5, action, body, prev], separators=(",", ":")).encode()
            ).hexdigest()
            dc.execute(
                t["audit_log"]
                .insert()
                .values(seq=seq, at=5, action=action, details=body, prev_hash=prev, entry_hash=h)
            )
            prev = h
        kc.execute(t["keystore_audit_anchor"].insert().values(id=1, seq=2, entry_hash=prev))
    data.dispose()
    keys.dispose()
    return users


def test_legacy_store_upgrades_to_owner_binding_and_per_user_event_identity(backend, kek_b64):
    _, data_url, keys_url, home = backend
    kek = LocalKek({1: base64.b64decode(kek_b64)})
    users = _legacy_store(data_url, keys_url, kek)
    with Store.open(
        home=home, url=data_url, keys_url=keys_url, kek=kek
    ) as s:  # an existing store: no create needed
        for ext, (uid, vec) in users.items():
            assert s.user_key(ext).user_id == uid
            hist = s.history(ext)
            assert [e.event_id for e in hist] == [f"{ext}:{i}" for i in range(3)] and all(
                e.fields["owner"] == ext for e in hist
            )
            assert s.embedding(ext, "v1").tobytes() == vec
        assert sorted(u for u, _ in s.histories()) == ["alice", "bob"]
        assert len(s.keys.tombstones()) == 1 and verify_deleted(s, "carol").clean  # MACs added
        assert s.audit_report().problems == []  # the legacy chain and anchor carry over
        # Per-user identity after the upgrade: bob's copy of alice's event id is a second event.
        c = s.ingest(
            [
                Event("alice:0", "bob", "x", 5, {}),
                Event("alice:0", "alice", "item0", 100, {"owner": "alice"}),
            ]
        )
        assert (c.inserted, c.duplicates) == (1, 1)
        assert len(s.history("bob")) == 4 and len(s.history("alice")) == 3
        with s.data.connect() as conn:
            assert (
                conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "d0002"
            )
    # Re-opening is a no-op migration, and the old KEK context is gone: rows are bound now.
    with Store.open(home=home, url=data_url, keys_url=keys_url, kek=kek) as s:
        assert len(s.history("alice")) == 3

"""The tamper suite (issue 9), on SQLite and PostgreSQL: for every column of every table that
names or holds user data, swap the value between two users' rows, or flip it in one, straight in
the database (constraints and triggers off); then, in a freshly opened store, read, embed, erase
and verify both users. Every outcome must be an integrity error or no effect on the other user:
never a wrong-user read, a wrong-user erasure, or a false "nothing remains"."""

from __future__ import annotations

import numpy as np
import pytest

from store import StoreError, delete_user, restore_check, verify_deleted
from store.erasure_steps import remaining
from store_helpers import open_store, raw_connection
from userenc.events import Event

# (database, table, column, how a row of user X is selected). Live users A/B carry data; erased
# users C/D carry the erasure records. Selectors name the row by its key at setup time.
LIVE = (
    [("data", "users", c, "users") for c in ("id", "uid_hash", "external_id_sealed", "created_at")]
    + [("data", "events", c, "event") for c in ("user_id", "id", "payload")]
    + [
        ("data", "embeddings", c, "embedding")
        for c in ("user_id", "encoder_version", "dim", "vector")
    ]
    + [
        ("keys", "keystore_data_keys", c, "key")
        for c in ("user_id", "uid_hash", "kek_version", "wrapped")
    ]
)
ERASED = (
    [
        ("data", "tombstones", c, "tomb")
        for c in ("uid_hash", "user_id", "version", "kek_version", "mac")
    ]
    + [
        ("data", "erasure_requests", c, "request")
        for c in ("uid_hash", "user_id", "status", "steps")
    ]
    + [
        ("keys", "keystore_tombstones", c, "tomb")
        for c in ("uid_hash", "user_id", "version", "erased_at", "kek_version", "mac")
    ]
)
VERSION = "t"
# Swapped between the two users always; flipped too where the value is an id, a hash, a MAC or
# a ciphertext (flipping a count or a timestamp proves nothing a swap does not).
FLIPPED = {
    "id",
    "uid_hash",
    "user_id",
    "external_id_sealed",
    "payload",
    "vector",
    "wrapped",
    "mac",
    "encoder_version",
    "kek_version",
}


def _where(kind: str, user: dict) -> dict:
    return {
        "users": {"id": user["uid"]},
        "event": {"user_id": user["uid"], "id": user["rid"]},
        "embedding": {"user_id": user["uid"], "encoder_version": VERSION},
        "key": {"user_id": user["uid"]},
        "tomb": {"uid_hash": user["h"]},
        "request": {"uid_hash": user["h"]},
    }[kind]


def _flip(value):  # noqa: ANN001, ANN202
    if isinstance(value, (bytes, bytearray, memoryview)):
        b = bytearray(bytes(value))
        b[-1] ^= 1
        return bytes(b)
    if isinstance(value, int):
        return value ^ (1 << 20)  # far from any real value (and within 32-bit columns)
    return ("1" if value[0] != "1" else "2") + value[1:]


def _placeholder(value, i: int = 0):  # noqa: ANN001, ANN202
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b"\xfe" * (17 + i)
    return -7_777_777 - i if isinstance(value, int) else f"zz-placeholder-{i}"


class Tamper:
    """Edits one column of given rows and can put every edited cell back."""

    def __init__(self, url: str, table: str, column: str):
        self.conn, self.mark = raw_connection(url)
        self.table, self.column, self.undo = table, column, []

    def get(self, where: dict):  # noqa: ANN201
        cond = " AND ".join(f"{k} = {self.mark}" for k in where)
        row = self.conn.execute(
            f"SELECT {self.column} FROM {self.table} WHERE {cond}", tuple(where.values())
        ).fetchone()
        return None if row is None else row[0]

    def set(self, where: dict, value) -> dict:  # noqa: ANN001
        cond = " AND ".join(f"{k} = {self.mark}" for k in where)
        self.conn.execute(
            f"UPDATE {self.table} SET {self.column} = {self.mark} WHERE {cond}",
            (value, *where.values()),
        )
        return {**where, self.column: value} if self.column in where else where

    def flip(self, where: dict) -> None:
        old = self.get(where)
        new_where = self.set(where, _flip(old))
        self.undo.append((new_where, old))

    def swap(self, wa: dict, wb: dict) -> None:
        va, vb = self.get(wa), self.get(wb)
        wa = self.set(wa, _placeholder(va))  # unique columns: go through a placeholder
        wb = self.set(wb, va)
        wa = self.set(wa, vb)
        self.undo += [(wb, vb), (wa, va)]

    def restore(self) -> None:
        """Put the original values back (rows erased meanwhile stay gone)."""
        parked = [
            (self.set(where, _placeholder(value, i + 1)), value)
            for i, (where, value) in enumerate(self.undo)
        ]
        for where, value in parked:
            try:
                self.set(where, value)
            except Exception:  # noqa: BLE001 - a row written since took its place: drop the stale one
                cond = " AND ".join(f"{k} = {self.mark}" for k in where)
                self.conn.execute(f"DELETE FROM {self.table} WHERE {cond}", tuple(where.values()))
        self.conn.close()


def _make_users(store, names: list[str], rng) -> dict[str, dict]:  # noqa: ANN001
    """Two events of their own plus one whose event id every user shares, and an embedding."""
    events = [
        Event(eid, n, f"i{i}", 1000 + i, {"owner": n})
        for n in names
        for i, eid in enumerate(("shared-event", f"{n}:1", f"{n}:2"))
    ]
    store.ingest(events)
    vecs = {n: rng.normal(size=8).astype(np.float32) for n in names}
    store.put_embeddings(vecs, VERSION)
    users = {}
    for n in names:
        key = store.user_key(n)
        users[n] = {
            "name": n,
            "uid": key.user_id,
            "h": key.uid_hash,
            "rid": store.hasher.event(f"{n}:1"),
            "vec": vecs[n],
            "events": {"shared-event", f"{n}:1", f"{n}:2"},
        }
    return users


def _reads_only_own(store, user: dict, others: dict, embed: bool = True) -> None:  # noqa: ANN001
    """Read, embed and similar-user search for one user: an integrity error or their own data."""
    name = user["name"]
    try:
        hist = store.history(name)
        assert all(e.fields.get("owner") == name and e.event_id in user["events"] for e in hist), (
            f"wrong-user read for {name}"
        )
    except StoreError:
        pass
    try:
        vec = store.embedding(name, VERSION)
        assert vec is None or np.array_equal(vec, user["vec"]), f"wrong-user embedding for {name}"
    except StoreError:
        pass
    try:
        for other, score in store.similar_users(name, k=5, encoder_version=VERSION):
            assert other != name and other in others, (
                f"similar_users named an unknown user for {name}"
            )
            a, b = user["vec"], others[other]["vec"]
            assert abs(score - float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))) < 1e-4, (
                f"similar_users put a wrong name on a vector for {name}"
            )
    except StoreError:
        pass
    if embed:
        try:
            store.put_embeddings({name: user["vec"]}, VERSION)
        except (StoreError, ValueError):
            pass


def _snapshot(store, user: dict) -> tuple:  # noqa: ANN001
    """Everything stored under a user's true ids (to prove another user's erasure left it alone)."""
    from sqlalchemy import select

    from store.keystore_models import DataKey
    from store.models import EmbeddingRow, EventRow, User

    with store.data.connect() as conn:
        rows = (
            sorted(
                conn.execute(
                    select(EventRow.id, EventRow.payload).where(EventRow.user_id == user["uid"])
                ).all()
            ),
            sorted(
                conn.execute(
                    select(EmbeddingRow.encoder_version, EmbeddingRow.vector).where(
                        EmbeddingRow.user_id == user["uid"]
                    )
                ).all()
            ),
            conn.execute(
                select(User.uid_hash, User.external_id_sealed).where(User.id == user["uid"])
            ).all(),
        )
    with store.keys_engine.connect() as conn:
        key = conn.execute(
            select(DataKey.uid_hash, DataKey.wrapped).where(DataKey.user_id == user["uid"])
        ).all()
    return rows + (key, store.index.count_of(user["uid"]))


def _erase_and_verify(store, user: dict, other: dict) -> None:  # noqa: ANN001
    before = _snapshot(store, other)
    try:
        delete_user(store, user["name"])
    except (StoreError, ValueError):
        pass
    assert _snapshot(store, other) == before, (
        f"erasing {user['name']} changed {other['name']}'s data"
    )
    try:
        v = verify_deleted(store, user["name"])
    except StoreError:
        return
    if v.clean:  # then nothing under the user's true ids remains and their key is gone
        left = remaining(store, user["h"], user["uid"])
        assert not any(left.values()), f"false 'nothing remains' for {user['name']}: {left}"


def _cases(group: list) -> list[tuple]:
    return [
        (db, table, column, kind, mode)
        for db, table, column, kind in group
        for mode in (("swap", "flip") if column in FLIPPED else ("swap",))
    ]


@pytest.mark.slow
@pytest.mark.parametrize("group", ["live", "erased"])
def test_tamper_suite(backend, kek_b64, group, record_property):
    name, data_url, keys_url = backend[0], backend[1], backend[2]
    cases = _cases(LIVE if group == "live" else ERASED)
    rng = np.random.default_rng(0)
    store = open_store(backend, kek_b64)
    everyone = _make_users(store, [f"t{i}{x}" for i in range(len(cases)) for x in "ab"], rng)
    if group == "erased":
        for u in everyone.values():
            delete_user(store, u["name"])
    store.close()
    tried = 0
    for i, (db, table, column, kind, mode) in enumerate(cases):
        users = [everyone[f"t{i}a"], everyone[f"t{i}b"]]
        t = Tamper(data_url if db == "data" else keys_url, table, column)
        wa, wb = _where(kind, users[0]), _where(kind, users[1])
        assert t.get(wa) is not None and t.get(wb) is not None, (table, column)
        t.swap(wa, wb) if mode == "swap" else t.flip(wa)
        with open_store(backend, kek_b64, create=False) as store:  # as a new process would
            for u in users:
                _reads_only_own(store, u, everyone)
            _erase_and_verify(store, users[0], users[1])
            _erase_and_verify(store, users[1], users[0])
            for u in users:
                _reads_only_own(store, u, everyone, embed=False)
        t.restore()  # put the edit back: the next case starts from a consistent store
        tried += 1
    with open_store(backend, kek_b64, create=False) as store:
        # Every edit undone; a row put back under an erased user (like a restored backup) is
        # what restore-check removes. Then every erased user verifies clean.
        restore_check(store)
        for u in everyone.values():
            v = verify_deleted(store, u["name"])
            assert v.clean or not v.tombstone, u["name"]
        assert store.audit_report().problems == []
    record_property("tamper_cases", tried)
    print(f"tamper suite on {name}, {group} users: {tried} cases")

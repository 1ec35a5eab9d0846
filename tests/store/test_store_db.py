"""Store on SQLite and PostgreSQL: ingest, history, idempotency, tampering, keys, schema."""
import numpy as np
import pytest
from sqlalchemy import func, select, text, update

from privacy import DecryptionError, WrappedKey
from store import StoreIntegrityError
from store.keystore import data_key_context
from store import Store, training_filter
from store.apikeys import check_key, create_key, revoke_key
from store.keystore_models import DataKey
from store.models import EmbeddingRow, EventRow, User
from userenc.events import Event

from store_helpers import make_events


def _count(engine, model):
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(model)).scalar_one()


def test_ingest_history_roundtrip_and_idempotent_retry(store):
    events = make_events(4, 25)
    c = store.ingest(events, batch_size=7)
    assert (c.inserted, c.duplicates, c.batches) == (100, 0, 15)
    # A retried run (or a retried batch) neither loses nor duplicates.
    c2 = store.ingest(events[10:40] + events, batch_size=9)
    assert (c2.inserted, c2.duplicates) == (0, 130)
    assert _count(store.data, EventRow) == 100 and _count(store.data, User) == 4
    h = store.history("u2")
    assert h == sorted([e for e in events if e.user_id == "u2"], key=lambda e: e.timestamp)
    assert store.history("nobody") == []
    assert sorted(u for u, _ in store.histories()) == ["u0", "u1", "u2", "u3"]


def test_partial_overlap_inserts_only_new(store):
    events = make_events(2, 10)
    store.ingest(events[:13])
    c = store.ingest(events)
    assert (c.inserted, c.duplicates) == (7, 13)
    assert len(store.history("u1")) == 10


@pytest.mark.parametrize(
    "bad, message",
    [
        (Event("e", "u", "i", "1700000000", {}), "timestamp must be an integer"),
        (Event("e", "u", "i", True, {}), "timestamp must be an integer"),
        (Event("", "u", "i", 1, {}), "event_id must be a non-empty string"),
        (Event("e", 7, "i", 1, {}), "user_id must be a non-empty string"),
        (Event("e", "u" * 300, "i", 1, {}), "longer than 256"),
        (Event("e", "u", "i", 1, {"text": "x" * 70_000}), "over the 65536-byte limit"),
        (Event("e", "u", "i", 1, {"v": object()}), "JSON values"),
        (Event("e", "u", "i", 1, {"v": float("nan")}), "JSON values"),
        (Event("e", "u", "i", 1, {1: "int key"}), "fields must be a dict with string keys"),
        (Event("e", "u", "i", 1, ["not", "a", "dict"]), "fields must be a dict with string keys"),
        ("not an event", "expected an Event"),
    ],
)
def test_malformed_events_are_refused_and_change_nothing(store, bad, message):
    store.ingest(make_events(1, 3))
    before = (_count(store.data, EventRow), _count(store.data, User), _count(store.keys_engine, DataKey))
    with pytest.raises(ValueError, match=message) as info:
        store.ingest(make_events(2, 5, prefix="new") + [bad], batch_size=2)
    assert "event #10" in str(info.value)  # names the position, not the contents
    assert (_count(store.data, EventRow), _count(store.data, User), _count(store.keys_engine, DataKey)) == before


def _event_rows(store, ext):
    uid = store.user_key(ext).user_id
    with store.data.connect() as conn:
        return uid, conn.execute(select(EventRow.id, EventRow.payload).where(EventRow.user_id == uid).order_by(EventRow.id)).all()


def _set_payload(store, row_id, payload):
    with store.data.begin() as conn:
        conn.execute(update(EventRow).where(EventRow.id == row_id).values(payload=payload))


def test_ciphertext_moved_between_users_or_columns_fails_clearly(store):
    store.ingest(make_events(2, 3, title="CanaryTitle-Q7"))
    _, rows_a = _event_rows(store, "u0")
    uid_b, rows_b = _event_rows(store, "u1")
    _set_payload(store, rows_b[0].id, rows_a[0].payload)  # user A's ciphertext in user B's row
    with pytest.raises(StoreIntegrityError, match="does not authenticate") as info:
        store.history("u1")
    assert "CanaryTitle" not in str(info.value)
    _set_payload(store, rows_b[0].id, rows_b[0].payload)
    assert len(store.history("u1")) == 3
    # Same user, another row of the same column.
    _set_payload(store, rows_b[0].id, rows_b[1].payload)
    with pytest.raises(StoreIntegrityError):
        store.history("u1")
    _set_payload(store, rows_b[0].id, rows_b[0].payload)
    # Same user and row-owner, another column: an event payload put where the external id lives.
    with store.data.begin() as conn:
        conn.execute(update(User).where(User.id == uid_b).values(external_id_sealed=rows_b[0].payload))
    with pytest.raises(StoreIntegrityError, match="a users row"):
        list(store.histories())


def test_flipping_bits_of_stored_ciphertext_fails(store):
    store.ingest(make_events(1, 1))
    _, rows = _event_rows(store, "u0")
    rid, payload = rows[0]
    for bit in range(0, len(payload) * 8, 11):  # a spread of positions, header, nonce, body and tag
        tampered = bytearray(payload)
        tampered[bit // 8] ^= 1 << (bit % 8)
        _set_payload(store, rid, bytes(tampered))
        with pytest.raises(StoreIntegrityError):
            store.history("u0")
    _set_payload(store, rid, payload)
    assert len(store.history("u0")) == 1


def test_data_keys_only_wrapped_and_never_shared(store, backend):
    store.ingest(make_events(5, 2))
    with store.keys_engine.connect() as conn:
        keys = conn.execute(select(DataKey.user_id, DataKey.uid_hash, DataKey.kek_version, DataKey.wrapped)).all()
    assert len(keys) == 5
    raw = [store.keys.kek.unwrap(WrappedKey(k.kek_version, k.wrapped), data_key_context(k.user_id, k.uid_hash)) for k in keys]
    assert len(set(raw)) == 5, "one distinct data key per user"
    for k, r in zip(keys, raw):
        assert r not in k.wrapped and len(k.wrapped) == 12 + 32 + 16
    # A wrapped key copied onto another user's row does not unwrap (the wrap binds the owner).
    with pytest.raises(DecryptionError):
        store.keys.kek.unwrap(WrappedKey(keys[0].kek_version, keys[0].wrapped), data_key_context(keys[1].user_id, keys[0].uid_hash))
    with pytest.raises(DecryptionError):  # nor does one whose keyed id was swapped
        store.keys.kek.unwrap(WrappedKey(keys[0].kek_version, keys[0].wrapped), data_key_context(keys[0].user_id, keys[1].uid_hash))
    # The data database holds no key material at all.
    with store.data.connect() as conn:
        blobs = [b for (b,) in conn.execute(select(EventRow.payload))] + [b for (b,) in conn.execute(select(User.external_id_sealed))]
    assert not any(r in b for r in raw for b in blobs)
    if backend[0] == "sqlite":
        store.close()
        data_bytes = (backend[3] / "store.db").read_bytes()
        assert not any(r in data_bytes for r in raw)


def test_schema_matches_models_after_migrations(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from store.keystore_models import KeysBase
    from store.models import DataBase

    for engine, meta, vt in ((store.data, DataBase.metadata, "alembic_version"), (store.keys_engine, KeysBase.metadata, "alembic_version_keys")):
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"version_table": vt}), meta)
        assert diff == [], diff
    # Re-opening runs the migrations again as a no-op.
    s2 = Store.open(home=store.home, url=str(store.data.url.render_as_string(hide_password=False)), keys_url=store.keys_engine.url.render_as_string(hide_password=False))
    assert s2.history("x") == []
    s2.close()


def test_audit_log_is_append_only_in_the_database(store):
    store.ingest(make_events(1, 1))
    with pytest.raises(Exception, match="append-only"):
        with store.data.begin() as conn:
            conn.execute(text("UPDATE audit_log SET action = 'x'"))
    with pytest.raises(Exception, match="append-only"):
        with store.data.begin() as conn:
            conn.execute(text("DELETE FROM audit_log"))
    assert store.audit_report().problems == []


def test_embeddings_sealed_and_similar_users(store):
    store.ingest(make_events(6, 2))
    rng = np.random.default_rng(0)
    base = rng.normal(size=16).astype(np.float32)
    vecs = {f"u{i}": base + 0.1 * i * rng.normal(size=16).astype(np.float32) for i in range(6)}
    vecs["u5"] = -base
    assert store.put_embeddings(vecs, "enc-v1") == 6
    np.testing.assert_allclose(store.embedding("u3", "enc-v1"), vecs["u3"], rtol=1e-6)
    sims = store.similar_users("u0", k=3)
    assert [u for u, _ in sims][0] == "u1" and "u0" not in [u for u, _ in sims] and "u5" not in [u for u, _ in sims]
    # An update replaces the vector (no duplicate ids in the index).
    store.put_embeddings({"u5": base}, "enc-v1")
    assert store.index.count_of(store.user_key("u5").user_id) == 1
    assert "u5" in [u for u, _ in store.similar_users("u0", k=2)]
    with pytest.raises(ValueError, match="does not know"):
        store.put_embeddings({"stranger": base}, "enc-v1")
    with pytest.raises(ValueError, match="one common width"):
        store.put_embeddings({"u1": base, "u2": base[:4]}, "enc-v1")
    with pytest.raises(ValueError, match="encoder_version"):
        store.put_embeddings({"u1": base}, "bad|version")
    # The index file on disk is sealed: no float vector bytes in clear.
    files = list((store.home / "index").glob("*.faiss.sealed"))
    assert files and base.tobytes()[:16] not in files[0].read_bytes()
    with store.data.connect() as conn:
        assert conn.execute(select(func.count()).select_from(EmbeddingRow)).scalar_one() == 6


def test_api_keys_hashed_with_scopes(store):
    token = create_key(store.data, ["read", "write"], label="ci")
    assert check_key(store.data, token) == {"read", "write"}
    assert check_key(store.data, token + "x") is None
    with store.data.connect() as conn:
        assert token not in str(conn.execute(text("SELECT * FROM api_keys")).all())
    assert revoke_key(store.data, token) and check_key(store.data, token) is None
    with pytest.raises(ValueError, match="scopes"):
        create_key(store.data, ["Bad Scope"])


def test_training_filter_excludes_tombstoned(store):
    from store import delete_user

    store.ingest(make_events(3, 2))
    f0 = training_filter(store)
    assert f0.tombstone_version == 0 and f0.allowed("u1")
    delete_user(store, "u1")
    f1 = training_filter(store)
    assert f1.tombstone_version == 1 and not f1.allowed("u1") and f1.allowed("u0")
    assert sorted(u for u, _ in store.histories()) == ["u0", "u2"]
    c = store.ingest(make_events(3, 2))  # re-ingesting old data never resurrects an erased user
    assert c.tombstoned == 2 and store.history("u1") == []


class InProcessKms:
    """A third-party KMS as the KekProvider protocol sees it (here: one AES key, version 7)."""

    def __init__(self):
        import os

        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead, self.calls = AESGCM(AESGCM.generate_key(bit_length=256)), 0
        self._os = os

    def current_version(self):
        return 7

    def versions(self):
        return [7]

    def wrap(self, key, context):
        self.calls += 1
        nonce = self._os.urandom(12)
        return WrappedKey(7, nonce + self._aead.encrypt(nonce, key, context))

    def unwrap(self, wrapped, context):
        self.calls += 1
        return self._aead.decrypt(wrapped.blob[:12], wrapped.blob[12:], context)


def test_store_runs_on_any_kms_implementing_the_protocol(backend):
    from privacy import KekProvider

    kms = InProcessKms()
    assert isinstance(kms, KekProvider)
    _, data_url, keys_url, home = backend
    s = Store.open(home=home, url=data_url, keys_url=keys_url, kek=kms, create=True)
    s.ingest(make_events(2, 3))
    assert len(s.history("u1")) == 3 and kms.calls >= 5  # 3 secrets + 2 data keys wrapped
    assert s.keys.kek_versions_in_use() == {7: 5}
    s.close()


def test_concurrent_audit_appends_from_threads_keep_the_log_and_anchors_whole(store):
    """A server appends audit entries from request threads and its erasure worker at once: no
    append fails (the node anchor's write once raced on one temporary file name), every entry
    lands, and the chain and both anchors verify."""
    from concurrent.futures import ThreadPoolExecutor

    before = store.audit_report().entries
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.audit("test.concurrent", {"n": i}), range(64)))
    report = store.audit_report()
    assert report.problems == [] and report.entries == before + 64
    leftovers = [p.name for p in store.home.iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_audit_verify_while_threads_append_sees_a_whole_log(store):
    """GET /v1/admin/audit verifies while request threads append: the report reads the
    anchors and the log together, so an append landing between those reads is not taken for
    a log extended outside userllm (test_auth_matrix once failed so under load)."""
    import threading

    stop = threading.Event()

    def append() -> None:
        i = 0
        while not stop.is_set():
            store.audit("test.race", {"n": i})
            i += 1

    writers = [threading.Thread(target=append) for _ in range(2)]
    for w in writers:
        w.start()
    try:
        problems = [p for _ in range(40) for p in store.audit_report().problems]
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert problems == []

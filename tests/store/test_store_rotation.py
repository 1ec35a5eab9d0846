"""KEK rotation on SQLite and PostgreSQL: data keys move to the new KEK version, record
ciphertexts stay byte-identical, and with the old KEK gone everything still decrypts."""
import base64
import os

import numpy as np
from sqlalchemy import select

from privacy import KekDirectory, LocalKek
from store import Store
from store.keystore_models import DataKey, Secret
from store.models import EmbeddingRow, EventRow, User
from store_helpers import cli_command, make_events, subprocess_env


def _ciphertexts(store):
    with store.data.connect() as conn:
        out = {
            "events": conn.execute(select(EventRow.id, EventRow.payload).order_by(EventRow.id)).all(),
            "users": conn.execute(select(User.id, User.external_id_sealed).order_by(User.id)).all(),
            "embeddings": conn.execute(select(EmbeddingRow.user_id, EmbeddingRow.vector).order_by(EmbeddingRow.user_id)).all(),
        }
    out["index"] = sorted(p.read_bytes() for p in (store.home / "index").glob("*.sealed"))
    return out


def _kek_versions(store):
    with store.keys_engine.connect() as conn:
        return sorted({v for (v,) in conn.execute(select(DataKey.kek_version))} | {v for (v,) in conn.execute(select(Secret.kek_version))})


def test_rotate_kek_rewraps_keys_only_and_old_kek_can_go(backend):
    _, data_url, keys_url, home = backend
    s = Store.open(home=home, url=data_url, keys_url=keys_url, create=True)
    assert isinstance(s.keys.kek, KekDirectory)
    events = make_events(5, 4)
    s.ingest(events)
    s.put_embeddings({f"u{i}": np.full(4, i + 1.0, dtype=np.float32) for i in range(5)}, "v1")
    before = _ciphertexts(s)
    with s.keys_engine.connect() as conn:
        wrapped_before = dict(conn.execute(select(DataKey.user_id, DataKey.wrapped)).all())
    assert _kek_versions(s) == [1]

    assert s.keys.kek.new_version() == 2
    counts = s.keys.rewrap_all()
    assert counts == {"data_keys": 5, "secrets": 3}
    assert _kek_versions(s) == [2]
    assert s.keys.rewrap_all() == {"data_keys": 0, "secrets": 0}  # resumable / idempotent
    assert _ciphertexts(s) == before  # record ciphertexts byte-identical
    with s.keys_engine.connect() as conn:
        wrapped_after = dict(conn.execute(select(DataKey.user_id, DataKey.wrapped)).all())
    assert all(wrapped_after[u] != wrapped_before[u] for u in wrapped_before)
    s.keys.kek.remove_version(1)
    s.close()
    assert sorted(p.name for p in (home / "kek").iterdir()) == ["kek-v000002.key"]

    # A fresh process with only KEK v2: everything decrypts, keyed-hash lookups still work.
    s2 = Store.open(home=home, url=data_url, keys_url=keys_url)
    assert s2.keys.kek.versions() == [2]
    got = dict(s2.histories())
    assert sorted(got) == [f"u{i}" for i in range(5)]
    assert got["u3"] == sorted([e for e in events if e.user_id == "u3"], key=lambda e: e.timestamp)
    np.testing.assert_array_equal(s2.embedding("u2", "v1"), np.full(4, 3.0, dtype=np.float32))
    assert len(s2.similar_users("u0", k=2)) == 2  # the sealed index opens under the rewrapped key
    s2.ingest(make_events(6, 1))  # new users are wrapped under v2
    assert _kek_versions(s2) == [2]
    s2.close()


def test_rotate_kek_cli_with_environment_keys(backend):
    import subprocess

    k1, k2 = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    _, data_url, keys_url, home = backend
    s = Store.open(home=home, url=data_url, keys_url=keys_url, kek=LocalKek({1: base64.b64decode(k1)}), create=True)
    s.ingest(make_events(3, 2))
    before = _ciphertexts(s)
    s.close()
    both = f"1:{k1},2:{k2}"
    r = subprocess.run(cli_command() + ["admin", "rotate-kek"], env=subprocess_env(backend, both), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "rewrapped 3 data keys and 3 secrets; all keys at KEK version 2" in r.stdout
    s2 = Store.open(home=home, url=data_url, keys_url=keys_url, kek=LocalKek({2: base64.b64decode(k2)}))  # old KEK removed
    assert _ciphertexts(s2) == before and _kek_versions(s2) == [2]
    assert [len(h) for _, h in s2.histories()] == [2, 2, 2]
    assert s2.audit_report().problems == []
    s2.close()

"""KEK rotation on SQLite and PostgreSQL: data keys move to the new KEK version, record
ciphertexts stay byte-identical, and with the old KEK gone everything still decrypts."""
import base64
import os

import numpy as np
import pytest
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


@pytest.mark.slow
def test_rotate_kek_at_scale_killed_mid_way_resumes_rewrapping_each_key_exactly_once(backend):
    """1,200 keys (more than two 500-key rewrap batches): kill -9 inside the second batch's
    transaction, run rotate-kek again: it resumes to the same version instead of minting one
    more, every key is rewrapped exactly once, and every event reads back."""
    import signal
    import subprocess
    import time

    from userenc.events import Event

    _, data_url, keys_url, home = backend
    n = 1200
    with Store.open(home=home, url=data_url, keys_url=keys_url, create=True) as s:
        s.ingest([Event(f"e{i}", f"user{i}", "item", 1000 + i, {"i": i}) for i in range(n)], batch_size=2000)
        w0 = _wrapped(s)
    assert len(w0) == n
    env = subprocess_env(backend, None, USERLLM_TEST_BATCH_DELAY="0.3")
    proc = subprocess.Popen(cli_command() + ["admin", "rotate-kek", "-v"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while "rewrapped 500 data keys so far" not in proc.stdout.readline():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
    time.sleep(0.1)  # inside the second batch's transaction (it pauses 0.3 s before committing)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with Store.open(home=home, url=data_url, keys_url=keys_url) as s:
        w1 = _wrapped(s)
        assert s.keys.kek_versions_in_use() == {1: n - 500 + 3, 2: 500}  # one batch committed, secrets last
    first = {u for u in w0 if w1[u] != w0[u]}
    assert len(first) == 500
    r = subprocess.run(cli_command() + ["admin", "rotate-kek"], env=subprocess_env(backend, None), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "resumed an interrupted rotation to KEK version 2" in r.stdout, r.stderr
    assert f"rewrapped {n - 500} data keys and 3 secrets" in r.stdout and "new KEK version" not in r.stdout
    with Store.open(home=home, url=data_url, keys_url=keys_url) as s:
        w2 = _wrapped(s)
        assert s.keys.kek_versions_in_use() == {2: n + 3}
        s.keys.kek.remove_version(1)
    assert all(w2[u] == w1[u] for u in first) and all(w2[u] != w1[u] for u in w0.keys() - first)  # each key once
    with Store.open(home=home, url=data_url, keys_url=keys_url) as s:  # only KEK v2 left
        got = dict(s.histories())
        assert len(got) == n and all(h[0].fields["i"] == int(u[4:]) for u, h in got.items())
        assert s.audit_report().problems == []


def _wrapped(store) -> dict[int, bytes]:
    with store.keys_engine.connect() as conn:
        return dict(conn.execute(select(DataKey.user_id, DataKey.wrapped)).all())

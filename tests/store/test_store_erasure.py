"""Erasure on SQLite and PostgreSQL: every table, the FAISS index, the data key, a restored
backup (restore-check), the audit chain, training manifests."""
import json
import shutil
import subprocess

import numpy as np
import pytest
from sqlalchemy import text

from store import Store, delete_user, manifest_users, restore_check, stale_models, verify_deleted
from store_helpers import all_rows, cli_command, make_events, pg_dump_schema, psql_file, subprocess_env

# Tables whose purpose is to record the erasure itself; they may hold the keyed hash only.
ERASURE_RECORDS = {"tombstones", "erasure_requests", "audit_log", "keystore_tombstones"}


def _populate(store: Store, n_users=6, per_user=30):
    store.ingest(make_events(n_users, per_user), batch_size=50)
    rng = np.random.default_rng(1)
    vecs = {f"u{i}": rng.normal(size=8).astype(np.float32) for i in range(n_users)}
    vecs["u1"] = vecs["u0"] * 1.01  # u1 is u0's nearest neighbour until erased
    store.put_embeddings(vecs, "enc-a")
    store.put_embeddings(vecs, "enc-b")  # two index files: erasure must reach both
    cache = store.artefact_dir(store.hasher.user("u1"))
    cache.mkdir(parents=True)
    (cache / "user_tokens.pt").write_bytes(b"cached")


def _mentions(rows: dict[str, list[tuple]], values) -> dict[str, int]:
    hits = {}
    for table, rs in rows.items():
        n = sum(1 for r in rs if any(v in r for v in values) or any(isinstance(c, str) and any(isinstance(v, str) and v in c for v in values) for c in r))
        if n:
            hits[table] = n
    return hits


def test_erasure_removes_user_everywhere(store):
    _populate(store)
    uid, h = store.user_key("u1").user_id, store.hasher.user("u1")
    assert [u for u, _ in store.similar_users("u0", k=1)] == ["u1"]
    report = delete_user(store, "u1")
    assert report.before["events"] == 30 and report.before["index"] == 2 and report.before["data_key"] == 1
    assert report.deleted["events"] == 30 and report.deleted["index"] == 2 and report.deleted["artefacts"] == 1
    v = verify_deleted(store, "u1")
    assert v.clean and v.tombstone and not any(v.remaining.values())
    # Zero rows for the user in every table of both databases (the erasure records keep only the keyed hash).
    for engine in (store.data, store.keys_engine):
        hits = _mentions(all_rows(engine), [uid])
        assert set(hits) <= {"tombstones", "erasure_requests", "keystore_tombstones"}, hits
        hits_h = _mentions(all_rows(engine), [h])
        assert set(hits_h) <= ERASURE_RECORDS, hits_h
    # Similar-user search never returns them, from any user, in any index.
    for other in ("u0", "u2", "u3", "u4", "u5"):
        for version in ("enc-a", "enc-b"):
            assert "u1" not in [u for u, _ in store.similar_users(other, k=10, encoder_version=version)]
    assert store.history("u1") == [] and store.keys.key_rows(uid, h) == 0
    assert store.user_key("u1") is None  # the data key is gone: crypto-shredded
    assert len(store.history("u0")) == 30  # others untouched
    # Idempotent: a second request finds nothing to do.
    assert delete_user(store, "u1").already_erased
    assert store.audit_report().problems == []


def test_unknown_user_delete_changes_nothing(store):
    _populate(store, n_users=2, per_user=3)
    before = (all_rows(store.data), all_rows(store.keys_engine))
    with pytest.raises(ValueError, match="unknown user"):
        delete_user(store, "nobody-here")
    assert (all_rows(store.data), all_rows(store.keys_engine)) == before


def test_restore_check_reapplies_tombstone_to_restored_backup(backend):
    name, data_url, keys_url, home = backend
    s = Store.open(home=home, url=data_url, keys_url=keys_url, create=True)
    _populate(s)
    uid = s.user_key("u1").user_id
    backup_index = home / "index-backup"
    shutil.copytree(home / "index", backup_index)
    if name == "sqlite":
        with s.data.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        s.close()
        shutil.copy(home / "store.db", home / "store-backup.db")
        s = Store.open(home=home, url=data_url, keys_url=keys_url)
    else:
        pg_dump_schema(data_url, home / "backup.sql")
    delete_user(s, "u1")
    s.close()
    # Restore the data database (and the index files) from the backup taken before erasure.
    if name == "sqlite":
        for suffix in ("-wal", "-shm"):
            (home / f"store.db{suffix}").unlink(missing_ok=True)
        shutil.copy(home / "store-backup.db", home / "store.db")
    else:
        from store_helpers import pg_schema_of

        s = Store.open(home=home, url=data_url, keys_url=keys_url)
        with s.data.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{pg_schema_of(data_url)}" CASCADE'))
        s.close()
        psql_file(home / "backup.sql")
    shutil.rmtree(home / "index")
    shutil.copytree(backup_index, home / "index")
    s = Store.open(home=home, url=data_url, keys_url=keys_url)
    v = verify_deleted(s, "u1")
    assert not v.clean and v.remaining["events"] == 30 and v.remaining["index"] == 2  # the backup brought them back...
    assert s.history("u1") == []  # ...unreadable (the key was shredded), but still present
    env = subprocess_env(backend, None)
    run = lambda *a: subprocess.run(cli_command() + list(a), env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    found = run("admin", "verify-deleted", "u1")
    assert found.returncode == 1 and "30 REMAINING" in found.stdout and "NOT DELETED" in found.stderr
    fixed = run("admin", "restore-check")
    assert fixed.returncode == 0 and "re-applied 1 to the data database" in fixed.stdout and "cleaned 1 users" in fixed.stdout, fixed.stderr
    assert run("admin", "verify-deleted", "u1").returncode == 0
    v = verify_deleted(s, "u1")
    assert v.clean and v.tombstone, v.remaining
    assert "u1" not in [u for u, _ in s.similar_users("u0", k=10)]
    assert not _mentions(all_rows(s.data), [uid]).keys() - {"tombstones", "erasure_requests"}
    assert restore_check(s).users_cleaned == 0  # idempotent
    s.close()


def _cli(backend, kek_b64, *args):
    return subprocess.run(cli_command() + list(args), env=subprocess_env(backend, kek_b64), capture_output=True, text=True, timeout=120)


def test_audit_verify_detects_edit_removal_and_truncation(backend, kek_b64):
    name, data_url, keys_url, home = backend
    import base64

    from privacy import LocalKek
    from store.apikeys import create_key

    s = Store.open(home=home, url=data_url, keys_url=keys_url, kek=LocalKek({1: base64.b64decode(kek_b64)}), create=True)
    create_key(s.data, ["read"])
    s.audit("api-key.created", {"scopes": ["read"]})
    s.ingest(make_events(2, 3))
    delete_user(s, "u0")
    ok = _cli(backend, kek_b64, "admin", "audit-verify")
    assert ok.returncode == 0 and "intact" in ok.stdout

    def unguarded(sql, **params):
        with s.data.begin() as conn:
            if name == "sqlite":
                conn.execute(text("DROP TRIGGER IF EXISTS audit_log_no_update"))
                conn.execute(text("DROP TRIGGER IF EXISTS audit_log_no_delete"))
            else:
                conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change"))
            conn.execute(text(sql), params)

    with s.data.connect() as conn:
        rows = conn.execute(text("SELECT seq, details FROM audit_log ORDER BY seq")).all()
    assert len(rows) == 5  # store.created, api-key.created, ingest, erasure.requested, erasure.completed
    edited = rows[3].details.replace('"events":3', '"events":0')
    assert edited != rows[3].details
    unguarded("UPDATE audit_log SET details = :d WHERE seq = 4", d=edited)
    bad = _cli(backend, kek_b64, "admin", "audit-verify")
    assert bad.returncode == 1 and "entry 4: contents do not match" in bad.stderr
    unguarded("UPDATE audit_log SET details = :d WHERE seq = 4", d=rows[3].details)
    assert s.audit_report().problems == []
    unguarded("DELETE FROM audit_log WHERE seq = 2")
    assert any("entry 2 missing" in p for p in s.audit_report().problems)
    unguarded("DELETE FROM audit_log WHERE seq >= 3")  # cut the tail: caught by the key-store anchor
    assert any("anchor" in p for p in s.audit_report().problems)
    s.close()


def test_stale_models_lists_checkpoints_trained_on_erased_users(store, backend, tmp_path):
    store.ingest(make_events(4, 2))
    runs = tmp_path / "runs"
    for ckpt, users in (("a", ["u0", "u1"]), ("b", ["u2", "u3"])):
        section = manifest_users(store, users, runs / ckpt)
        (runs / ckpt / "manifest.json").write_text(json.dumps({"erasure": section, "metrics": {}}))
    (runs / "c").mkdir()
    (runs / "c" / "manifest.json").write_text("{}")
    assert all(r.status in ("current", "unknown") for r in stale_models(store, runs))
    delete_user(store, "u1")
    status = {r.path.name: (r.status, r.erased_users) for r in stale_models(store, runs)}
    assert status == {"a": ("stale", 1), "b": ("current", 0), "c": ("unknown", 0)}
    r = subprocess.run(cli_command() + ["admin", "stale-models", "--runs", str(runs)], env=subprocess_env(backend, None), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1 stale of 3 checkpoints" in r.stderr, r.stderr
    assert f"STALE    {runs / 'a'}  1 users erased since training" in r.stdout and f"CURRENT  {runs / 'b'}" in r.stdout
    # A new checkpoint cannot include an erased user: the manifest refuses it.
    with pytest.raises(ValueError, match="erased"):
        manifest_users(store, ["u1", "u2"])
    assert "u0" not in (runs / "a" / "users.keyed-hashes.txt").read_text()

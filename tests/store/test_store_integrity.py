"""One test per defect of issue 9 (each fails on the code before it and passes after), as a
hostile or careless operator would meet them: edit the raw database, restore an old copy,
delete key files, feed bad input."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
from sqlalchemy import event, select

from store import StoreIntegrityError, StoreStateError, manifest_users
from store.keystore_models import DataKey
from store_helpers import make_events, open_store, raw_exec, sqlite_checkpoint, subprocess_env


def _one_line_error(r, code: int = 2) -> str:  # noqa: ANN001
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_swapped_user_mapping_never_reads_erases_or_verifies_the_other_user(backend, kek_b64, cli):
    """Was: swapping users.uid_hash made history("31337") return 987654321's events, delete-user
    31337 erase the other user, and verify-deleted 31337 print "nothing remains"."""
    a, b = "31337", "987654321"
    with open_store(backend, kek_b64) as s:
        s.ingest(make_events(1, 4, prefix=a) + make_events(1, 5, prefix=b))
        a_ext, b_ext = f"{a}0", f"{b}0"
        ua, ub = s.user_key(a_ext).user_id, s.user_key(b_ext).user_id
        ha, hb = s.hasher.user(a_ext), s.hasher.user(b_ext)
    url = backend[1]
    raw_exec(url, "UPDATE users SET uid_hash = ? WHERE id = ?", ("x" * 64, ua))
    raw_exec(url, "UPDATE users SET uid_hash = ? WHERE id = ?", (ha, ub))
    raw_exec(url, "UPDATE users SET uid_hash = ? WHERE id = ?", (hb, ua))
    with open_store(backend, kek_b64, create=False) as s:
        got = s.history(a_ext)  # resolved through the key store: their own events, or an error
        assert got and all(e.event_id.startswith(f"ev:{a}0:") for e in got)
        with pytest.raises(StoreIntegrityError):
            list(s.histories())
    env = subprocess_env(backend, kek_b64)
    for args in (
        ("admin", "delete-user", "--ids-from", "-"),
        ("admin", "verify-deleted", "--ids-from", "-"),
    ):
        line = _one_line_error(cli(env, *args, stdin=a_ext + "\n"))
        assert "altered" in line and a not in line
    with open_store(backend, kek_b64, create=False) as s:
        assert len(s.history(b_ext)) == 5 and len(s.history(a_ext)) == 4  # nobody was erased
        assert s.keys.tombstones() == {}


def test_restored_data_database_shows_as_an_audit_gap_after_ordinary_commands(
    tmp_path, clean_env, kek_b64, cli
):
    """Was: restoring an older store.db, then any ordinary command re-anchored the audit log at
    the restored tail, and audit-verify called the shortened log intact."""
    home = clean_env
    backend = ("sqlite", f"sqlite:///{home / 'store.db'}", f"sqlite:///{home / 'keys.db'}", home)
    with open_store(backend, kek_b64) as s:
        s.ingest(make_events(2, 3))
        sqlite_checkpoint(s.data)
    shutil.copy(home / "store.db", tmp_path / "old-store.db")
    env = subprocess_env(backend, kek_b64)
    assert cli(env, "admin", "delete-user", "u0").returncode == 0
    for suffix in ("-wal", "-shm"):
        (home / f"store.db{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "old-store.db", home / "store.db")
    data = tmp_path / "more.jsonl"
    data.write_text('{"user_id": "u9", "item_id": "i", "timestamp": 5}\n')
    ingest = cli(env, "ingest", "--data", str(data), "--format", "jsonl")
    assert (
        ingest.returncode == 0 and "not re-anchored" in ingest.stderr
    )  # the ordinary command warns
    verify = cli(env, "admin", "audit-verify")
    assert verify.returncode == 1 and "key-store anchor names entry" in verify.stderr, verify.stderr
    fixed = cli(env, "admin", "restore-check")
    assert (
        fixed.returncode == 0
        and "acknowledged" in fixed.stderr
        and "cleaned 1 users" in fixed.stdout
    ), fixed.stderr
    after = cli(env, "admin", "audit-verify")
    assert after.returncode == 0 and "restore-check acknowledged a gap" in after.stdout


@pytest.mark.parametrize("lose", ["keys.db", "kek"])
def test_missing_key_store_or_kek_refuses_instead_of_re_keying(clean_env, tmp_path, lose, cli):
    """Was: deleting keys.db or kek/ made the next ingest mint fresh keys and store everything
    a second time; train-encoder --from-store then died with a traceback."""
    home = clean_env
    backend = ("sqlite", f"sqlite:///{home / 'store.db'}", f"sqlite:///{home / 'keys.db'}", home)
    data = tmp_path / "e.jsonl"
    data.write_text('{"user_id": "u1", "item_id": "i", "timestamp": 5}\n')
    env = subprocess_env(backend, None)
    assert cli(env, "ingest", "--data", str(data), "--format", "jsonl").returncode == 0
    before = (home / "store.db").read_bytes()
    if lose == "kek":
        shutil.rmtree(home / "kek")
    else:
        for suffix in ("", "-wal", "-shm"):
            (home / f"keys.db{suffix}").unlink(missing_ok=True)
    for args in (
        ("ingest", "--data", str(data), "--format", "jsonl"),
        ("admin", "audit-verify"),
        ("admin", "delete-user", "u1"),
    ):
        line = _one_line_error(cli(env, *args))
        assert ("KEK directory" if lose == "kek" else "key store") in line and "restore" in line
    assert not (home / "kek").exists() if lose == "kek" else not (home / "keys.db").exists()
    assert (home / "store.db").read_bytes() == before
    with pytest.raises(StoreStateError):
        open_store(
            backend, None, create=True
        )  # not even an explicit create re-keys beside old data


def test_same_event_id_from_two_users_is_two_events_whatever_the_batches(store):
    """Was: the row id hashed only the event id, so one of the two users' events was kept, and
    which one depended on batch boundaries."""
    from userenc.events import Event

    events = [
        Event("e-1", "alice", "i1", 10, {"r": 1}),
        Event("e-1", "bob", "i2", 11, {"r": 2}),
        Event("e-2", "alice", "i3", 12, {}),
    ]
    c = store.ingest(events, batch_size=1)
    assert (c.inserted, c.duplicates) == (3, 0)
    assert store.ingest(events, batch_size=3).duplicates == 3
    assert [e.item_id for e in store.history("alice")] == ["i1", "i3"] and [
        e.item_id for e in store.history("bob")
    ] == ["i2"]


def test_erased_key_leaves_no_bytes_even_where_sqlite_defaults_to_keeping_them(clean_env, kek_b64):
    """Was: nothing set secure_delete, so on a SQLite built without it the erased user's wrapped
    key stayed in keys.db's free pages (and the live KEK still unwraps it)."""
    from sqlalchemy import Engine

    def platform_default_off(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.execute("PRAGMA secure_delete=OFF")

    event.listen(
        Engine, "connect", platform_default_off, insert=True
    )  # runs before our own pragmas
    try:
        home = clean_env
        backend = (
            "sqlite",
            f"sqlite:///{home / 'store.db'}",
            f"sqlite:///{home / 'keys.db'}",
            home,
        )
        from store import delete_user

        with open_store(backend, kek_b64) as s:
            s.ingest(make_events(30, 2))
            with s.keys_engine.connect() as conn:
                wrapped = conn.execute(
                    select(DataKey.wrapped).where(DataKey.user_id == s.user_key("u7").user_id)
                ).scalar_one()
            assert s.keys_engine.connect().exec_driver_sql("PRAGMA secure_delete").scalar() == 1
            delete_user(s, "u7")
        raw = b"".join(p.read_bytes() for p in home.iterdir() if p.name.startswith("keys.db"))
        assert raw.count(wrapped) == 0
    finally:
        event.remove(Engine, "connect", platform_default_off)


def test_cli_expected_failures_are_one_line(backend, kek_b64, tmp_path, cli):
    """Was: an unreachable PostgreSQL and a missing key printed tracebacks (exit 1), empty input
    exited 0 with an empty store, and rotate-kek --remove-old failed only after rewrapping."""
    env = subprocess_env(backend, kek_b64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no events in" in _one_line_error(
        cli(env, "ingest", "--data", str(empty), "--format", "jsonl")
    )
    assert "no store at" in _one_line_error(
        cli(env, "admin", "audit-verify")
    )  # the empty input created none
    bad_env = dict(env, USERLLM_DATABASE_URL="postgresql://postgres@127.0.0.1:1/none")
    assert "cannot use the database" in _one_line_error(cli(bad_env, "admin", "audit-verify"))
    with open_store(backend, kek_b64) as s:
        s.ingest(make_events(3, 1))
        versions_before = s.keys.kek_versions_in_use()
    import base64

    env2 = subprocess_env(backend, f"1:{kek_b64},2:{base64.b64encode(os.urandom(32)).decode()}")
    line = _one_line_error(cli(env2, "admin", "rotate-kek", "--remove-old"))
    assert "--remove-old works on the key directory only" in line
    with open_store(backend, kek_b64, create=False) as s:
        assert s.keys.kek_versions_in_use() == versions_before  # checked before anything changed
    wrong = subprocess_env(backend, base64.b64encode(os.urandom(32)).decode())
    assert "KEK does not open" in _one_line_error(cli(wrong, "admin", "audit-verify"))
    ids = tmp_path / "ids.txt"
    ids.write_text("u0\nnobody\n")
    assert "unknown user (id 2 of 2)" in _one_line_error(
        cli(env, "admin", "delete-user", "--ids-from", str(ids))
    )
    with open_store(backend, kek_b64, create=False) as s:
        assert s.keys.tombstones() == {}  # all ids resolved before the first erasure
    ids.write_text("u0\nu1\n")
    r = cli(env, "admin", "delete-user", "--ids-from", str(ids))
    assert r.returncode == 0 and r.stdout.count("complete") == 2 and "u0" not in r.stdout
    r = cli(env, "admin", "verify-deleted", "--ids-from", "-", stdin="u0\nu1\n")
    assert r.returncode == 0 and r.stdout.count("verified: nothing remains") == 2


def test_expected_failure_messages_are_one_line_without_statements():
    from sqlalchemy.exc import OperationalError

    from api.cli import expected_failure

    err = OperationalError(
        "SELECT secret FROM t WHERE x = ?", ("CanaryValue",), Exception("database is locked\nmore")
    )
    msg = expected_failure(err)
    assert msg == "database unavailable or locked: database is locked" and "Canary" not in msg
    assert expected_failure(LookupError("no data key")) == "no data key"
    assert expected_failure(RuntimeError("bug")) is None


def test_files_naming_users_are_owner_only(store, tmp_path):
    """Was: the checkpoint's keyed-hash user list was written 0644."""
    store.ingest(make_events(2, 1))
    manifest_users(store, ["u0", "u1"], tmp_path / "ckpt")
    assert stat.S_IMODE((tmp_path / "ckpt" / "users.keyed-hashes.txt").stat().st_mode) == 0o600

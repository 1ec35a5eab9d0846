"""The restore suite (issue 9), on SQLite and PostgreSQL. After an erasure, an operator restores
an older data database (keeping the key store), restores both databases, or loses the key store
or the KEK folder. Each case ends in a clear refusal, a restore-check that re-applies the
erasure, or an audit report that names the gap: none is silent."""

from __future__ import annotations

import shutil

import pytest
from sqlalchemy import create_engine, text

from store_helpers import (
    make_events,
    open_store,
    pg_dump_schema,
    pg_schema_of,
    psql_file,
    sqlite_checkpoint,
    subprocess_env,
)


def _backup(backend, to) -> None:  # noqa: ANN001
    name, data_url, keys_url, home = backend
    to.mkdir()
    if name == "sqlite":
        for f in ("store.db", "keys.db"):
            shutil.copy(home / f, to / f)
    else:
        pg_dump_schema(data_url, to / "store.sql")
        pg_dump_schema(keys_url, to / "keys.sql")


def _restore(backend, frm, which: str) -> None:  # noqa: ANN001
    name, data_url, keys_url, home = backend
    for f, url in (("store", data_url), ("keys", keys_url)):
        if f not in which:
            continue
        if name == "sqlite":
            for suffix in ("-wal", "-shm"):
                (home / f"{f}.db{suffix}").unlink(missing_ok=True)
            shutil.copy(frm / f"{f}.db", home / f"{f}.db")
        else:
            _drop_schema(url)
            psql_file(frm / f"{f}.sql")


def _drop_schema(url: str, recreate: bool = False) -> None:
    engine = create_engine(url.split("?")[0])
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{pg_schema_of(url)}" CASCADE'))
        if recreate:
            conn.execute(text(f'CREATE SCHEMA "{pg_schema_of(url)}"'))
    engine.dispose()


@pytest.mark.parametrize(
    "case",
    [
        "data-restored",
        "both-restored",
        "both-restored-after-kek-rotation",
        "key-store-gone",
        "kek-gone",
    ],
)
def test_restore_suite(backend, tmp_path, cli, case):
    name, data_url, keys_url, home = backend
    env = subprocess_env(backend, None)  # the KEK directory USERLLM_HOME/kek
    with open_store(backend) as s:
        s.ingest(make_events(4, 5))
        if name == "sqlite":
            sqlite_checkpoint(s.data)
            sqlite_checkpoint(s.keys_engine)
    _backup(backend, tmp_path / "backup")
    assert cli(env, "admin", "delete-user", "u1").returncode == 0
    if case == "both-restored-after-kek-rotation":
        assert (
            cli(env, "admin", "rotate-kek", "--remove-old").returncode == 0
        )  # the README's advice after erasures

    if case == "data-restored":
        _restore(backend, tmp_path / "backup", "store")
        verify = cli(env, "admin", "audit-verify")
        assert verify.returncode == 1 and "key-store anchor names entry" in verify.stderr, (
            verify.stderr
        )
        fixed = cli(env, "admin", "restore-check")
        assert (
            fixed.returncode == 0
            and "cleaned 1 users" in fixed.stdout
            and "acknowledged" in fixed.stderr
        ), (fixed.stdout, fixed.stderr)
        assert cli(env, "admin", "verify-deleted", "u1").returncode == 0
        after = cli(env, "admin", "audit-verify")
        assert after.returncode == 0 and "restore-check acknowledged a gap" in after.stdout
    elif case == "both-restored":
        _restore(backend, tmp_path / "backup", "store+keys")
        verify = cli(env, "admin", "audit-verify")
        assert verify.returncode == 1 and "both databases were restored" in verify.stderr, (
            verify.stderr
        )
        check = cli(env, "admin", "restore-check")
        assert check.returncode == 0 and "both databases were restored" in check.stderr
        assert (
            "which still exist" not in check.stderr
        )  # the backup knows no erasure, so it cannot warn of one...
        gone = cli(env, "admin", "verify-deleted", "u1")
        assert (
            gone.returncode == 1 and "NOT DELETED" in gone.stderr
        )  # ...and never claims u1 is gone
    else:
        if case == "both-restored-after-kek-rotation":
            _restore(backend, tmp_path / "backup", "store+keys")
            expect = "KEK version 1 is not available"
        elif case == "key-store-gone":
            if name == "sqlite":
                for suffix in ("", "-wal", "-shm"):
                    (home / f"keys.db{suffix}").unlink(missing_ok=True)
            else:
                _drop_schema(keys_url, recreate=True)
            expect = "key store"
        else:
            shutil.rmtree(home / "kek")
            expect = "KEK directory"
        for args in (
            ("admin", "audit-verify"),
            ("admin", "restore-check"),
            ("admin", "verify-deleted", "u1"),
        ):
            r = cli(env, *args)
            lines = r.stderr.strip().splitlines()
            assert (
                r.returncode == 2
                and len(lines) == 1
                and expect in lines[0]
                and "restore" in lines[0]
            ), (args, r.stderr)


def test_restore_check_warns_while_a_kek_version_of_an_erased_key_exists(store, cli, backend):
    """A key-store backup from before an erasure opens the erased user's data until the KEK
    version that wrapped their key is destroyed: restore-check says so until rotate-kek
    --remove-old."""
    env = subprocess_env(backend, None)
    store.ingest(make_events(3, 2))
    assert cli(env, "admin", "delete-user", "u2").returncode == 0
    r = cli(env, "admin", "restore-check")
    assert (
        r.returncode == 0
        and "1 erased users' keys were wrapped under KEK versions [1], which still exist"
        in r.stderr
    )
    assert cli(env, "admin", "rotate-kek", "--remove-old").returncode == 0
    r = cli(env, "admin", "restore-check")
    assert r.returncode == 0 and "which still exist" not in r.stderr

"""Helpers shared by the store tests (a unique module name: tests folders are not packages)."""
from __future__ import annotations

import os
from pathlib import Path


def make_events(n_users: int, per_user: int, prefix: str = "u", title: str = "A Film (1999)"):
    from userenc.events import Event

    return [
        Event(f"ev:{prefix}{u}:{i}", f"{prefix}{u}", f"m{i % 50}", 1_000_000 + i * 60 + u, {"rating": 1 + (i + u) % 5, "title": title, "genres": ["Drama"]})
        for u in range(n_users)
        for i in range(per_user)
    ]


def subprocess_env(backend, kek_b64: str | None, **extra: str) -> dict[str, str]:
    """Environment for `python -m api.cli ...` against the same databases and KEK (None: the
    key directory USERLLM_HOME/kek, as an in-process Store.open(home=...) uses)."""
    _, data_url, keys_url, home = backend
    env = dict(os.environ)
    env.update(USERLLM_HOME=str(home), USERLLM_DATABASE_URL=data_url, USERLLM_KEYS_DATABASE_URL=keys_url)
    env.pop("USERLLM_KEK_FILE", None)
    env.pop("USERLLM_KEK", None)
    if kek_b64 is not None:
        env["USERLLM_KEK"] = kek_b64
    env.update(extra)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


def cli_command(full: bool = False) -> list[str]:
    """`python -m api.cli` (full=True: the kill -9 tests), else the same api.cli.main with only the
    store commands registered: other areas' command modules import torch at start-up (~2 s a
    process on this machine), which the store commands never need."""
    import importlib.util
    import sys

    from api.cli import COMMAND_MODULES

    if full and all(importlib.util.find_spec(m) is not None for m in COMMAND_MODULES):
        return [sys.executable, "-m", "api.cli"]
    return [sys.executable, "-c", "import sys, api.cli as c; c.COMMAND_MODULES = ('api.store_cli',); sys.exit(c.main())"]


def pg_schema_of(url: str) -> str:
    """The schema a test URL pins through search_path."""
    return url.rsplit("search_path%3D", 1)[1]


def pg_dump_schema(url: str, out_path) -> None:  # noqa: ANN001
    """Plain-SQL pg_dump of one test schema (the canary and backup/restore tests read it)."""
    import shutil
    import subprocess

    exe = shutil.which("pg_dump") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_dump"))), None)
    assert exe, "pg_dump not found"
    subprocess.run([str(exe), "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-n", pg_schema_of(url), "-f", str(out_path)], check=True)


def psql_file(path) -> None:  # noqa: ANN001
    import shutil
    import subprocess

    exe = shutil.which("psql") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))), None)
    assert exe, "psql not found"
    subprocess.run([str(exe), "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-v", "ON_ERROR_STOP=1", "-f", str(path)], check=True, capture_output=True)


def all_rows(engine) -> dict[str, list[tuple]]:  # noqa: ANN001
    """Every row of every table (reflected), for 'zero rows anywhere' checks."""
    from sqlalchemy import MetaData, select

    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        return {name: [tuple(r) for r in conn.execute(select(t))] for name, t in meta.tables.items()}


def raw_connection(url: str):  # noqa: ANN201
    """A connection straight to the database, as a hostile operator editing it would use: no
    foreign keys, no triggers, autocommit. SQL uses ? placeholders on both backends."""
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(url.split("sqlite:///", 1)[1], isolation_level=None, timeout=30)
        return conn, "?"
    import psycopg

    conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True)
    conn.execute("SET session_replication_role = replica")  # FKs and triggers off (superuser)
    return conn, "%s"


def raw_exec(url: str, sql: str, params=()):  # noqa: ANN001, ANN201
    conn, mark = raw_connection(url)
    try:
        cur = conn.execute(sql.replace("?", mark), tuple(params))
        return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def sqlite_checkpoint(engine) -> None:  # noqa: ANN001
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def open_store(backend, kek_b64: str | None = None, create: bool = True):  # noqa: ANN001, ANN201
    import base64

    from privacy import LocalKek
    from store import Store

    _, data_url, keys_url, home = backend
    kek = LocalKek({1: base64.b64decode(kek_b64)}) if kek_b64 else None
    return Store.open(home=home, url=data_url, keys_url=keys_url, kek=kek, create=create)

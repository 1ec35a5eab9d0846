"""Where the databases live and how we connect (DESIGN.md, "On disk").

SQLite by default (`USERLLM_HOME/store.db` for data, `USERLLM_HOME/keys.db` for wrapped keys, so a
copy of the data file never carries its keys); any SQLAlchemy URL through `USERLLM_DATABASE_URL` /
`USERLLM_KEYS_DATABASE_URL`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.dialects.sqlite import insert as sqlite_insert


def resolve_home(home: str | os.PathLike | None = None, create: bool = True) -> Path:
    path = Path(home or os.environ.get("USERLLM_HOME") or Path.home() / ".userllm").expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def resolve_urls(home: Path, url: str | None = None, keys_url: str | None = None) -> tuple[str, str]:
    data = url or os.environ.get("USERLLM_DATABASE_URL") or f"sqlite:///{home / 'store.db'}"
    keys = keys_url or os.environ.get("USERLLM_KEYS_DATABASE_URL") or f"sqlite:///{home / 'keys.db'}"
    return _with_driver(data), _with_driver(keys)


def _with_driver(url: str) -> str:
    # psycopg 3 is the driver we ship; a bare postgresql:// would ask for psycopg2.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL (None for other backends and in-memory databases)."""
    if not url.startswith("sqlite"):
        return None
    path = make_url(url).database
    return path if path and path != ":memory:" else None


def describe(url: str) -> str:
    """A database URL as an operator may see it: the file, or the URL without its password."""
    path = sqlite_path(url)
    return path if path else make_url(url).render_as_string(hide_password=True)


def holds_schema(engine: Engine, version_table: str) -> bool:
    """Whether the database was ever migrated (an existing store), without creating anything."""
    path = sqlite_path(str(engine.url))
    if path is not None and (not os.path.exists(path) or os.path.getsize(path) == 0):
        return False  # checked before connecting: connecting would create the file
    return inspect(engine).has_table(version_table)


def create_owner_only(url: str) -> None:
    """Create a SQLite file owner-only before SQLite does (it gives its -wal/-shm files the
    same permissions). Called only once the store has decided to create or open it."""
    path = sqlite_path(url)
    if path and not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            # WAL: readers never block the writer; NORMAL: a commit survives a killed process
            # (the WAL is in the OS cache), only a power cut can lose the last commits.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # Deleted content is overwritten with zeros, not left in free pages: crypto-shredding
            # must not depend on how the platform's SQLite was compiled.
            cur.execute("PRAGMA secure_delete=ON")
            cur.execute("PRAGMA cache_size=-65536")  # 64 MiB: random-key index inserts stay in memory
            # Checkpoint every 64 MiB of WAL instead of 4 MiB: bulk ingest rewrites the same index
            # pages many times between checkpoints, and fewer, larger checkpoints copy (and fsync)
            # each page once. Measured ~1.4x faster ML-1M ingest; the WAL is capped at that size.
            cur.execute("PRAGMA wal_autocheckpoint=16384")
            cur.execute("PRAGMA journal_size_limit=67108864")
            cur.close()

        return engine
    if not url.startswith("postgresql"):
        raise ValueError(f"unsupported database URL scheme (use sqlite:/// or postgresql://): {url.split(':', 1)[0]}")
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})


def insert_ignoring_duplicates(engine: Engine, table):  # noqa: ANN001
    """INSERT ... ON CONFLICT DO NOTHING for either backend: what makes a retried batch harmless."""
    insert = sqlite_insert if engine.dialect.name == "sqlite" else pg_insert
    return insert(table).on_conflict_do_nothing()


# Test-only hook (documented in api/store_cli.py): seconds to sleep inside each batch's open
# transaction, so the kill -9 tests land mid-batch deterministically. Unset in production.
BATCH_DELAY_ENV = "USERLLM_TEST_BATCH_DELAY"


def batch_pause() -> None:
    delay = float(os.environ.get(BATCH_DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)


def checkpoint_and_compact(engine: Engine, tables: tuple[str, ...] = (), full: bool = False) -> str | None:
    """After an erasure, make the deleted bytes leave the storage layer: SQLite (secure_delete
    has zeroed them in the database file) truncates its WAL, whose older frames still hold them;
    PostgreSQL vacuums `tables` (FULL rewrites them: plain VACUUM can leave a dead tuple's bytes
    in a page's free space). Returns why it could not, or None."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").first()[0]
        return "another process holds the database open; the WAL is truncated at its next checkpoint" if busy else None
    locked = []
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        holders = _wait_for_older_snapshots(conn)
        # A session that read a table holds a lock VACUUM FULL must wait for: never hang the
        # erasure behind it (the key shredding has already committed).
        conn.execute(text(f"SET lock_timeout = '{int(SNAPSHOT_WAIT_S * 1000)}ms'"))
        try:
            for table in tables:
                try:
                    conn.execute(text(f"VACUUM {'FULL ' if full else ''}{table}"))
                except OperationalError:
                    locked.append(table)
        finally:
            conn.execute(text("RESET lock_timeout"))
    why = []
    if holders:
        why.append(f"{len(holders)} transaction(s) open since before the erasure (server pids "
                   f"{', '.join(map(str, holders))}) may still see the erased rows, so VACUUM "
                   "keeps their bytes")
    if locked:
        why.append(f"could not lock {', '.join(locked)} (another session holds a lock on it)")
    return "; ".join(why) + "; compact again after they end" if why else None


# Longest wait for transactions that predate the erasure: a snapshot taken before the DELETE
# committed keeps the dead rows "recently dead", and VACUUM (FULL too) must keep their bytes.
SNAPSHOT_WAIT_S = 15.0


def _wait_for_older_snapshots(conn) -> list[int]:  # noqa: ANN001
    """PostgreSQL: wait until no other session of this database holds a snapshot from before
    now, or an open write transaction from before now (idle in a READ COMMITTED transaction it
    has no snapshot, but its running xid holds VACUUM's horizon back just the same); returns the
    pids still holding one after SNAPSHOT_WAIT_S (other databases never hold back this one's
    vacuum)."""
    started = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
    deadline = time.monotonic() + SNAPSHOT_WAIT_S
    while True:
        holders = conn.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL) "
            "AND xact_start < :t "
            "ORDER BY pid"), {"t": started}).scalars().all()
        if not holders or time.monotonic() >= deadline:
            return list(holders)
        time.sleep(0.05)

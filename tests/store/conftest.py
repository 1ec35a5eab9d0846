"""Store fixtures: every database test runs on SQLite and on PostgreSQL. Each PostgreSQL test gets
two fresh schemas (data and keys) with random names, dropped afterwards, so xdist workers
never collide. PostgreSQL tests skip, with the reason, only when the server is unreachable."""
from __future__ import annotations

import base64
import os
import secrets
import socket

import pytest

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = os.environ.get("USERLLM_TEST_PG_URL", f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test")
_pg_reason: list[str] = []


def pg_unavailable() -> str | None:
    if not _pg_reason:
        try:
            socket.create_connection((PG_HOST, PG_PORT), timeout=1).close()
            import psycopg

            psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
            _pg_reason.append("")
        except Exception as err:  # noqa: BLE001 - any failure means "not reachable here"
            _pg_reason.append(f"PostgreSQL at {PG_HOST}:{PG_PORT} is unreachable ({type(err).__name__}: {err})")
    return _pg_reason[0] or None


class PgSchemas:
    """Throwaway schemas on the shared server (a schema per database role: creating and dropping
    whole databases costs seconds, a schema milliseconds). A URL pins its schema via search_path."""

    def __init__(self):
        import psycopg

        self.conn = psycopg.connect(PG_ADMIN_URL, autocommit=True)
        self.conn.execute("SET lock_timeout = '20s'")  # a leaked connection fails teardown, never hangs it
        self.names: list[str] = []

    def create(self) -> str:
        name = f"userllm_t_{secrets.token_hex(6)}"
        self.conn.execute(f'CREATE SCHEMA "{name}"')
        self.names.append(name)
        return name

    @staticmethod
    def url(name: str) -> str:
        base = PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1)
        return f"{base}?options=-csearch_path%3D{name}"

    def drop_all(self) -> None:
        for name in self.names:
            self.conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        self.conn.close()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("USERLLM_KEK", "USERLLM_KEK_FILE", "USERLLM_DATABASE_URL", "USERLLM_KEYS_DATABASE_URL", "USERLLM_TEST_BATCH_DELAY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("USERLLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def pg():
    reason = pg_unavailable()
    if reason:
        pytest.skip(reason)
    dbs = PgSchemas()
    yield dbs
    dbs.drop_all()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, clean_env):
    """(name, data_url, keys_url, home) for a fresh pair of databases."""
    home = clean_env
    home.mkdir(parents=True, exist_ok=True)
    if request.param == "sqlite":
        yield "sqlite", f"sqlite:///{home / 'store.db'}", f"sqlite:///{home / 'keys.db'}", home
        return
    reason = pg_unavailable()
    if reason:
        pytest.skip(reason)
    dbs = PgSchemas()
    try:
        yield "postgres", dbs.url(dbs.create()), dbs.url(dbs.create()), home
    finally:
        dbs.drop_all()


@pytest.fixture
def kek_b64() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def store(backend):
    from store import Store

    _, data_url, keys_url, home = backend
    s = Store.open(home=home, url=data_url, keys_url=keys_url, create=True)
    yield s
    s.close()


@pytest.fixture
def cli(monkeypatch, capsys, caplog):
    """`userllm` in this process (the same main() as the console script, without a ~2 s
    interpreter start per call): (env, *args, stdin=None) -> CompletedProcess-like result."""
    import io

    from api import cli as api_cli

    def run(env, *args, stdin=None):  # noqa: ANN001, ANN002
        for var in ("USERLLM_KEK", "USERLLM_KEK_FILE", "USERLLM_DATABASE_URL", "USERLLM_KEYS_DATABASE_URL", "USERLLM_HOME"):
            monkeypatch.delenv(var, raising=False)
        for var in ("USERLLM_KEK", "USERLLM_DATABASE_URL", "USERLLM_KEYS_DATABASE_URL", "USERLLM_HOME"):
            if var in env:
                monkeypatch.setenv(var, env[var])
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin or ""))
        monkeypatch.setattr(api_cli, "COMMAND_MODULES", ("api.store_cli",))
        capsys.readouterr()
        caplog.clear()
        try:
            code = api_cli.main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        out = capsys.readouterr()
        # Warnings reach stderr through logging's last-resort handler in a real process; here
        # pytest's log capture takes them first.
        warned = "".join(f"{r.getMessage()}\n" for r in caplog.records if r.levelname == "WARNING")
        import subprocess

        return subprocess.CompletedProcess(list(args), code, out.out, warned + out.err)

    return run

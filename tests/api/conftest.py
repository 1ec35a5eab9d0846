"""Fixtures for the service tests: tiny models once per session; a fresh store per test on
SQLite and on PostgreSQL (throwaway schemas; skipped with the reason when the server is
unreachable); API keys of each scope; a server factory."""
from __future__ import annotations

import os
import secrets

import pytest

from api_helpers import build_tiny_models

PG_URL = os.environ.get("USERLLM_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("api-models"))


def _pg_schemas():
    try:
        import psycopg

        conn = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable ({type(err).__name__})")
    conn.execute("SET lock_timeout = '20s'")
    names = [f"userllm_t_{secrets.token_hex(6)}" for _ in range(2)]
    for n in names:
        conn.execute(f'CREATE SCHEMA "{n}"')
    base = PG_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    return conn, names, [f"{base}?options=-csearch_path%3D{n}" for n in names]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path, monkeypatch):
    """(name, home, data_url, keys_url) of a fresh, initialised store."""
    for var in ("USERLLM_KEK", "USERLLM_KEK_FILE", "USERLLM_DATABASE_URL",
                "USERLLM_KEYS_DATABASE_URL", "USERLLM_HOME", "USERLLM_ADAPTER", "USERLLM_MODEL",
                "USERLLM_ENCODER", "USERLLM_REDIS_URL", "USERLLM_RATE_LIMIT"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    if request.param == "sqlite":
        urls, conn, names = (f"sqlite:///{home / 'store.db'}", f"sqlite:///{home / 'keys.db'}"), None, []
    else:
        conn, names, urls = _pg_schemas()
    from store import Store

    Store.open(home, urls[0], urls[1], create=True).close()
    yield request.param, home, urls[0], urls[1]
    if conn is not None:
        for n in names:
            conn.execute(f'DROP SCHEMA IF EXISTS "{n}" CASCADE')
        conn.close()


@pytest.fixture
def sqlite_backend(tmp_path, monkeypatch):
    for var in ("USERLLM_KEK", "USERLLM_KEK_FILE", "USERLLM_DATABASE_URL",
                "USERLLM_KEYS_DATABASE_URL", "USERLLM_HOME", "USERLLM_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    from store import Store

    urls = (f"sqlite:///{home / 'store.db'}", f"sqlite:///{home / 'keys.db'}")
    Store.open(home, *urls, create=True).close()
    return "sqlite", home, urls[0], urls[1]


@pytest.fixture
def serve():
    """serve(settings) -> a started ServerThread (stopped after the test)."""
    from api.service import create_app
    from api.service.server import ServerThread

    started = []

    def start(settings):  # noqa: ANN001, ANN202
        server = ServerThread(create_app(settings)).__enter__()
        started.append(server)
        return server

    yield start
    for s in started:
        s.__exit__(None, None, None)

"""Alembic migrations for the two databases, run from code (no alembic.ini), so they work from an
installed package: `upgrade(engine, "data")` / `upgrade(engine, "keys")`.

Each database has its own script folder and version table, so both can live in one database.
Revisions that re-bind stored data need keys: `attributes` hands them in (the KEK for the key
store, the opened key store for the data database)."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

HERE = Path(__file__).resolve().parent
VERSION_TABLES = {"data": "alembic_version", "keys": "alembic_version_keys"}


def alembic_config(which: str) -> Config:
    if which not in VERSION_TABLES:
        raise ValueError(f"unknown database role {which!r}")
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE / which))
    cfg.attributes["version_table"] = VERSION_TABLES[which]
    return cfg


_HEADS: dict[str, str] = {}


def _at_head(engine: Engine, which: str, cfg: Config) -> bool:
    """Whether the database is already at the head revision (one cheap query: every command
    opens the store, and Alembic's full upgrade path costs far more than the check)."""
    if which not in _HEADS:
        _HEADS[which] = ScriptDirectory.from_config(cfg).get_current_head()
    try:
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLES[which]}")).scalars().all() == [_HEADS[which]]
    except Exception:  # noqa: BLE001 - no version table yet: run the migrations
        return False


def upgrade(engine: Engine, which: str, revision: str = "head", **attributes) -> None:  # noqa: ANN003
    cfg = alembic_config(which)
    if revision == "head" and _at_head(engine, which, cfg):
        return
    cfg.attributes.update(attributes)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def run_env(context, target_metadata) -> None:  # noqa: ANN001
    """Body shared by both env.py files: online mode only, on the connection we pass in."""
    config = context.config
    conn = config.attributes.get("connection")
    if conn is None:
        raise RuntimeError("run migrations through store.migrations.upgrade(engine, ...)")
    context.configure(
        connection=conn,
        target_metadata=target_metadata,
        version_table=config.attributes["version_table"],
        render_as_batch=conn.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()

"""Erasure at the storage level: after delete-user, the erased user's wrapped key and
ciphertexts are nowhere in the raw files. SQLite: store.db, keys.db and their WAL files
(secure_delete on, WAL checkpointed by the erasure). PostgreSQL: every raw page of the tables,
read with pageinspect, after the erasure's VACUUM (FULL for the key table; FULL for the data
tables with --compact, which plain VACUUM cannot promise: a dead tuple's bytes may stay in a
page's free space)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sqlalchemy import select, text

from store import delete_user
from store.keystore_models import DataKey
from store.models import EmbeddingRow, EventRow, User
from store_helpers import make_events, pg_schema_of


def _victim_bytes(store, ext: str) -> dict[str, list[bytes]]:
    uid = store.user_key(ext).user_id
    with store.keys_engine.connect() as conn:
        wrapped = conn.execute(select(DataKey.wrapped).where(DataKey.user_id == uid)).scalar_one()
    with store.data.connect() as conn:
        payloads = (
            conn.execute(select(EventRow.payload).where(EventRow.user_id == uid)).scalars().all()
        )
        vectors = (
            conn.execute(select(EmbeddingRow.vector).where(EmbeddingRow.user_id == uid))
            .scalars()
            .all()
        )
        sealed = conn.execute(select(User.external_id_sealed).where(User.id == uid)).scalars().all()
    # The tail of each ciphertext (tag included) is what no other row can share by chance.
    return {
        "wrapped key": [wrapped],
        "event payloads": [p[-32:] for p in payloads],
        "embeddings": [v[-32:] for v in vectors],
        "external id": [s[-24:] for s in sealed],
    }


def _count(raw: bytes, needles: dict[str, list[bytes]]) -> dict[str, int]:
    return {name: sum(raw.count(n) for n in ns) for name, ns in needles.items()}


def _pg_pages(engine, url: str, tables: tuple[str, ...]) -> bytes:  # noqa: ANN001
    schema = pg_schema_of(url)
    with engine.connect() as conn:
        try:
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS pageinspect SCHEMA public"))
            conn.commit()
        except Exception:  # noqa: BLE001 - another worker created it at the same moment
            conn.rollback()
        out = []
        for table in tables:
            rel = f'"{schema}".{table}'
            blocks = conn.execute(
                text("SELECT pg_relation_size(CAST(:r AS regclass)) / 8192"), {"r": rel}
            ).scalar_one()
            out += [
                bytes(p)
                for (p,) in conn.execute(
                    text(
                        "SELECT public.get_raw_page(:r, g::int) FROM generate_series(0, :n - 1) g"
                    ),
                    {"r": rel, "n": blocks},
                )
            ]
    return b"".join(out)


@pytest.mark.parametrize("compact", [False, True])
def test_erased_bytes_are_gone_from_the_raw_storage(store, backend, compact):
    name, data_url, keys_url, home = backend
    if name == "sqlite" and compact:
        pytest.skip(
            "--compact changes nothing on SQLite (secure_delete and the WAL truncation always apply)"
        )
    store.ingest(make_events(40, 25))
    rng = np.random.default_rng(0)
    store.put_embeddings({f"u{i}": rng.normal(size=16).astype(np.float32) for i in range(40)}, "e1")
    needles = _victim_bytes(store, "u17")
    keep = _victim_bytes(store, "u18")  # a neighbour's bytes: must all still be there

    def raw() -> bytes:
        if name == "sqlite":
            return b"".join(
                p.read_bytes()
                for p in sorted(home.iterdir())
                if p.name.startswith(("store.db", "keys.db"))
            )
        return _pg_pages(store.data, data_url, ("events", "embeddings", "users")) + _pg_pages(
            store.keys_engine, keys_url, ("keystore_data_keys",)
        )

    before = _count(raw(), needles)
    assert all(n >= 1 for n in before.values()), before  # the scan does see them while they exist
    report = delete_user(store, "u17", compact=compact)
    assert report.notes == []
    after = _count(raw(), needles)
    print(f"{name} (compact={compact}): erased user's bytes before {before}, after {after}")
    if name == "sqlite" or compact:
        assert after == {k: 0 for k in after}, after
    else:
        assert after["wrapped key"] == 0, (
            after
        )  # the key table is always rewritten: crypto-shredded
    assert all(n >= 1 for n in _count(raw(), keep).values())
    if name == "sqlite":
        assert not [p for p in home.iterdir() if p.name.endswith("-wal") and p.stat().st_size > 0]


def _postgres_victim(store, backend, monkeypatch, holder: str) -> tuple[str, dict[str, list[bytes]]]:
    """PostgreSQL only (SQLite has no concurrent `holder` that outlive a writer's commit): a
    short snapshot wait, 20 events ingested, and the bytes of victim u3 to look for."""
    name, data_url, _, _ = backend
    if name == "sqlite":
        pytest.skip(f"SQLite has no concurrent {holder} that outlive a writer's commit")
    import store.db as store_db

    monkeypatch.setattr(store_db, "SNAPSHOT_WAIT_S", 0.5)
    store.ingest(make_events(5, 4))
    return data_url, _victim_bytes(store, "u3")


def _second_compaction_clears(store, data_url: str, needles: dict[str, list[bytes]]) -> None:
    """Once the holder has ended, a second compaction reports nothing and removes the bytes.
    VACUUM's horizon is the whole database: a transaction that a concurrent test (another
    xdist worker, same database) opened before the erasure holds it back too, and is reported
    the same way; such holders are short, so the compaction is retried for a few seconds."""
    deadline = time.monotonic() + 30
    while (notes := store.compact_after_erasure(full=True)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert notes == []
    assert _count(_pg_pages(store.data, data_url, ("events",)), needles)["event payloads"] == 0


def test_a_snapshot_older_than_the_erasure_is_reported_not_hidden(store, backend, monkeypatch):
    """A hostile (or merely slow) session that opened a snapshot before the erasure keeps the
    dead rows alive for VACUUM: the erasure waits for it, then says so instead of claiming the
    bytes are gone; once it ends, a second compaction removes them."""
    data_url, needles = _postgres_victim(store, backend, monkeypatch, "snapshots")
    with store.data.connect().execution_options(isolation_level="REPEATABLE READ") as reader:
        reader.execute(text("SELECT count(*) FROM events")).scalar_one()  # takes the snapshot
        report = delete_user(store, "u3", compact=True)
        # One note per database it held back (the key and data schemas share one here).
        assert report.notes and all("compact again" in n for n in report.notes), report.notes
        assert any("could not lock events" in n for n in report.notes), report.notes
        assert not any("u3" in n for n in report.notes)
        pages = _pg_pages(store.data, data_url, ("events",))
        assert _count(pages, needles)["event payloads"] >= 1  # what the note warned about
    _second_compaction_clears(store, data_url, needles)


def test_an_idle_write_transaction_older_than_the_erasure_is_reported(store, backend, monkeypatch):
    """A session idle in a READ COMMITTED write transaction holds no snapshot between
    statements, but its transaction id holds VACUUM's horizon back all the same: the erasure
    must count it (and say so) instead of reporting a clean compaction with the bytes kept."""
    data_url, needles = _postgres_victim(store, backend, monkeypatch, "transactions")
    with store.data.connect() as writer:  # READ COMMITTED, the default
        writer.execute(text("CREATE TEMP TABLE scratch (x int)"))  # takes a transaction id
        writer.execute(text("INSERT INTO scratch VALUES (1)"))
        report = delete_user(store, "u3", compact=True)
        assert report.notes and all("compact again" in n for n in report.notes), report.notes
        assert any("open since before the erasure" in n for n in report.notes), report.notes
        writer.rollback()
    _second_compaction_clears(store, data_url, needles)

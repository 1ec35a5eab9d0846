"""The store: encrypted events and embeddings, per-user keys, FAISS index, audit log.

    store = Store.open()                      # USERLLM_HOME, *_DATABASE_URL, USERLLM_KEK[_FILE]
    store.ingest(events, batch_size=1000)     # one transaction per batch, idempotent by event id
    store.history("user-42")                  # [Event], decrypted only in memory
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError, OperationalError

from privacy import KekProvider, aad_builder, associated_data, kek_from_env
from store import audit
from store.db import insert_ignoring_duplicates, make_engine, resolve_home, resolve_urls
from store.index import UserIndex, check_version
from store.keystore import INDEX_KEY, KeyStore
from store.migrations import upgrade
from store.models import EmbeddingRow, EventRow, User
from store.records import IngestCounts, decode_payload, encode_payload
from userenc.events import Event

log = logging.getLogger("userllm.store")


@dataclass(slots=True)
class _PreparedBatch:
    size: int
    tombstoned: int
    new_users: list[dict]
    rows: list[tuple]  # (row id bytes, user id, sealed payload), sorted by row id
SQL_IN_CHUNK = 900  # stay under every backend's bound-parameter limit
# Test-only hook (documented in api/store_cli.py): seconds to sleep inside each batch's open
# transaction, so the kill -9 tests land mid-batch deterministically. Unset in production.
BATCH_DELAY_ENV = "USERLLM_TEST_BATCH_DELAY"


def batch_pause() -> None:
    delay = float(os.environ.get(BATCH_DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)


class Store:
    def __init__(self, home: Path, data_url: str, keys_url: str, kek: KekProvider):
        self.home = home
        self.data = make_engine(data_url)
        self.keys_engine = make_engine(keys_url)
        upgrade(self.data, "data")
        upgrade(self.keys_engine, "keys")
        self.keys = KeyStore(self.keys_engine, kek)
        self.hasher = self.keys.hasher
        self.index = UserIndex(home / "index", self.keys.secret(INDEX_KEY))
        mark = "?" if self.data.dialect.paramstyle == "qmark" else "%s"
        self._insert_events_sql = f"INSERT INTO events (id, user_id, payload) VALUES ({mark}, {mark}, {mark}) ON CONFLICT DO NOTHING"

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, url: str | None = None, keys_url: str | None = None, kek: KekProvider | None = None) -> "Store":
        h = resolve_home(home)
        data_url, keys_url = resolve_urls(h, url, keys_url)
        return cls(h, data_url, keys_url, kek or kek_from_env(h))

    def close(self) -> None:
        self.data.dispose()
        self.keys_engine.dispose()

    # -- audit --------------------------------------------------------------------------------
    def audit(self, action: str, details: dict) -> None:
        for attempt in range(5):
            try:
                with self.data.begin() as conn:
                    seq, h = audit.append(conn, action, details)
                break
            except (IntegrityError, OperationalError):
                # Another process appended the same sequence number first (or held SQLite's write
                # lock): read the new tail and try again.
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        self.keys.set_audit_anchor(seq, h)

    def audit_problems(self) -> list[str]:
        return audit.verify(self.data, self.keys.audit_anchor())

    # -- users --------------------------------------------------------------------------------
    def user_id(self, external_id: str) -> int | None:
        """Internal id of a live user in the data database (None when unknown)."""
        h = self.hasher.user(external_id)
        with self.data.connect() as conn:
            return conn.execute(select(User.id).where(User.uid_hash == h)).scalar()

    def tombstoned(self) -> set[str]:
        return set(self.keys.tombstones())

    def _external_id(self, user_id: int, sealed: bytes) -> str:
        aad = associated_data("users", "external_id_sealed", user_id, user_id)
        return self.keys.cipher(user_id).open(sealed, aad, where="users.external_id_sealed").decode()

    def artefact_dir(self, external_id: str) -> Path:
        """Where any part may cache per-user artefacts (e.g. UserTokens); erasure deletes it."""
        return self.home / "cache" / self.hasher.user(external_id)

    # -- training honours erasure (see store/erasure_training.py) ------------------------------
    def training_filter(self):  # noqa: ANN201
        from store.erasure_training import training_filter

        return training_filter(self)

    def manifest_users(self, external_ids: Iterable[str], checkpoint_dir: str | os.PathLike | None = None) -> dict:
        from store.erasure_training import manifest_users

        return manifest_users(self, external_ids, checkpoint_dir)

    # -- ingest -------------------------------------------------------------------------------
    def ingest(self, events: Iterable[Event], batch_size: int = 1000, on_batch: Callable[[IngestCounts], None] | None = None) -> IngestCounts:
        """Validate everything first (bad input writes nothing), then write one transaction per
        batch. A batch is acknowledged (`on_batch`) only after its commit; re-running the same
        input skips what is already stored, so a killed run loses and duplicates nothing."""
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        events = list(events)
        payloads = [encode_payload(e, i) for i, e in enumerate(events)]
        counts = IngestCounts(received=len(events))
        tombstones, known = self.tombstoned(), {}
        # Two-stage pipeline: while the writer thread runs batch N's transaction (SQLite and the
        # PostgreSQL driver release the GIL while they work), this thread hashes and seals batch
        # N+1. At most one batch is in flight; acknowledgements stay in order, after each commit.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="userllm-ingest") as writer:
            in_flight = None
            for start in range(0, len(events), batch_size):
                batch = self._prepare_batch(events[start : start + batch_size], payloads[start : start + batch_size], tombstones, known)
                if in_flight is not None:
                    self._acknowledge(in_flight, counts, on_batch)
                in_flight = (writer.submit(self._write_batch, batch), batch)
            if in_flight is not None:
                self._acknowledge(in_flight, counts, on_batch)
        self.audit("ingest", counts.as_dict())
        log.info("ingest: %s", counts.as_dict())
        return counts

    @staticmethod
    def _acknowledge(in_flight, counts: IngestCounts, on_batch) -> None:  # noqa: ANN001
        future, batch = in_flight
        inserted = future.result()  # re-raises the writer's error; nothing after it was written
        counts.inserted += inserted
        counts.duplicates += batch.size - batch.tombstoned - inserted
        counts.tombstoned += batch.tombstoned
        counts.batches += 1
        if on_batch:
            on_batch(counts)

    def _prepare_batch(self, batch: list[Event], payloads: list[bytes], tombstones: set[str], known: dict[str, int]) -> "_PreparedBatch":
        """Everything but the data write: user ids and keys (committed to the key store before
        any data that needs them), row ids, sealed payloads."""
        hasher = self.hasher
        uid_hash = {ext: hasher.user(ext) for ext in dict.fromkeys(e.user_id for e in batch)}
        tombstones.update(self.keys.tombstoned_among(list(uid_hash.values())))  # erasures since we started
        live = {ext: h for ext, h in uid_hash.items() if h not in tombstones}
        unknown = [h for h in live.values() if h not in known]
        with self.data.connect() as conn:
            for i in range(0, len(unknown), SQL_IN_CHUNK):
                known.update(conn.execute(select(User.uid_hash, User.id).where(User.uid_hash.in_(unknown[i : i + SQL_IN_CHUNK]))).all())
        new_users, now = [], int(time.time())
        missing = [h for h in live.values() if h not in known]
        if missing:
            created = self.keys.get_or_create_many(missing)
            for ext, h in live.items():
                if h in created and h not in known:
                    uid = known[h] = created[h]
                    sealed = self.keys.cipher(uid).seal(ext.encode(), associated_data("users", "external_id_sealed", uid, uid))
                    new_users.append({"id": uid, "uid_hash": h, "external_id_sealed": sealed, "created_at": now})
        rows: dict[bytes, tuple] = {}
        cipher_of = {uid: self.keys.cipher(uid) for uid in (known[h] for h in live.values())}
        event_hash, event_aad, tombstoned = hasher.event, aad_builder("events", "payload"), 0
        for e, payload in zip(batch, payloads):
            h = live.get(e.user_id)
            if h is None:
                tombstoned += 1
                continue
            uid = known[h]
            rid = event_hash(e.event_id)
            rows[rid] = (rid, uid, cipher_of[uid].seal(payload, event_aad(uid, rid.hex())))
        # Sorted keys: B-tree inserts land close together.
        return _PreparedBatch(len(batch), tombstoned, new_users, [rows[rid] for rid in sorted(rows)])

    def _write_batch(self, batch: "_PreparedBatch") -> int:
        """One transaction. The hot path goes straight to the driver's executemany (no per-row
        SQLAlchemy work); ON CONFLICT DO NOTHING makes a retried batch harmless, and the driver's
        summed rowcount says how many rows were new."""
        with self.data.begin() as conn:
            if batch.new_users:
                conn.execute(insert_ignoring_duplicates(self.data, User.__table__), batch.new_users)
            inserted = conn.exec_driver_sql(self._insert_events_sql, batch.rows).rowcount if batch.rows else 0
            assert inserted >= 0, "the driver must report executemany row counts"
            batch_pause()  # tests only: holds the batch's transaction open so a kill lands mid-batch
        return inserted

    # -- reads --------------------------------------------------------------------------------
    def history(self, external_id: str) -> list[Event]:
        """The user's events in timestamp order (ties by event id); [] for an unknown user."""
        uid = self.user_id(external_id)
        return [] if uid is None else self._history(uid, external_id)

    def _history(self, uid: int, external_id: str) -> list[Event]:
        cipher, event_aad = self.keys.cipher(uid), aad_builder("events", "payload")
        with self.data.connect() as conn:
            rows = conn.execute(select(EventRow.id, EventRow.payload).where(EventRow.user_id == uid)).all()
        events = [
            decode_payload(cipher.open(p, event_aad(uid, rid.hex()), where=f"events.payload row {rid.hex()}"), external_id)
            for rid, p in rows
        ]
        events.sort(key=lambda e: (e.timestamp, e.event_id))
        return events

    def histories(self) -> Iterator[tuple[str, list[Event]]]:
        """(external id, history) for every live user, tombstoned users excluded."""
        tombstones = self.tombstoned()
        with self.data.connect() as conn:
            users = conn.execute(select(User.id, User.uid_hash, User.external_id_sealed).order_by(User.id)).all()
        for uid, h, sealed in users:
            if h in tombstones:
                continue
            ext = self._external_id(uid, sealed)
            yield ext, self._history(uid, ext)

    def user_count(self) -> int:
        with self.data.connect() as conn:
            return conn.execute(select(func.count()).select_from(User)).scalar_one()

    # -- embeddings and similar users ---------------------------------------------------------
    def put_embeddings(self, vectors: dict[str, np.ndarray], encoder_version: str) -> int:
        """Store sealed vectors (one per user and encoder version, replacing older ones) and
        update the FAISS index. Unknown users are an error; tombstoned ones are skipped."""
        check_version(encoder_version)
        tombstones, ids, mats, rows, now = self.tombstoned(), [], [], [], int(time.time())
        dim = None
        for ext, vec in vectors.items():
            v = np.asarray(vec, dtype=np.float32)
            if v.ndim != 1 or not np.isfinite(v).all() or (dim is not None and v.shape[0] != dim):
                raise ValueError("embeddings must be finite 1-D vectors of one common width")
            dim = v.shape[0]
            h = self.hasher.user(ext)
            if h in tombstones:
                continue
            uid = self.user_id(ext)
            if uid is None:
                raise ValueError("embedding for a user the store does not know (ingest their events first)")
            row = f"{uid}.{encoder_version}"
            sealed = self.keys.cipher(uid).seal(v.tobytes(), associated_data("embeddings", "vector", uid, row))
            rows.append({"user_id": uid, "encoder_version": encoder_version, "dim": dim, "vector": sealed, "computed_at": now})
            ids.append(uid)
            mats.append(v)
        if not rows:
            return 0
        with self.data.begin() as conn:
            for i in range(0, len(ids), SQL_IN_CHUNK):
                chunk = ids[i : i + SQL_IN_CHUNK]
                conn.execute(delete(EmbeddingRow).where(EmbeddingRow.encoder_version == encoder_version, EmbeddingRow.user_id.in_(chunk)))
            conn.execute(EmbeddingRow.__table__.insert(), rows)
        self.index.upsert(encoder_version, np.array(ids, dtype=np.int64), np.stack(mats))
        # An erasure that finished while we wrote must not be undone by our index update.
        erased_meanwhile = {t[0] for h, t in self.keys.tombstones().items() if h not in tombstones}
        for uid in erased_meanwhile & set(ids):
            self.index.remove_everywhere(uid)
        return len(rows)

    def embedding(self, external_id: str, encoder_version: str) -> np.ndarray | None:
        uid = self.user_id(external_id)
        if uid is None:
            return None
        with self.data.connect() as conn:
            row = conn.execute(
                select(EmbeddingRow.vector).where(EmbeddingRow.user_id == uid, EmbeddingRow.encoder_version == encoder_version)
            ).scalar()
        if row is None:
            return None
        raw = self.keys.cipher(uid).open(row, associated_data("embeddings", "vector", uid, f"{uid}.{encoder_version}"), where="embeddings.vector")
        return np.frombuffer(raw, dtype=np.float32).copy()

    def similar_users(self, external_id: str, k: int = 10, encoder_version: str | None = None) -> list[tuple[str, float]]:
        """The k most similar live users (cosine), never the user itself nor an erased user."""
        version = encoder_version or self.index.current_version()
        uid = self.user_id(external_id)
        if version is None or uid is None:
            return []
        hits = self.index.search(version, uid, k + 8)  # a few spare in case some were erased
        if not hits:
            return []
        tombstones = self.tombstoned()
        with self.data.connect() as conn:
            users = {r.id: r for r in conn.execute(select(User.id, User.uid_hash, User.external_id_sealed).where(User.id.in_([i for i, _ in hits])))}
        out = []
        for i, score in hits:
            u = users.get(i)
            if u is None or u.uid_hash in tombstones:
                continue  # index lagging behind an erasure: never surface the user
            out.append((self._external_id(i, u.external_id_sealed), score))
        return out[:k]


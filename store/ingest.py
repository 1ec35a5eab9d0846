"""Ingest: validate everything first (bad input writes nothing), then one transaction per batch.

Events are unique per (user, event id): the row key is (user's internal id, keyed hash of the
event id), so the same event id from two users is two events, whatever the batch boundaries.
Users are resolved through the key store (authenticated), never through the data database's
clear mapping; a users row that disagrees with its key stops the batch before it writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from privacy import owner_aad
from store.db import batch_pause, insert_ignoring_duplicates
from store.models import User
from store.records import IngestCounts, encode_payload
from userenc.events import Event

log = logging.getLogger("userllm.store")


@dataclass(slots=True)
class PreparedBatch:
    size: int
    tombstoned: int
    new_users: list[dict]
    rows: list[tuple]  # (user id, row id bytes, sealed payload), in key order


class Ingest:
    """The ingest half of Store (a mixin: it uses the store's keys, hasher and engines)."""

    def ingest(
        self,
        events: Iterable[Event],
        batch_size: int = 1000,
        on_batch: Callable[[IngestCounts], None] | None = None,
    ) -> IngestCounts:
        """A batch is acknowledged (`on_batch`) only after its commit; re-running the same input
        skips what is already stored, so a killed run loses and duplicates nothing."""
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        events = list(events)
        payloads = [encode_payload(e, i) for i, e in enumerate(events)]
        counts = IngestCounts(received=len(events))
        tombstones: set[str] = set()
        # Two-stage pipeline: while the writer thread runs batch N's transaction (SQLite and the
        # PostgreSQL driver release the GIL while they work), this thread hashes and seals batch
        # N+1. At most one batch is in flight; acknowledgements stay in order, after each commit.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="userllm-ingest") as writer:
            in_flight = None
            for start in range(0, len(events), batch_size):
                batch = self._prepare_batch(
                    events[start : start + batch_size],
                    payloads[start : start + batch_size],
                    tombstones,
                )
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

    def _prepare_batch(
        self, batch: list[Event], payloads: list[bytes], tombstones: set[str]
    ) -> PreparedBatch:
        """Everything but the data write: users' keys (committed to the key store before any
        data that needs them), users rows to add, row ids, sealed payloads."""
        hasher = self.hasher
        uid_hash = {ext: hasher.user(ext) for ext in dict.fromkeys(e.user_id for e in batch)}
        tombstones.update(
            self.keys.tombstoned_among(list(uid_hash.values()))
        )  # erasures since we started
        live = {ext: h for ext, h in uid_hash.items() if h not in tombstones}
        keys = self.keys.get_or_create_many(list(live.values()))
        external = {h: ext for ext, h in live.items()}
        now, new_users = int(time.time()), []
        for k in self.confirm_user_rows(keys.values()):
            aad = owner_aad("users", "external_id_sealed", k.user_id, k.uid_hash, k.user_id)
            sealed = k.cipher.seal(external[k.uid_hash].encode(), aad)
            new_users.append(
                {
                    "id": k.user_id,
                    "uid_hash": k.uid_hash,
                    "external_id_sealed": sealed,
                    "created_at": now,
                }
            )
        rows: dict[tuple[int, bytes], tuple] = {}
        event_hash, aad, tombstoned = hasher.event, self.event_aad, 0
        for e, payload in zip(batch, payloads):
            h = live.get(e.user_id)
            if h is None:
                tombstoned += 1
                continue
            k = keys[h]
            rid = event_hash(e.event_id)
            rows[(k.user_id, rid)] = (
                k.user_id,
                rid,
                k.cipher.seal(payload, aad(k.user_id, h, rid.hex())),
            )
        # Key order: B-tree inserts land close together.
        return PreparedBatch(len(batch), tombstoned, new_users, [rows[key] for key in sorted(rows)])

    def _write_batch(self, batch: PreparedBatch) -> int:
        """One transaction. The hot path goes straight to the driver's executemany (no per-row
        SQLAlchemy work); ON CONFLICT DO NOTHING makes a retried batch harmless, and the driver's
        summed rowcount says how many rows were new."""
        with self.data.begin() as conn:
            if batch.new_users:
                conn.execute(insert_ignoring_duplicates(self.data, User.__table__), batch.new_users)
            inserted = (
                conn.exec_driver_sql(self._insert_events_sql(), batch.rows).rowcount
                if batch.rows
                else 0
            )
            if inserted < 0:
                raise RuntimeError("the database driver did not report executemany row counts")
            batch_pause()  # tests only: holds the batch's transaction open so a kill lands mid-batch
        self._rows_confirmed.update(u["id"] for u in batch.new_users)
        return inserted

    def _insert_events_sql(self) -> str:
        mark = "?" if self.data.dialect.paramstyle == "qmark" else "%s"
        return f"INSERT INTO events (user_id, id, payload) VALUES ({mark}, {mark}, {mark}) ON CONFLICT DO NOTHING"

"""The store: encrypted events and embeddings, per-user keys, FAISS index, audit log.

    with Store.open() as store:               # USERLLM_HOME, *_DATABASE_URL, USERLLM_KEK[_FILE]
        store.ingest(events, batch_size=1000) # one transaction per batch, idempotent by (user, event id)
        store.history("user-42")              # [Event], decrypted only in memory

Every read resolves the user through the key store, whose row authenticates the link from the
user's keyed id to their internal id and key, and opens each field with AAD naming both ids: a
read for user U returns only data that authenticates as U's, or raises StoreIntegrityError.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from sqlalchemy import bindparam, delete, select
from sqlalchemy.exc import IntegrityError, OperationalError

from privacy import DecryptionError, KekProvider, aad_builder, owner_aad
from store import audit
from store.db import checkpoint_and_compact, resolve_home
from store.errors import StoreIntegrityError
from store.index import UserIndex, check_version
from store.ingest import Ingest
from store.keystore import SQL_IN_CHUNK, UserKey
from store.models import EmbeddingRow, EventRow, User
from store.opening import open_parts
from store.records import decode_payload
from userenc.events import Event

log = logging.getLogger("userllm.store")
_ARTEFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _not_theirs(where: str) -> StoreIntegrityError:
    return StoreIntegrityError(
        f"{where} does not authenticate as the user it was read for (moved between users, or altered); nothing was returned"
    )



# The read path's statements, built once: constructing a select costs more than SQLite's
# execution of it, and these run on every embedding and recommendation request.
_EVENT_IDS = (select(EventRow.id).where(EventRow.user_id == bindparam("uid"))
              .order_by(EventRow.id))
_EMBEDDING = select(EmbeddingRow.vector).where(
    EmbeddingRow.user_id == bindparam("uid"), EmbeddingRow.encoder_version == bindparam("version"))


class Store(Ingest):
    def __init__(
        self,
        home: Path,
        data_url: str | None,
        keys_url: str | None,
        kek: KekProvider | None,
        create: bool = False,
    ):
        parts = open_parts(home, data_url, keys_url, kek, create)
        self.home, self.data, self.keys_engine, self.keys = (
            home,
            parts.data,
            parts.keys_engine,
            parts.keys,
        )
        self.hasher = self.keys.hasher
        self.index = UserIndex(home / "index", self.keys.index_key)
        # One file per store (named by its MAC key): a node may serve several stores from one home.
        self.node_anchor = audit.NodeAnchor(
            home / f"audit-anchor-{self.keys.mac.tag('store-id')[:16]}.json", self.keys.mac
        )
        self.event_aad = aad_builder("events", "payload")
        # This process's appends go one at a time (request threads and an erasure worker would
        # otherwise race for each next sequence number); other processes are met by retrying.
        self._audit_lock = threading.RLock()
        self._rows_confirmed: set[int] = set()  # users whose data-database row matches their key
        self.created = parts.created
        if parts.created:
            self.audit("store.created", {"kek_version": self.keys.kek.current_version()})

    @classmethod
    def open(
        cls,
        home: str | os.PathLike | None = None,
        url: str | None = None,
        keys_url: str | None = None,
        kek: KekProvider | None = None,
        create: bool = False,
    ) -> "Store":
        """Open an existing store; `create=True` also creates one where none exists at all."""
        return cls(resolve_home(home, create=False), url, keys_url, kek, create)

    def close(self) -> None:
        self.data.dispose()
        self.keys_engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.close()

    # -- audit --------------------------------------------------------------------------------
    def audit(self, action: str, details: dict, acknowledge_gaps: bool = False) -> list[str]:
        """Append an entry. The log must end where both anchors say; if not, the entry is still
        recorded but the anchors are not moved over the gap (returned, and logged as a warning),
        unless `acknowledge_gaps` (restore-check), which records the gaps in the entry itself."""
        with self._audit_lock:
            return self._audit(action, details, acknowledge_gaps)

    def _audit(self, action: str, details: dict, acknowledge_gaps: bool) -> list[str]:
        for attempt in range(5):
            try:
                with self.data.begin() as conn:
                    prev = audit.tail(conn)
                    gaps = audit.anchor_gaps(
                        conn, prev, self.keys.audit_anchor(), self.node_anchor.read()
                    )
                    if gaps and acknowledge_gaps:
                        prev = audit.append(conn, prev, audit.GAP_ACTION, {"gaps": gaps})
                    latest = audit.append(conn, prev, action, details)
                    if acknowledge_gaps or not gaps:
                        # Inside the transaction: the log then ends at `prev` or `latest`, whatever fails.
                        self.keys.set_audit_anchor(prev, latest)
                break
            except (IntegrityError, OperationalError):
                # Another process appended the same sequence number first (or held SQLite's write
                # lock): read the new tail and try again.
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        if acknowledge_gaps or not gaps:
            self.node_anchor.write(latest)
        else:
            log.warning(
                "audit log: %s; not re-anchored (run `userllm admin audit-verify`, then `userllm admin restore-check`)",
                "; ".join(gaps),
            )
        return gaps

    def audit_report(self) -> audit.AuditReport:
        # Under the append lock: the anchors and the log are read in separate transactions, and
        # an append of this process landing between them made the log look extended outside
        # userllm. (Another process appending meanwhile can still do so: verify again.)
        with self._audit_lock:
            return audit.verify(self.data, self.keys.audit_anchor(), self.node_anchor.read())

    # -- users --------------------------------------------------------------------------------
    def user_key(self, external_id: str) -> UserKey | None:
        """The user's authenticated key (None when the store does not know them)."""
        return self.keys.user_key(self.hasher.user(external_id))

    def artefact_dir(self, uid_hash: str) -> Path:
        """Where any part may cache per-user artefacts (e.g. UserTokens), by keyed id
        (`store.hasher.user(external_id)`); erasure deletes it."""
        return self.home / "cache" / uid_hash

    def put_artefact(self, external_id: str, name: str, data: bytes) -> bool:
        """Seal `data` under the user's data key into their artefact folder (a cache: user
        tokens, ...). False (nothing written) for a user the store does not know or has erased.
        Erasure deletes the folder; the data key's shredding makes any leftover copy noise."""
        if not _ARTEFACT_NAME.match(name):
            raise ValueError("artefact names are short [A-Za-z0-9._-] names")
        key = self.user_key(external_id)
        if key is None:
            return False
        folder = self.artefact_dir(key.uid_hash)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        sealed = key.cipher.seal(data, self._artefact_aad(key, name))
        tmp = folder / f".{name}.tmp{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(sealed)
        os.replace(tmp, folder / name)
        if self.keys.tombstoned_among([key.uid_hash]):  # erased while we wrote: leave nothing
            shutil.rmtree(folder, ignore_errors=True)
            return False
        return True

    def artefact(self, external_id: str, name: str) -> bytes | None:
        """An artefact sealed by put_artefact, opened (None when absent or the user unknown)."""
        key = self.user_key(external_id)
        if key is None or not _ARTEFACT_NAME.match(name):
            return None
        try:
            sealed = (self.artefact_dir(key.uid_hash) / name).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return key.cipher.open(sealed, self._artefact_aad(key, name))
        except DecryptionError:
            raise _not_theirs("a cached artefact") from None

    @staticmethod
    def _artefact_aad(key: UserKey, name: str) -> bytes:
        return owner_aad("artefacts", "blob", key.user_id, key.uid_hash, name)

    def _external_id(self, key: UserKey, sealed: bytes) -> str:
        aad = owner_aad("users", "external_id_sealed", key.user_id, key.uid_hash, key.user_id)
        try:
            ext = key.cipher.open(sealed, aad).decode()
        except DecryptionError:
            raise _not_theirs("a users row") from None
        if self.hasher.user(ext) != key.uid_hash:
            raise _not_theirs("a users row")
        return ext

    def confirm_user_rows(self, keys: Iterable[UserKey]) -> list[UserKey]:
        """Check the data database's users rows against authenticated keys; returns the keys
        whose row is missing. A row that names another keyed id is an integrity error."""
        todo = {k.user_id: k for k in keys if k.user_id not in self._rows_confirmed}
        ids = list(todo)
        with self.data.connect() as conn:
            for i in range(0, len(ids), SQL_IN_CHUNK):
                for uid, h in conn.execute(
                    select(User.id, User.uid_hash).where(User.id.in_(ids[i : i + SQL_IN_CHUNK]))
                ):
                    if h != todo[uid].uid_hash:
                        raise StoreIntegrityError(
                            "a users row names another keyed id than its key (the mapping was altered); nothing was changed"
                        )
                    self._rows_confirmed.add(uid)
        return [k for uid, k in todo.items() if uid not in self._rows_confirmed]

    # -- reads --------------------------------------------------------------------------------
    def history(self, external_id: str) -> list[Event]:
        """The user's events in timestamp order (ties by event id); [] for an unknown user."""
        key = self.user_key(external_id)
        return [] if key is None else self._history(key, external_id)

    def history_digest(self, external_id: str) -> bytes | None:
        """32 bytes naming the set of events stored for the user (a hash of their keyed row ids),
        read without opening a payload; None for an unknown user or one without events. Events
        are never rewritten (ingest skips an event id already stored), so the same digest means
        the same history: a key for caches computed from it."""
        key = self.user_key(external_id)
        if key is None:
            return None
        with self.data.connect() as conn:
            ids = conn.execute(_EVENT_IDS, {"uid": key.user_id}).scalars().all()
        if not ids:
            return None
        digest = hashlib.sha256(len(ids).to_bytes(8, "little"))
        for row_id in ids:
            digest.update(row_id)
        return digest.digest()

    def _history(self, key: UserKey, external_id: str) -> list[Event]:
        uid, h, open_, aad, event_hash = (
            key.user_id,
            key.uid_hash,
            key.cipher.open,
            self.event_aad,
            self.hasher.event,
        )
        with self.data.connect() as conn:
            rows = conn.execute(
                select(EventRow.id, EventRow.payload).where(EventRow.user_id == uid)
            ).all()
        events = []
        try:
            for rid, p in rows:
                e = decode_payload(open_(p, aad(uid, h, rid.hex())), external_id)
                if event_hash(e.event_id) != rid:
                    raise DecryptionError("row id")
                events.append(e)
        except DecryptionError:
            raise _not_theirs("an events row") from None
        events.sort(key=lambda e: (e.timestamp, e.event_id))
        return events

    def histories(self) -> Iterator[tuple[str, list[Event]]]:
        """(external id, history) for every live user, tombstoned users excluded."""
        tombstones = self.keys.tombstones()
        with self.data.connect() as conn:
            users = conn.execute(
                select(User.id, User.uid_hash, User.external_id_sealed).order_by(User.id)
            ).all()
        users = [u for u in users if u.uid_hash not in tombstones]
        keys = self.keys.user_keys(
            [u.uid_hash for u in users]
        )  # one query per chunk, each row authenticated
        for uid, h, sealed in users:
            key = keys.get(h)
            if key is None or key.user_id != uid:
                raise StoreIntegrityError(
                    "a users row has no key of its own (mapping altered, or a key store older than the data); nothing was returned"
                )
            ext = self._external_id(key, sealed)
            yield ext, self._history(key, ext)

    # -- embeddings and similar users ---------------------------------------------------------
    def put_embeddings(self, vectors: dict[str, np.ndarray], encoder_version: str) -> int:
        """Store sealed vectors (one per user and encoder version, replacing older ones) and
        update the FAISS index. Unknown users are an error; tombstoned ones are skipped."""
        check_version(encoder_version)
        mats, dim = {}, None
        for ext, vec in vectors.items():
            v = np.asarray(vec, dtype=np.float32)
            if v.ndim != 1 or not np.isfinite(v).all() or (dim is not None and v.shape[0] != dim):
                raise ValueError("embeddings must be finite 1-D vectors of one common width")
            dim, mats[self.hasher.user(ext)] = v.shape[0], v
        tombstones = self.keys.tombstoned_among(list(mats))
        keys = self.keys.user_keys([h for h in mats if h not in tombstones])
        if len(keys) + len(tombstones) < len(mats) or self.confirm_user_rows(keys.values()):
            raise ValueError(
                "embedding for a user the store does not know (ingest their events first)"
            )
        now, rows = int(time.time()), []
        for h, k in keys.items():
            sealed = k.cipher.seal(
                mats[h].tobytes(),
                owner_aad("embeddings", "vector", k.user_id, h, f"{k.user_id}.{encoder_version}"),
            )
            rows.append(
                {
                    "user_id": k.user_id,
                    "encoder_version": encoder_version,
                    "dim": dim,
                    "vector": sealed,
                    "computed_at": now,
                }
            )
        if not rows:
            return 0
        ids = [r["user_id"] for r in rows]
        with self.data.begin() as conn:
            for i in range(0, len(ids), SQL_IN_CHUNK):
                chunk = ids[i : i + SQL_IN_CHUNK]
                conn.execute(
                    delete(EmbeddingRow).where(
                        EmbeddingRow.encoder_version == encoder_version,
                        EmbeddingRow.user_id.in_(chunk),
                    )
                )
            conn.execute(EmbeddingRow.__table__.insert(), rows)
        self.index.upsert(
            encoder_version, np.array(ids, dtype=np.int64), np.stack([mats[h] for h in keys])
        )
        # An erasure that finished while we wrote must not be undone by our index update.
        for t in self.keys.tombstoned_among(list(keys)).values():
            self.index.remove_everywhere(t.user_id)
        return len(rows)

    def embedding(self, external_id: str, encoder_version: str) -> np.ndarray | None:
        key = self.user_key(external_id)
        if key is None:
            return None
        uid = key.user_id
        with self.data.connect() as conn:
            row = conn.execute(_EMBEDDING, {"uid": uid, "version": encoder_version}).scalar()
        if row is None:
            return None
        try:
            raw = key.cipher.open(
                row,
                owner_aad("embeddings", "vector", uid, key.uid_hash, f"{uid}.{encoder_version}"),
            )
        except DecryptionError:
            raise _not_theirs("an embeddings row") from None
        return np.frombuffer(raw, dtype=np.float32).copy()

    def similar_users(
        self, external_id: str, k: int = 10, encoder_version: str | None = None
    ) -> list[tuple[str, float]]:
        """The k most similar live users (cosine), never the user itself nor an erased user."""
        version = encoder_version or self.index.current_version()
        key = self.user_key(external_id)
        if version is None or key is None:
            return []
        hits = self.index.search(
            version, key.user_id, k + 8
        )  # a few spare in case some were erased
        if not hits:
            return []
        tombstones = self.keys.tombstones()
        with self.data.connect() as conn:
            q = select(User.id, User.uid_hash, User.external_id_sealed).where(
                User.id.in_([i for i, _ in hits])
            )
            users = {r.id: r for r in conn.execute(q)}
        out = []
        for i, score in hits:
            u = users.get(i)
            if u is None or u.uid_hash in tombstones:
                continue  # index lagging behind an erasure: never surface the user
            other = self.keys.user_key(u.uid_hash, user_id=i)
            if other is None:
                continue  # no key: erased, whatever the data database says
            out.append((self._external_id(other, u.external_id_sealed), score))
        return out[:k]

    # -- shredding ----------------------------------------------------------------------------
    def compact_after_erasure(self, full: bool = False) -> list[str]:
        """Push erased bytes out of the storage layer (see store.db.checkpoint_and_compact): the
        key table always (rewritten on PostgreSQL: it is small), the data tables (PostgreSQL:
        plain VACUUM, rewritten only with `full`: a rewrite locks the table). Returns notes."""
        notes = []
        for engine, tables, rewrite in (
            (self.keys_engine, ("keystore_data_keys",), True),
            (self.data, ("events", "embeddings", "users"), full),
        ):
            why = checkpoint_and_compact(engine, tables, full=rewrite)
            if why:
                notes.append(why)
        return notes

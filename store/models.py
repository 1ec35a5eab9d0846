"""Data tables (typed SQLAlchemy 2). Nothing personal is kept in clear: external ids appear only as
a keyed hash (the user's keyed id) and, sealed, under the user's data key; event payloads and
embeddings are sealed with AAD naming the owner's internal and keyed ids. The clear ids here are
lookups only: every read is authenticated against the key store. Migrations
(store/migrations/data) create exactly these; a test checks they do not drift."""
from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class DataBase(DeclarativeBase):
    pass


class User(DataBase):
    __tablename__ = "users"
    # Random 62-bit id chosen by us before any write, so the key store, the AAD and the FAISS
    # index can all name the user before the row exists.
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    uid_hash: Mapped[str] = mapped_column(String(64), unique=True)
    external_id_sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[int] = mapped_column(BigInteger)


class EventRow(DataBase):
    """One event; unique per (user, event id). The key's user prefix also serves history reads."""

    __tablename__ = "events"
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), primary_key=True)
    id: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)  # 16-byte keyed hash of the event id
    payload: Mapped[bytes] = mapped_column(LargeBinary)  # sealed JSON [event_id, item_id, timestamp, fields]


class EmbeddingRow(DataBase):
    __tablename__ = "embeddings"
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), primary_key=True)
    encoder_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # sealed float32 bytes
    computed_at: Mapped[int] = mapped_column(BigInteger)


class ApiKey(DataBase):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of a 256-bit token
    scopes: Mapped[str] = mapped_column(String(200))
    label: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class AuditEntry(DataBase):
    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[int] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(String(64))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON: counts and keyed hashes only
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))


class ErasureRequest(DataBase):
    __tablename__ = "erasure_requests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uid_hash: Mapped[str] = mapped_column(String(64), index=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))  # running | done
    steps: Mapped[str] = mapped_column(Text)  # JSON {step: "pending" | "done"}
    created_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Tombstone(DataBase):
    """Copy of the key store's tombstones (same MAC), re-applied by restore-check when a key
    store restored from a backup lacks them."""

    __tablename__ = "tombstones"
    uid_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer)
    erased_at: Mapped[int] = mapped_column(BigInteger)
    kek_version: Mapped[int] = mapped_column(Integer)
    mac: Mapped[str] = mapped_column(String(64))
